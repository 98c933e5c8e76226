"""The deployment files (issue 17): deploy/compose.yaml with what it mounts, and deploy/kubernetes/.

No Docker daemon and no cluster run here, so each file is held to what can be checked without them: the schemas
PyPI packages ship (Kubernetes: kubernetes-validate; Compose: the Compose Specification's, vendored by
check-jsonschema), the references between files (every mounted file exists, every selector selects, every probe
and scrape path is a route the gateway answers), the gateways' config as a container or pod sees it passing the
real `mcp-gateway check-config`, the compose `init` service's command run as its container would run it, the
Kubernetes README's openssl commands making keys the gateway accepts, and nginx's own `nginx -t`.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import jwt
import kubernetes_validate
import pytest
import referencing
import yaml

from gateway import create_app, load_config
from gateway.audit.chainkey import read_chain_key
from gateway.auth.keys import load_signing_key
from tests.harness import ROOT, ServerThread, build_server, write_config
from tests.test_container import environment, instructions

DEPLOY, KUBERNETES = ROOT / "deploy", ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent  # the interpreter and `mcp-gateway` that `make install` installed
KUBERNETES_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())  # the oldest we claim, the newest known


# ---- reading the files -------------------------------------------------------------------------------------------

def image_user() -> str:
    return next(rest for word, rest in instructions() if word == "USER")


def image_config_files() -> dict[str, Path]:
    """What the image COPYs into /etc/mcp-gateway: {path in the image: file in the repository}."""
    copies = (shlex.split(rest) for word, rest in instructions() if word == "COPY")
    return {dst: ROOT / src for *sources, dst in copies if dst.startswith("/etc/mcp-gateway/") for src in sources}


def image_config_path() -> str:
    cmd = json.loads(next(rest for word, rest in instructions() if word == "CMD"))
    return str(cmd[cmd.index("--config") + 1])


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any, unset: list[str]) -> Any:
    """Compose's `${VAR:-default}` with nothing set in the environment: what a bare `docker compose up` runs."""
    if isinstance(value, str):

        def default(match: re.Match[str]) -> str:
            if match.group(2) is None:
                unset.append(match.group(1))
            return match.group(2) or ""

        return _COMPOSE_VAR.sub(default, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, unset) for v in value]
    return value


def compose() -> dict[str, Any]:
    unset: list[str] = []
    project = _interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), unset)
    assert not unset, f"compose.yaml: variables without a default (empty in a bare `up`): {unset}"
    return dict(project)


SERVICES: dict[str, dict[str, Any]] = compose()["services"]
GATEWAYS = sorted(name for name in SERVICES if re.fullmatch(r"gateway-\d+", name))


def mounts(service: str) -> dict[str, tuple[str, bool]]:
    """{path in the container: (source, read only)}; a source starting with . or / is a file of the repository."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        if isinstance(spec, dict):
            out[spec["target"]] = (spec["source"], bool(spec.get("read_only")))
        else:
            source, target, *mode = spec.split(":")
            out[target] = (source, "ro" in mode)
    return out


def binds(service: str) -> dict[str, Path]:
    """{path in the container: file of the repository} of the files a service mounts."""
    return {target: (DEPLOY / source).resolve() for target, (source, _) in mounts(service).items()
            if source.startswith((".", "/"))}


def published(service: str) -> dict[int, int]:
    """{container port: host port} of a service's published ports."""
    out = {}
    for spec in SERVICES[service].get("ports", []):
        *_, host, inside = str(spec).split(":")
        out[int(inside)] = int(host)
    return out


def one_shot(service: str) -> bool:
    return SERVICES[service].get("restart") == "no"


def manifests() -> dict[str, dict[str, Any]]:
    """{kind: manifest} of every resource kustomization.yaml lists (one resource of a kind here)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    documents = [d for f in kustomization["resources"] for d in yaml.safe_load_all((KUBERNETES / f).read_text())]
    kinds = [d["kind"] for d in documents]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in documents}


def pod() -> dict[str, Any]:
    return dict(manifests()["Deployment"]["spec"]["template"]["spec"])


def container() -> dict[str, Any]:
    (only,) = pod()["containers"]
    return dict(only)


def volume(name: str) -> dict[str, Any]:
    return next(v for v in pod()["volumes"] if v["name"] == name)


def readme_commands() -> list[str]:
    """The shell commands of deploy/kubernetes/README.md's code blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", (KUBERNETES / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def readme_secret() -> tuple[str, dict[str, str]]:
    """The Secret the README's `kubectl create secret generic` makes: its name, {key: literal value or file}."""
    words = shlex.split(next(c for c in readme_commands() if c.startswith("kubectl create secret generic")))
    keys = {}
    for word in words[5:]:
        option, _, value = word.partition("=")
        key, sep, rest = value.partition("=")
        if option == "--from-literal":
            keys[key] = rest
        elif option == "--from-file":
            keys[key if sep else Path(value).name] = rest if sep else value
    return words[4], keys


