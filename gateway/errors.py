"""Every way the gateway refuses a request, in one table.

Each row is a `Refusal`: the HTTP status, the JSON-RPC error code, the audit
`result` it is recorded under, and the message a client sees. The middleware,
the proxy, the audit log and the tests all name refusals from here, so a
reader sees the whole catalogue in one screen:

    invalid_request   PAYLOAD_TOO_LARGE     413  -32600  body over limits.max_body_bytes
                      PARSE_ERROR           400  -32700  body is not JSON
                      INVALID_REQUEST       400  -32600  JSON but not JSON-RPC 2.0 / too deep / bad batch
                      HEADER_MISMATCH       400  -32020  2026-07-28 routing headers missing or != body
                      BAD_CONTENT_TYPE      415  -32600  POST body not application/json
                      METHOD_NOT_ALLOWED    405  -32600  HTTP method other than POST, GET, DELETE
                      FORBIDDEN_ORIGIN      403  -32600  Origin not public_url's nor allowed
                      INVALID_PARAMS        400  -32602  known method, unreadable target (tools/call w/o name)
                      NOT_FOUND             404  -32602  admin API: no such token session, approval, assignment
                      CONFLICT              409  -32600  admin API: an approval decided by someone else meanwhile
                      REQUEST_TIMEOUT       408  -32600  body not received within limits.client_body_timeout_s
    auth_failed       UNAUTHORIZED          401  -32001  no / bad / expired / revoked token
    denied            FORBIDDEN             403  -32011  policy refused (AuthorizationDenied); with an
                                                           insufficient_scope challenge when a scope would grant it
                      SECURITY_LEVEL        401  -32012  authentication too weak for the item's level (RFC 9470 step-up)
                      INVALID_SESSION       403  -32013  legacy session id bound to another principal (hijack)
                      UNKNOWN_SESSION       404  -32013  legacy session id the gateway never bound, or ended
                      UNKNOWN_TARGET        400  -32602  refused target hidden from the caller (deny_detail:
                                                           minimal); 200 in the legacy era, as upstreams answer there
                      APPROVAL_REQUIRED     403  -32014  a call that needs a person's approval, not yet given (mode
                                                           retry; error.data.approval_id names the request)
                      APPROVAL_DENIED       403  -32015  an approver denied this very call
                      APPROVAL_EXPIRED      403  -32016  nobody decided in time, or the approved call was not made
                                                           again before the approval ran out
                      TOOL_UNAPPROVED       403  -32017  pinning enforce: the tool's definition is new or changed
                                                           since an operator approved it (`pinning`)
                      METHOD_NOT_FOUND      404  -32601  unknown method refused by policy
                      UNKNOWN_TASK          400  -32602  a task of another principal, or none: answered as an
                                                           upstream answers an unknown task; 200 in the legacy era
                      UNSOLICITED_RESPONSE  400  -32600  a client's JSON-RPC response that answers no server
                                                           request the gateway passed to this principal, or
                                                           answers it with another kind of result
    rate_limited      RATE_LIMITED          429  -32018  over a rate limit (`rate_limits`): Retry-After, and
                                                           error.data.retry_after_s
    error             AUDIT_UNAVAILABLE     503  -32053  audit queue full: refused rather than unaudited
                      STATE_UNAVAILABLE     503  -32054  session store (Redis) unreachable: sessions, tasks and
                                                           revocations cannot be checked, so nothing is served
    upstream_error    UPSTREAM_UNAVAILABLE  502  -32050  connect refused / reset / bad answer
                      UNINSPECTABLE         502  -32052  answer that cannot be read: not JSON, an SSE event that is
                                                           not JSON, over limits.max_inspected_bytes (an upstream
                                                           4xx status is kept, its body replaced)
                      UPSTREAM_TIMEOUT      504  -32051  no answer within limits.upstream_timeout_s
                      UPSTREAM_BUSY         503  -32055  a stdio upstream runs process.max_processes processes
                                                           already, none of them the caller's
                      UPSTREAM_CREDENTIAL   502  -32056  upstreams[].oauth: no token could be obtained for the
                                                           upstream, or it answered 401 to the gateway's (the token
                                                           is dropped; the call is not replayed)
    error             INTERNAL              500  -32603  a bug in the gateway (logged, never a traceback)

JSON-RPC codes in -32000..-32099 are "implementation defined server errors";
the MCP specification reserves -32020..-32022 and -32042, which are used only
with the meaning the specification gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.exceptions import GatewayError

JsonRpcId = str | int | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """One row of the catalogue: how a class of refusal looks on the wire and in the audit log."""

    name: str
    http_status: int
    code: int
    audit_result: str
    message: str


PAYLOAD_TOO_LARGE = Refusal("payload_too_large", 413, -32600, "invalid_request", "Request body too large")
PARSE_ERROR = Refusal("parse_error", 400, -32700, "invalid_request", "Parse error")
INVALID_REQUEST = Refusal("invalid_request", 400, -32600, "invalid_request", "Invalid Request")
HEADER_MISMATCH = Refusal("header_mismatch", 400, -32020, "invalid_request", "Header mismatch")
BAD_CONTENT_TYPE = Refusal("bad_content_type", 415, -32600, "invalid_request", "Content-Type must be application/json")
METHOD_NOT_ALLOWED = Refusal("method_not_allowed", 405, -32600, "invalid_request", "Method not allowed")
FORBIDDEN_ORIGIN = Refusal("forbidden_origin", 403, -32600, "invalid_request", "Forbidden origin")
INVALID_PARAMS = Refusal("invalid_params", 400, -32602, "invalid_request", "Invalid params")
NOT_FOUND = Refusal("not_found", 404, -32602, "invalid_request", "Not found")
CONFLICT = Refusal("conflict", 409, -32600, "invalid_request", "Conflict")
REQUEST_TIMEOUT = Refusal("request_timeout", 408, -32600, "invalid_request", "Request body not received in time")
UNAUTHORIZED = Refusal("unauthorized", 401, -32001, "auth_failed", "Unauthorized")
FORBIDDEN = Refusal("forbidden", 403, -32011, "denied", "Forbidden")
SECURITY_LEVEL = Refusal("security_level", 401, -32012, "denied", "Stronger authentication required")
INVALID_SESSION = Refusal("invalid_session", 403, -32013, "denied", "Invalid session")
UNKNOWN_SESSION = Refusal("unknown_session", 404, -32013, "denied", "Session not found")
APPROVAL_REQUIRED = Refusal("approval_required", 403, -32014, "denied", "Approval required")
APPROVAL_DENIED = Refusal("approval_denied", 403, -32015, "denied", "Approval denied")
APPROVAL_EXPIRED = Refusal("approval_expired", 403, -32016, "denied", "Approval expired")
TOOL_UNAPPROVED = Refusal("tool_unapproved", 403, -32017, "denied", "Tool definition not approved")
RATE_LIMITED = Refusal("rate_limited", 429, -32018, "rate_limited", "Rate limit exceeded")
# The message is the upstream's own wording for a missing item ("Unknown tool: X"), filled in per call.
UNKNOWN_TARGET = Refusal("unknown_target", 400, -32602, "denied", "Unknown")
METHOD_NOT_FOUND = Refusal("method_not_found", 404, -32601, "denied", "Method not found")
# The wording upstreams (the TypeScript and Python SDKs) use for a task id they do not know.
UNKNOWN_TASK = Refusal("unknown_task", 400, -32602, "denied", "Failed to retrieve task: Task not found")
UNSOLICITED_RESPONSE = Refusal("unsolicited_response", 400, -32600, "denied",
                               "Response to no request the gateway passed on")
UPSTREAM_UNAVAILABLE = Refusal("upstream_unavailable", 502, -32050, "upstream_error", "Upstream unavailable")
UPSTREAM_TIMEOUT = Refusal("upstream_timeout", 504, -32051, "upstream_error", "Upstream timed out")
UNINSPECTABLE = Refusal("uninspectable", 502, -32052, "upstream_error", "Upstream answer cannot be inspected")
UPSTREAM_BUSY = Refusal("upstream_busy", 503, -32055, "upstream_error", "Upstream busy: no process free")
UPSTREAM_CREDENTIAL = Refusal("upstream_credential", 502, -32056, "upstream_error",
                              "The upstream's credential could not be obtained or was refused")
AUDIT_UNAVAILABLE = Refusal("audit_unavailable", 503, -32053, "error", "Service unavailable")
STATE_UNAVAILABLE = Refusal("state_unavailable", 503, -32054, "error", "Service unavailable: shared state unreachable")
INTERNAL = Refusal("internal", 500, -32603, "error", "Internal error")

CATALOGUE: tuple[Refusal, ...] = (
    PAYLOAD_TOO_LARGE,
    PARSE_ERROR,
    INVALID_REQUEST,
    HEADER_MISMATCH,
    BAD_CONTENT_TYPE,
    METHOD_NOT_ALLOWED,
    FORBIDDEN_ORIGIN,
    INVALID_PARAMS,
    NOT_FOUND,
    CONFLICT,
    REQUEST_TIMEOUT,
    UNAUTHORIZED,
    FORBIDDEN,
    SECURITY_LEVEL,
    INVALID_SESSION,
    UNKNOWN_SESSION,
    APPROVAL_REQUIRED,
    APPROVAL_DENIED,
    APPROVAL_EXPIRED,
    TOOL_UNAPPROVED,
    RATE_LIMITED,
    UNKNOWN_TARGET,
    METHOD_NOT_FOUND,
    UNKNOWN_TASK,
    UNSOLICITED_RESPONSE,
    AUDIT_UNAVAILABLE,
    STATE_UNAVAILABLE,
    UPSTREAM_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
    UNINSPECTABLE,
    UPSTREAM_BUSY,
    UPSTREAM_CREDENTIAL,
    INTERNAL,
)


class GatewayRefusal(GatewayError):
    """Raised inside the gateway to refuse the request being handled.

    `detail` is what the client is told after the catalogue message (it must
    never carry policy internals unless the operator allows it); `reason` is
    what the audit log records, always.
    """

    def __init__(self, refusal: Refusal, detail: str = "", *, reason: str = "") -> None:
        super().__init__(f"{refusal.name}: {detail or refusal.message}")
        self.refusal = refusal
        self.detail = detail
        self.reason = reason or refusal.name


class StateUnavailable(GatewayRefusal):
    """The shared state store cannot be reached: what depends on it is refused (503), not assumed."""

    def __init__(self, why: str) -> None:
        super().__init__(STATE_UNAVAILABLE, reason=f"state_unavailable:{why}")


def error_object(refusal: Refusal, detail: str = "") -> dict[str, Any]:
    """The JSON-RPC `error` member for a refusal."""
    message = f"{refusal.message}: {detail}" if detail else refusal.message
    return {"code": refusal.code, "message": message}


def error_body(refusal: Refusal, request_id: JsonRpcId = None, detail: str = "") -> bytes:
    """A complete JSON-RPC error response, serialised."""
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": error_object(refusal, detail)})
