"""A stand-in for the user's browser in the OAuth authorization-code flow against tests/node/oidc.mjs.

Python's `webbrowser` module runs it when the environment has

    BROWSER="<python> /work/main/tests/oidc_browser.py %s"

so argv[1] is the authorization URL. (With that form `webbrowser.open` waits for this program to exit; end the
BROWSER value with " &" to have it run in the background instead.) It plays a user with httpx, keeping cookies and
following redirects by hand: it loads the authorization URL, logs in at /interaction/<uid> as OIDC_LOGIN (default
"alice"), consents when the consent prompt comes, and follows the authorization server's redirects until one leads
away from it: to the client's loopback redirect_uri (http://127.0.0.1:<port>/...). It then loads that URL, and
exits 0 if the client's receiver answered (whatever its status).

Environment:
  OIDC_LOGIN        the subject to log in as (default alice)
  OIDC_TAMPER       change the redirect before loading it: "state" (another state value), "iss" (iss =
                    http://evil.example) or "drop_iss" (no iss)
  OIDC_BROWSER_LOG  a file to which every run appends one JSON line {"authorize_url", "redirect", "status"}
                    (and "error" when it failed)

It never writes to stdout (the program that opened it may use stdout as a protocol channel): errors go to stderr and
the exit code is 1. Every request has a 10 s timeout, and it gives up after a bounded number of steps.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx

TIMEOUT = 10.0
MAX_STEPS = 20
TAMPERS = ("", "state", "iss", "drop_iss")


class BrowserError(Exception):
    pass


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def tamper(url: str, how: str) -> str:
    if not how:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if how == "state":
        query = [(k, v) for k, v in query if k != "state"] + [("state", "tampered-state")]
    elif how == "iss":
        query = [(k, v) for k, v in query if k != "iss"] + [("iss", "http://evil.example")]
    elif how == "drop_iss":
        query = [(k, v) for k, v in query if k != "iss"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def act_on_interaction(client: httpx.Client, response: httpx.Response, login: str) -> httpx.Response:
    """The authorization server's interaction page (JSON from oidc.mjs): submit the login or the consent."""
    try:
        details = response.json()
        prompt = details["prompt"]
    except (ValueError, KeyError, TypeError) as error:
        raise BrowserError(f"{response.url} is not an interaction page: {response.text[:300]!r}") from error
    page = str(response.url).split("?")[0].rstrip("/")
    if prompt == "login":
        return client.post(f"{page}/login", data={"login": login})
    if prompt == "consent":
        return client.post(f"{page}/consent")
    raise BrowserError(f"unexpected prompt {prompt!r} at {page}")


def authorize(authorize_url: str, login: str, how: str) -> tuple[str, int]:
    """Play the user from the authorization URL to the client's redirect_uri; return the URL loaded and its status."""
    server = origin(authorize_url)
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False) as client:
        response = client.get(authorize_url)
        for _ in range(MAX_STEPS):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if origin(location) != server:
                    redirect = tamper(location, how)
                    # the client's own receiver: a separate request, without the authorization server's cookies
                    answer = httpx.get(redirect, timeout=TIMEOUT, follow_redirects=False)
                    return redirect, answer.status_code
                response = client.get(location)
            elif response.status_code == 200 and urlsplit(str(response.url)).path.startswith("/interaction/"):
                response = act_on_interaction(client, response, login)
            else:
                raise BrowserError(f"{response.status_code} from {response.url}: {response.text[:300]!r}")
        raise BrowserError(f"no redirect to the client after {MAX_STEPS} steps")


def log(entry: dict[str, Any]) -> None:
    path = os.environ.get("OIDC_BROWSER_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


def main(argv: list[str]) -> int:
    sys.stdout = sys.stderr  # nothing this program does may reach the opener's stdout
    if len(argv) != 2:
        print("usage: oidc_browser.py AUTHORIZATION_URL", file=sys.stderr)
        return 1
    authorize_url = argv[1]
    entry: dict[str, Any] = {"authorize_url": authorize_url, "redirect": None, "status": None}
    how = os.environ.get("OIDC_TAMPER", "")
    try:
        if how not in TAMPERS:
            raise BrowserError(f"OIDC_TAMPER must be one of {TAMPERS[1:]}, not {how!r}")
        entry["redirect"], entry["status"] = authorize(authorize_url, os.environ.get("OIDC_LOGIN", "alice"), how)
    except (BrowserError, httpx.HTTPError, OSError) as error:
        entry["error"] = f"{type(error).__name__}: {error}"
        print(f"oidc_browser: {entry['error']}", file=sys.stderr)
        log(entry)
        return 1
    log(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
