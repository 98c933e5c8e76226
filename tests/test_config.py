"""Config loading: every problem named as FILE: key.path: why, by load_config and by the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import ConfigError, load_config
from tests.harness import DEFAULT_POLICY, ROOT


def write(directory: Path, config: dict[str, object], policy: object = DEFAULT_POLICY) -> Path:
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy))
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump({"policy": "policy.yaml", **config}))
    return path


UPSTREAM = {"name": "demo", "path": "/mcp", "url": "http://127.0.0.1:9000/mcp"}
OAUTH = {"grant": "client_credentials", "client_id": "gw", "client_secret": "s"}

BAD = [
    ({"upstreams": []}, "upstreams: needs at least 1 item(s)"),
    ({"upstreams": [{**UPSTREAM, "url": "ftp://x"}]}, "upstreams.0.url: must be an http:// or https:// URL"),
    ({"upstreams": [UPSTREAM], "public_url": "/relative"}, "public_url: must be an absolute"),
    ({"upstreams": [UPSTREAM], "limits": {"max_body_bytes": 0}}, "limits.max_body_bytes: Input should be greater"),
    ({"upstreams": [UPSTREAM], "listn": {}}, "listn: unknown key"),
    ({"upstreams": [UPSTREAM], "auth": {"clients": {"registered": [{
        "client_id": "bot", "secret_hash": "scrypt$16384$8$1$c2FsdA==$aGFzaA==", "claims": {"amr": "pwd"}}]}}},
     "auth.clients.registered.0.claims: claim amr must be a list of strings"),
    ({"upstreams": [UPSTREAM], "auth": {"clients": {"registered": [{
        "client_id": "bot", "secret_hash": "scrypt$16384$8$1$c2FsdA==$aGFzaA==", "claims": {"amr": ["otp"]}}]}}},
     "auth.clients.registered.0.claims: amr is not configured"),
    ({"upstreams": [UPSTREAM, {**UPSTREAM, "name": "other"}]}, "share path"),
    ({"upstreams": [{**UPSTREAM, "headers": {"Host": "x"}}]}, "upstreams.0.headers: the gateway sets Host"),
    ({"upstreams": [UPSTREAM], "auth": {"anonymous_role": "nobody"}}, "anonymous_role 'nobody' is not a role"),
    ({"upstreams": [{**UPSTREAM, "headers": {"X-Key": "a\r\nX-Evil: 1"}}]}, "contains a line break"),
    ({"upstreams": [{**UPSTREAM, "headers": {"X Key": "a"}}]}, "is not a valid header name"),
    ({"upstreams": [UPSTREAM], "allowed_origins": ["http://a.example/path"]}, "is not an origin"),
    ({"upstreams": [UPSTREAM, {**UPSTREAM, "name": "b", "path": "/b"}], "auth": {"resource": "http://a.example/x"}},
     "auth.resource names one protected resource"),
    ({"upstreams": [UPSTREAM], "auth": {"resource": "http://a.example/x?q=1"}}, "auth.resource: must be an absolute"),
    ({"upstreams": [UPSTREAM], "auth": {"introspection": {"url": "http://a.example/i", "client_id": "gw"}}},
     "auth.introspection.client_secret: Field required"),
    ({"upstreams": [UPSTREAM], "auth": {"introspection": {"url": "http://a.example/i", "client_id": "gw",
                                                          "client_secret": "${INTROSPECTION_SECRET_UNSET}"}}},
     "environment variable INTROSPECTION_SECRET_UNSET is not set"),
    ({"upstreams": [{**UPSTREAM, "headers": {"X-Key": "${NOT_SET_ANYWHERE}"}}]},
     "upstreams.0.headers.X-Key: environment variable NOT_SET_ANYWHERE is not set"),
    ({"upstreams": [{**UPSTREAM, "oauth": {**OAUTH, "token_url": "http://auth.example/token"}}]},
     "upstreams.0.oauth.token_url: must be an https:// URL (plain http only on a loopback address)"),
    ({"upstreams": [{**UPSTREAM, "oauth": {**OAUTH, "grant": "password"}}]},
     "upstreams.0.oauth.grant: Input should be 'client_credentials' or 'token_exchange'"),
    ({"upstreams": [{**UPSTREAM, "oauth": OAUTH, "headers": {"Authorization": "Bearer x"}}]},
     "oauth and an Authorization header"),
    ({"upstreams": [{"name": "s", "path": "/s", "command": ["server"], "oauth": OAUTH}]},
     "oauth: only for an HTTP upstream"),
    ({"upstreams": [{**UPSTREAM, "oauth": {**OAUTH, "grant": "token_exchange"}}]},
     "token_exchange needs token_url or issuer"),
    # the lifetime of a token issue-token (without --ttl) and POST /oauth/token sign: at most a day, as --ttl's
    ({"upstreams": [UPSTREAM], "auth": {"clients": {"token_ttl_s": 86401}}},
     "auth.clients.token_ttl_s: Input should be less than or equal to 86400"),
]


@pytest.mark.parametrize(("config", "problem"), BAD, ids=[p for _, p in BAD])
def test_bad_config_names_file_key_and_why(tmp_path: Path, config: dict[str, object], problem: str) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(line.startswith(f"{path}: ") and problem in line for line in raised.value.problems), raised.value


BAD_POLICY = [
    ({"roles": {}}, "roles: needs at least 1 item(s)"),
    ({"roles": {"a": {"inherits": ["b"]}}}, "inherits unknown role 'b'"),
    ({"roles": {"a": {"inherits": ["b"]}, "b": {"inherits": ["a"]}}}, "cycle"),
    ({"roles": {"a": {}}, "bindings": [{"when": {}, "roles": ["a"]}]}, "at least one of"),
    ({"roles": {"a": {}}, "bindings": [{"when": {"scope": "s"}, "roles": ["z"]}]}, "unknown role 'z'"),
    ({"roles": {"a": {"permissions": {"can_fly": True}}}}, "roles.a.permissions.can_fly: unknown key"),
    ({"roles": {"a": {}}, "deny_detail": "all"}, "deny_detail: Input should be 'minimal' or 'explain'"),
]


@pytest.mark.parametrize(("policy", "problem"), BAD_POLICY, ids=[p for _, p in BAD_POLICY])
def test_bad_policy_is_reported_through_the_config(tmp_path: Path, policy: object, problem: str) -> None:
    path = write(tmp_path, {"upstreams": [UPSTREAM]}, policy)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(line.startswith(f"{tmp_path / 'policy.yaml'}: ") and problem in line
               for line in raised.value.problems), raised.value


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("upstreams:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"gateway.yaml: line \d+: invalid YAML"):
        load_config(path)


URLS_WITH_CREDENTIALS = [
    ({"upstreams": [{**UPSTREAM, "url": "http://user:s3cret@127.0.0.1:9000/mcp"}]}, "upstreams.0.url"),
    ({"upstreams": [{**UPSTREAM, "url": "https://s3cret@mcp.example/mcp"}]}, "upstreams.0.url"),
    ({"upstreams": [UPSTREAM], "auth": {"introspection": {
        "url": "https://gw:s3cret@idp.example/introspect", "client_id": "gw", "client_secret": "x"}}},
     "auth.introspection.url"),
]


@pytest.mark.parametrize(("config", "key"), URLS_WITH_CREDENTIALS,
                         ids=["upstream user and password", "upstream user only", "introspection"])
def test_credentials_in_a_url_are_refused_pointing_to_the_headers(tmp_path: Path, config: dict[str, object],
                                                                  key: str) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(line.startswith(f"{path}: {key}: must not carry credentials (user:password@)")
               and "upstreams[].headers (e.g. Authorization: Basic ...)" in line
               for line in raised.value.problems), raised.value
    assert "s3cret" not in str(raised.value)


TWO_UPSTREAMS = """\
policy: policy.yaml
upstreams:
  - {name: demo, path: /mcp, url: "http://127.0.0.1:9000/mcp"}