def relocated(text: str, root: Path) -> str:
    """A file of the container, with the container's absolute paths moved under `root`."""
    return text.replace("/etc/mcp-gateway", f"{root}/etc/mcp-gateway").replace(
        "/var/lib/mcp-gateway", f"{root}/var/lib/mcp-gateway")


def lay_out(root: Path, files: dict[str, str]) -> Path:
    """A container's configuration directory under `root`: {path in the container: its text}; the data directory."""
    for path, text in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(relocated(text, root))
    (root / environment()["MCP_GATEWAY_DATA_DIR"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    return root / image_config_path().lstrip("/")


def container_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment a process of the image sees: its ENV, then `env`; this interpreter's bin first on PATH."""
    return {**{k: relocated(v, root) for k, v in environment().items()}, **env, "HOME": str(root),
            "PATH": f"{BIN}:/usr/bin:/bin"}


def check_config(config: Path, env: dict[str, str]) -> None:
    checked = subprocess.run([str(BIN / "mcp-gateway"), "check-config", "--config", str(config)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert ": OK (" in checked.stdout


# ---- the compose stack ---------------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    # the Compose Specification's JSON schema, as check-jsonschema (a dev dependency) vendors it
    vendored = importlib.metadata.distribution("check-jsonschema").locate_file(
        "check_jsonschema/builtin_schemas/vendor/compose-spec.json")
    validator = jsonschema.Draft202012Validator(json.loads(Path(str(vendored)).read_text()))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors


def test_the_stack_has_two_gateways_behind_nginx_and_what_they_share() -> None:
    assert GATEWAYS == ["gateway-1", "gateway-2"]
    assert all(SERVICES[g] == SERVICES["gateway-1"] for g in GATEWAYS), "replicas differ in nothing"
    assert set(SERVICES) == {*GATEWAYS, "init", "nginx", "redis", "postgres", "prometheus", "grafana", "everything"}


def test_every_service_but_the_one_shot_init_has_a_health_check() -> None:
    assert [name for name in SERVICES if one_shot(name)] == ["init"]
    for name, service in SERVICES.items():
        check = service.get("healthcheck", {})
        if one_shot(name):
            assert not check, f"{name} exits: a health check would never pass"
        else:
            assert check.get("test", ["NONE"])[0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name


@pytest.mark.parametrize(("service", "needs"), [
    *((g, {"init", "redis", "postgres", "everything"}) for g in GATEWAYS),
    ("nginx", set(GATEWAYS)),
    ("grafana", {"prometheus"}),
])
def test_services_start_once_what_they_need_is_healthy_or_done(service: str, needs: set[str]) -> None:
    depends_on = SERVICES[service].get("depends_on", {})
    assert isinstance(depends_on, dict) and needs <= set(depends_on)
    for name, how in depends_on.items():
        expected = "service_completed_successfully" if one_shot(name) else "service_healthy"
        assert how.get("condition") == expected, f"{service} -> {name}"


def test_gateways_run_the_repositorys_image_read_only_as_its_unprivileged_user() -> None:
    for name in [*GATEWAYS, "init"]:
        service = SERVICES[name]
        assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["image"] == SERVICES["gateway-1"]["image"]
        assert service["user"] == image_user() == "10001:10001"
        assert service["read_only"] is True
        assert "/tmp" in [t.split(":")[0] for t in service["tmpfs"]]
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]


def test_gateways_read_one_config_and_one_key_volume_that_init_fills() -> None:
    config = yaml.safe_load((DEPLOY / "compose" / "gateway.yaml").read_text())
    key_files = {config["auth"]["clients"]["signing_key_file"], config["audit"]["chain_key_file"]}
    (key_dir,) = {str(Path(k).parent) for k in key_files}
    volumes = {mounts(g)[key_dir] for g in GATEWAYS}
    assert len(volumes) == 1, "every gateway mounts the same keys"
    ((key_volume, read_only),) = volumes
    assert read_only and key_volume in compose()["volumes"]
    init = mounts("init")
    assert init[key_dir] == (key_volume, False)
    # the image's data directory, whose owner and mode a new volume takes: without it the volume is root's
    assert init[environment()["MCP_GATEWAY_DATA_DIR"]] == (key_volume, False)
    for name in [*GATEWAYS, "init"]:
        assert binds(name)[image_config_path()] == DEPLOY / "compose" / "gateway.yaml"


def test_every_file_a_service_mounts_is_in_the_repository() -> None:
    for name in SERVICES:
        for target, source in binds(name).items():
            assert source.is_file(), f"{name}: {source} (at {target}) does not exist"


def compose_gateway_env(root: Path) -> dict[str, str]:
    return container_env(root, SERVICES["gateway-1"]["environment"])


def compose_gateway_layout(root: Path) -> Path:
    """/etc/mcp-gateway of a compose gateway: the image's files, then the files the service mounts over them."""
    files = {dst: src.read_text() for dst, src in image_config_files().items()}
    files |= {target: source.read_text() for target, source in binds("gateway-1").items()}
    return lay_out(root, files)


def test_the_compose_gateways_config_passes_check_config_as_the_container_sees_it(tmp_path: Path) -> None:
    check_config(compose_gateway_layout(tmp_path), compose_gateway_env(tmp_path))


def test_the_compose_gateways_config_names_the_stacks_services(tmp_path: Path) -> None:
    config = load_config(compose_gateway_layout(tmp_path), compose_gateway_env(tmp_path))
    assert urlsplit(config.public_url).port == published("nginx")[8080]
    assert config.sessions.backend == "redis" and urlsplit(config.sessions.url).hostname == "redis"
    postgres = SERVICES["postgres"]["environment"]
    (sink,) = config.audit.sinks
    for dsn in (sink.dsn, config.role_assignments.dsn):
        url = urlsplit(dsn)
        assert (url.hostname, url.username, url.password, url.path) == (
            "postgres", postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], f"/{postgres['POSTGRES_DB']}")
    (upstream,) = config.upstreams
    url = urlsplit(upstream.url)
    assert (url.hostname, str(url.port), url.path) == ("everything", SERVICES["everything"]["environment"]["PORT"],
                                                       "/mcp")


def test_init_makes_the_keys_once_and_prints_a_token_the_gateways_accept(tmp_path: Path) -> None:
    init = SERVICES["init"]
    config_path = compose_gateway_layout(tmp_path)
    argv = [*init["entrypoint"], relocated(init["command"][0], tmp_path)]
    env = container_env(tmp_path, init["environment"])

    def run() -> str:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1]

    config = load_config(config_path, env)
    first = run()
    keys = [config.auth.clients.signing_key_file, config.audit.chain_key_file]
    made = [k.read_bytes() for k in keys]
    second = run()
    assert [k.read_bytes() for k in keys] == made, "a second `up` keeps the keys"
    read_chain_key(config.audit.chain_key_file)
    public = load_signing_key(config.auth.clients.signing_key_file).public
    for token in (first, second):
        claims = jwt.decode(token, public, algorithms=["ES256"], audience=config.resource_url(config.upstreams[0]))
        assert claims["sub"] == "demo" and "mcp:tools" in claims["scope"].split()


def test_prometheus_scrapes_each_gateway_itself() -> None:
    assert binds("prometheus")["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j.get("metrics_path", "/metrics") == "/metrics"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{g}:8080" for g in GATEWAYS}


def test_grafana_provisions_prometheus_and_the_repositorys_dashboard() -> None:
    provisioned = {target: yaml.safe_load(source.read_text())
                   for target, source in binds("grafana").items() if target.startswith("/etc/grafana/provisioning/")}
    sources = [s for f in provisioned.values() for s in f.get("datasources", [])]
    providers = [p for f in provisioned.values() for p in f.get("providers", [])]
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    wanted = next(v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    (source,) = [s for s in sources if s["type"] == wanted]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port == 9090 and source["isDefault"]
    (provider,) = providers
    assert provider["type"] == "file"
    (mounted,) = [t for t, source in binds("grafana").items() if source == DEPLOY / "grafana-dashboard.json"]
    assert Path(mounted).parent == Path(provider["options"]["path"])
    assert SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == mounted


NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"


def test_nginx_balances_round_robin_over_every_gateway(tmp_path: Path) -> None:
    assert binds("nginx")["/etc/nginx/nginx.conf"] == NGINX_CONF
    conf = re.sub(r"#.*", "", NGINX_CONF.read_text())
    ((name, block),) = re.findall(r"upstream\s+(\S+)\s*\{(.*?)\}", conf, re.S)
    assert set(re.findall(r"^\s*server\s+(\S+?)[\s;]", block, re.M)) == {f"{g}:8080" for g in GATEWAYS}
    assert not re.search(r"^\s*(ip_hash|hash|least_conn|least_time|random)\b", block, re.M), "round robin"
    assert re.search(rf"proxy_pass\s+http://{name};", conf)
    assert re.search(r"location\s*=\s*/metrics\s*\{\s*return\s+404;", conf), "/metrics stays inside"
    (listen,) = re.findall(r"listen\s+(\d+);", conf)
    assert int(listen) in published("nginx")
    limits = load_config(compose_gateway_layout(tmp_path), compose_gateway_env(tmp_path)).limits
    (body,) = re.findall(r"client_max_body_size\s+(\d+)m;", conf)
    assert int(body) * 1024 * 1024 > limits.max_body_bytes, "the gateway refuses (and audits) a large body"
    (read,) = re.findall(r"proxy_read_timeout\s+(\d+)s;", conf)
    assert int(read) > limits.upstream_timeout_s, "the gateway answers a slow upstream (504) before nginx cuts it"
    assert re.search(r"proxy_buffering\s+off;", conf), "SSE events pass one by one"


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: `make install` installs Debian's nginx-light", pytrace=False)
    # the gateways' names resolve only on the compose network
    (tmp_path / "nginx.conf").write_text(re.sub(r"gateway-\d+:", "127.0.0.1:", NGINX_CONF.read_text()))
    tested = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
                            capture_output=True, text=True, timeout=30)
    assert tested.returncode == 0, tested.stderr


# ---- Kubernetes ----------------------------------------------------------------------------------------------

def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert all("namespace" not in m["metadata"] for m in manifests().values()), "namespace-less"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", sorted(set(manifests()) - {"ServiceMonitor"}))
def test_manifests_validate_against_the_kubernetes_schemas(kind: str, version: str) -> None:
    kubernetes_validate.validate(manifests()[kind], version, strict=True)


def _k8s_definition(name: str) -> jsonschema.protocols.Validator:
    """A validator for one of the Kubernetes API's own definitions (ObjectMeta, LabelSelector, ...)."""
    directory = f"v{KUBERNETES_VERSIONS[-1]}-local-strict"
    definitions = json.loads(Path(kubernetes_validate.__file__).with_name("kubernetes-json-schema").joinpath(
        directory, "_definitions.json").read_text())
    registry = referencing.Registry().with_resource(definitions["$id"], referencing.Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{name}"}, registry=registry)


_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def _seconds(duration: str) -> float:
    units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[ywdhms])", duration))


def test_the_service_monitor_has_what_the_prometheus_operator_requires() -> None:
    """The CRD's schema is not among kubernetes-validate's: its required fields and formats (operator 0.87)."""
    monitor, service = manifests()["ServiceMonitor"], manifests()["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    _k8s_definition("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta").validate(monitor["metadata"])
    spec = monitor["spec"]
    assert {"selector", "endpoints"} <= set(spec)
    _k8s_definition("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector").validate(spec["selector"])
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]], "a named port of the Service"
        assert endpoint["path"] == "/metrics" and endpoint.get("scheme", "http") in ("http", "https")
        assert _DURATION.match(endpoint["interval"]) and _DURATION.match(endpoint["scrapeTimeout"])
        assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"]), "the operator refuses it"


def test_the_pod_runs_unprivileged_with_a_read_only_root_and_bounded_resources() -> None:
    assert manifests()["Deployment"]["spec"]["replicas"] == 2
    security = pod()["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == image_user()
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # the Secret's files are root's: the gateway reads them through their group, and nobody else can
    (keys,) = [v["secret"] for v in pod()["volumes"] if "secret" in v]
    assert security["fsGroup"] == security["runAsGroup"] and keys["defaultMode"] & 0o047 == 0o040
    context = container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]} and not context.get("privileged")
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container()["resources"][bound])
    writable = {m["mountPath"] for m in container()["volumeMounts"] if "emptyDir" in volume(m["name"])}
    assert writable == {"/tmp", environment()["MCP_GATEWAY_DATA_DIR"]}