upstreams:
  - {name: other, path: /other, url: "http://127.0.0.1:9001/mcp"}
"""
NESTED_TWICE = """\
policy: policy.yaml
upstreams:
  - name: demo
    path: /mcp
    url: "http://127.0.0.1:9000/mcp"
    headers: {X-Api-Key: first}
    path: /other
"""
TWO_BINDINGS = """\
roles:
  reader: {permissions: {can_execute_tools: [search]}}
bindings:
  - {when: {scope: "mcp:tools"}, roles: [reader]}
bindings:
  - {when: {scope: "mcp:admin"}, roles: [reader]}
"""
GOOD_POLICY = yaml.safe_dump(DEFAULT_POLICY)
GOOD_CONFIG = yaml.safe_dump({"policy": "policy.yaml", "upstreams": [UPSTREAM]})
DUPLICATES = [  # (config text, policy text, the file named, the problem after its name)
    (TWO_UPSTREAMS, GOOD_POLICY, "gateway.yaml", "line 4: invalid YAML: duplicate key 'upstreams' (first at line 2)"),
    (NESTED_TWICE, GOOD_POLICY, "gateway.yaml", "line 7: invalid YAML: duplicate key 'path' (first at line 4)"),
    (GOOD_CONFIG, TWO_BINDINGS, "policy.yaml", "line 5: invalid YAML: duplicate key 'bindings' (first at line 3)"),
]


@pytest.mark.parametrize(("config", "policy", "file", "problem"), DUPLICATES,
                         ids=["two upstreams", "path twice in one upstream", "two bindings in the policy"])
def test_a_key_given_twice_is_refused_with_its_line_not_silently_replaced(
        tmp_path: Path, config: str, policy: str, file: str, problem: str) -> None:
    (tmp_path / "policy.yaml").write_text(policy)
    path = tmp_path / "gateway.yaml"
    path.write_text(config)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [f"{tmp_path / file}: {problem}"]
    checked = cli("check-config", "--config", str(path))
    assert checked.returncode == 2
    assert checked.stderr.splitlines() == [f"{tmp_path / file}: {problem}"]


def test_merge_keys_still_work_and_a_key_beside_a_merge_overrides_it(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(GOOD_POLICY)
    path = tmp_path / "gateway.yaml"
    path.write_text("""\