def test_liveness_asks_healthz_and_readiness_asks_readyz_on_the_gateways_port() -> None:
    probes = {kind: container()[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startup": "/healthz", "liveness": "/healthz", "readiness": "/readyz"}
    (port,) = container()["ports"]
    assert {probe["port"] for probe in probes.values()} <= {port["name"], port["containerPort"]}


def _paths_asked() -> Iterator[str]:
    """Every path a probe, a health check or a scraper asks a gateway for."""
    yield from (container()[f"{kind}Probe"]["httpGet"]["path"] for kind in ("startup", "liveness", "readiness"))
    yield from (e["path"] for e in manifests()["ServiceMonitor"]["spec"]["endpoints"])
    yield from (j.get("metrics_path", "/metrics") for j in yaml.safe_load(
        (DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"])
    for name in [*GATEWAYS, "nginx"]:  # nginx's is passed to a gateway
        yield from re.findall(r"http://127\.0\.0\.1:\d+(/[^'\s]*)", " ".join(SERVICES[name]["healthcheck"]["test"]))


async def test_every_path_asked_is_a_route_the_gateway_answers(tmp_path: Path) -> None:
    upstream = ServerThread(build_server().streamable_http_app()).start()  # /readyz asks whether it is reachable
    app = create_app(write_config(tmp_path, f"{upstream.url}/mcp"))
    app.runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            for path in sorted(set(_paths_asked())):
                assert (await client.get(path)).status_code == 200, path
    finally:
        await app.runtime.close()
        upstream.stop()


def test_the_config_map_is_mounted_as_a_directory_so_policy_edits_reach_the_pods() -> None:
    (mount,) = [m for m in container()["volumeMounts"] if "configMap" in volume(m["name"])]
    assert mount["mountPath"] == str(Path(image_config_path()).parent)
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount never sees an update"
    data = manifests()["ConfigMap"]["data"]
    config = yaml.safe_load(data[Path(image_config_path()).name])
    assert config["policy"] in data and "/" not in config["policy"]
    assert config["policy_reload_interval_s"] > 0


def kubernetes_env() -> dict[str, str]:
    """The Deployment's environment, with the values the README's Secret gives its secretKeyRefs."""
    name, secret = readme_secret()
    env = {}
    for var in container()["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == name, f"{var['name']}: the Secret the README creates is {name}"
            env[var["name"]] = secret[ref["key"]]
    return env


def test_the_config_maps_config_passes_check_config_as_the_pod_sees_it(tmp_path: Path) -> None:
    # The ConfigMap's directory hides the image's own /etc/mcp-gateway: only its files are there.
    config_dir = str(Path(image_config_path()).parent)
    config_path = lay_out(tmp_path, {f"{config_dir}/{name}": text
                                     for name, text in manifests()["ConfigMap"]["data"].items()})
    env = container_env(tmp_path, kubernetes_env())
    check_config(config_path, env)
    config = load_config(config_path, env)
    (keys,) = [m for m in container()["volumeMounts"] if "secret" in volume(m["name"])]
    in_secret = {tmp_path / keys["mountPath"].lstrip("/") / item["path"]
                 for item in volume(keys["name"])["secret"]["items"]}
    assert {config.auth.clients.signing_key_file, config.audit.chain_key_file} == in_secret
    assert keys["readOnly"] is True
    # README ("Running several replicas"): /readyz is 503 while PostgreSQL is down, whatever the policy; a readiness
    # probe on it takes a pod out of service, which only fail_closed (refusing anyway) agrees with
    assert config.audit.on_sink_failure == "fail_closed"


def test_the_secret_the_readme_creates_has_every_key_the_deployment_reads() -> None:
    name, secret = readme_secret()
    keys = volume(next(m["name"] for m in container()["volumeMounts"] if "secret" in volume(m["name"])))["secret"]
    assert keys["secretName"] == name
    read = {i["key"] for i in keys["items"]} | {
        v["valueFrom"]["secretKeyRef"]["key"] for v in container()["env"] if "valueFrom" in v}
    assert read <= set(secret)


def test_the_readmes_openssl_commands_make_keys_the_gateway_accepts(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (Debian: apt-get install openssl)", pytrace=False)
    for command in readme_commands():
        if command.startswith("openssl "):
            made = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert made.returncode == 0, made.stderr
    _, secret = readme_secret()
    load_signing_key(tmp_path / secret["signing-key.pem"])
    read_chain_key(tmp_path / secret["audit-chain.key"])


def test_service_disruption_budget_and_autoscaler_act_on_the_deployments_pods() -> None:
    resources = manifests()
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert resources["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resources["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    (port,) = container()["ports"]
    assert {p["targetPort"] for p in service["ports"]} <= {port["name"], port["containerPort"]}
    budget = resources["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items() and budget["minAvailable"] == 1
    scaler = resources["HorizontalPodAutoscaler"]["spec"]
    target = resources["Deployment"]
    assert scaler["scaleTargetRef"] == {"apiVersion": target["apiVersion"], "kind": target["kind"],
                                        "name": target["metadata"]["name"]}
    assert scaler["minReplicas"] > budget["minAvailable"], "one replica can always be moved"
    assert scaler["maxReplicas"] >= scaler["minReplicas"]
    (metric,) = scaler["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in container()["resources"]["requests"], "CPU utilisation is measured against the request"