policy: policy.yaml
upstreams:
  - &demo {name: demo, path: /mcp, url: "http://127.0.0.1:9000/mcp", headers: {X-Api-Key: shared}}
  - <<: *demo
    name: other
    path: /other
""")
    demo, other = load_config(path).upstreams
    assert (other.name, other.path, other.url, other.headers) == ("other", "/other", demo.url, demo.headers)


def test_environment_variables_and_defaults_expand(tmp_path: Path) -> None:
    headers = {"X-Key": "${KEY}", "X-Other": "${NOPE:-fallback}"}
    path = write(tmp_path, {"upstreams": [{**UPSTREAM, "headers": headers}]})
    config = load_config(path, env={"KEY": "s3cret"})
    assert config.upstreams[0].headers == {"X-Key": "s3cret", "X-Other": "fallback"}
    assert config.auth.clients.signing_key_file == tmp_path / "gateway-signing-key.pem"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_check_config_accepts_the_example_and_every_shipped_policy() -> None:
    done = cli("check-config", "--config", "config.example.yaml")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_check_config_and_serve_refuse_a_bad_config_with_the_same_lines(tmp_path: Path) -> None:
    path = write(tmp_path, {"upstreams": [{**UPSTREAM, "url": "ftp://x"}], "listn": 1})
    checked = cli("check-config", "--config", str(path))
    served = cli("serve", "--config", str(path))
    assert checked.returncode == served.returncode == 2
    assert checked.stderr == served.stderr
    assert sorted(checked.stderr.splitlines()) == sorted([
        f"{path}: listn: unknown key",
        f"{path}: upstreams.0.url: must be an http:// or https:// URL",
    ])


def test_serve_requires_an_upstream_url(tmp_path: Path) -> None:
    path = write(tmp_path, {"upstreams": [{"name": "demo", "path": "/mcp"}]})
    done = cli("serve", "--config", str(path))
    assert done.returncode == 2
    assert f"{path}: upstreams.0.url: required to run as a reverse proxy" in done.stderr


@pytest.mark.parametrize(("sessions", "given", "store"), [
    ({}, None, ("sqlite", None)),
    ({"backend": "redis", "url": "redis://10.0.0.5:6379/2"}, None, ("redis", "redis://10.0.0.5:6379/2")),
    ({"backend": "redis", "url": "redis://10.0.0.5:6379/2"}, {"backend": "sqlite"}, ("sqlite", None)),
])
def test_runtime_roles_live_with_the_sessions_unless_told_otherwise(
        tmp_path: Path, sessions: dict[str, str], given: dict[str, str] | None, store: tuple[str, str | None]) -> None:
    """Replicas (sessions in Redis) share their role assignments by default: one granted or withdrawn through one
    replica holds on the others."""
    config = load_config(write(tmp_path, {"upstreams": [UPSTREAM], "sessions": sessions,
                                          **({"role_assignments": given} if given else {})}))
    assert (config.role_assignments.backend, config.role_assignments.url) == store
