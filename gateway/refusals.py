"""How a refusal is answered: HTTP status, JSON-RPC error body and challenge, by outcome, era and `deny_detail`.

Owns the shape of every refusal of a client's request: a whole request refused
(`GatewayRefusal`: bad input, failed authentication, a session that is not the
caller's), one message refused by policy (`denial`), the answer to a request
whose every message was refused (`answer_denials`), and which refusal an
unreadable body is (`unreadable`). Pure: values in, values out; the error
bodies themselves are built by `errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway import errors
from gateway.approvals.model import MAX_ARGUMENTS_BYTES
from gateway.ratelimit.gate import STORE_UNAVAILABLE

if TYPE_CHECKING:
    from gateway.approvals import Verdict
    from gateway.jsonrpc import JsonRpcId
    from gateway.mcp import Era, Invalid, Operation
    from gateway.policy.engine import Decision

Headers = list[tuple[bytes, bytes]]
# What the client is told that an unknown target is, in the upstream's own words ("Unknown tool: X").
_UNKNOWN_WORD = {"tool_call": "tool", "prompt_get": "prompt", "resource_read": "resource",
                 "resource_subscribe": "resource", "resource_unsubscribe": "resource"}


class Challenger(Protocol):
    """Builds a `WWW-Authenticate` value for a resource (the authenticator does)."""

    def challenge(self, upstream_path: str, error: str | None = None, *, description: str | None = None,
                  scope: str | None = None, acr_values: str | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class Denial:
    """How one refused message is answered: HTTP status and body (when it is the only message), challenge."""

    status: int
    body: bytes
    challenge: str | None = None
    answerable: bool = True  # a request: in a batch its error is part of the answer (a notification's is not)
    retry_after: int | None = None  # seconds, for a `Retry-After` header when it is the only message


def unreadable(invalid: Invalid) -> errors.GatewayRefusal:
    """The refusal for a body `mcp.read_request` could not act on."""
    why = invalid.why
    if invalid.kind == "parse":
        return errors.GatewayRefusal(errors.PARSE_ERROR, reason=f"parse:{why}")
    if invalid.kind == "invalid":
        return errors.GatewayRefusal(errors.INVALID_REQUEST, why, reason=f"invalid:{why}")
    if invalid.kind == "batch":
        return errors.GatewayRefusal(errors.INVALID_REQUEST, why, reason="batch_not_allowed")
    if invalid.kind == "header_mismatch":
        return errors.GatewayRefusal(errors.HEADER_MISMATCH, why, reason=f"header_mismatch:{why}")
    return errors.GatewayRefusal(errors.INVALID_PARAMS, why, reason=f"invalid_params:{why}")


def refusal_answer(refusal: errors.GatewayRefusal, request_id: JsonRpcId,
                   challenge: str | None = None) -> tuple[int, bytes, Headers]:
    """The answer to a request refused as a whole."""
    headers = [(b"www-authenticate", challenge.encode())] if challenge is not None else []
    return refusal.refusal.http_status, errors.error_body(refusal.refusal, request_id, refusal.detail), headers


def denial(op: Operation, decision: Decision, *, era: Era | None, explain: bool, upstream_path: str,
           challenger: Challenger) -> Denial:
    """How one message the policy (or a state-handle check) refused is answered."""
    detail = (f"{op.method} {op.target or ''}".strip() + f" refused by {decision.reason}"
              + (f": {decision.detail}" if decision.detail else "")) if explain else ""
    challenge = None
    if op.kind == "client_response":
        refusal, error = errors.UNSOLICITED_RESPONSE, errors.error_object(errors.UNSOLICITED_RESPONSE)
    elif decision.reason == "task:not_owned":  # the same answer as for a task that does not exist
        refusal, error = errors.UNKNOWN_TASK, errors.error_object(errors.UNKNOWN_TASK)
    elif decision.reason == "pin:unapproved":  # `pinning`: the caller may call the tool, once it is approved
        refusal = errors.TOOL_UNAPPROVED
        error = {**errors.error_object(refusal, f"{op.name} is new, or changed since an operator approved it"),
                 "data": {"tool": op.name}}
    elif decision.outcome == "rate_limited":
        refusal = errors.RATE_LIMITED
        wait = decision.retry_after_s or 1
        data: dict[str, object] = {"retry_after_s": wait, **({"rule": decision.reason} if explain else {})}
        error = {**errors.error_object(refusal, f"{op.method} {op.target or ''}".rstrip()
                                       + f": try again in {wait} s"), "data": data}
    elif decision.reason == STORE_UNAVAILABLE:
        refusal = errors.STATE_UNAVAILABLE
        error = errors.error_object(refusal, "the rate limits cannot be counted")
    elif op.kind == "unknown":
        refusal, error = errors.METHOD_NOT_FOUND, errors.error_object(errors.METHOD_NOT_FOUND, op.method)
    elif decision.outcome == "step_up":
        refusal = errors.SECURITY_LEVEL
        why = f"{op.method} needs authentication of level {decision.required_level}"
        error = errors.error_object(refusal, why if explain else "")
        challenge = challenger.challenge(upstream_path, "insufficient_user_authentication", description=why,
                                         acr_values=" ".join(decision.acr_values) or None)
    elif decision.outcome == "insufficient_scope":
        refusal, error = errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN, detail)
        challenge = challenger.challenge(upstream_path, "insufficient_scope", scope=" ".join(decision.scopes))
    elif not explain and decision.hidden and op.target is not None and op.kind != "completion":
        refusal = errors.UNKNOWN_TARGET
        error = {"code": refusal.code, "message": f"Unknown {_UNKNOWN_WORD.get(op.kind, 'item')}: {op.target}"}
    else:
        refusal, error = errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN, detail)
    status = refusal.http_status
    if refusal in (errors.UNKNOWN_TARGET, errors.UNKNOWN_TASK) and era != "modern":
        status = 200  # how a legacy-era upstream answers an unknown tool or task: a JSON-RPC error, HTTP 200
    # A notification or a client's response gets no JSON-RPC answer: alone in its POST, an HTTP error status
    # and an error without an id say it was refused; in a batch, nothing does.
    answered = None if op.kind == "client_response" else op.request_id
    body = orjson.dumps({"jsonrpc": "2.0", "id": answered, "error": error})
    return Denial(status, body, challenge, answerable=answered is not None, retry_after=decision.retry_after_s)


def approval_denial(op: Operation, verdict: Verdict) -> Denial:
    """How a call the approval gate held back is answered: waiting for an approval (retry later with the same
    arguments), denied by an approver, or expired. `error.data` names the approval, so a client (and the person
    asked to approve) can refer to it."""
    approval = verdict.approval
    if approval is None:  # none was made
        why = (f"arguments over {MAX_ARGUMENTS_BYTES // 1024} KiB cannot be put before an approver"
               if verdict.outcome == "too_large" else "too many of your calls await an approval already")
        return Denial(403, errors.error_body(errors.FORBIDDEN, op.request_id, f"{op.name}: {why}"))
    data: dict[str, object] = {"approval_id": approval.id, "tool": approval.tool}
    if verdict.outcome == "pending":
        refusal = errors.APPROVAL_REQUIRED
        why = (f"{op.name} needs a person's approval (id {approval.id}); once approved, make the same call again "
               "with the same arguments")
        data["expires_at"] = approval.expires_at
    elif verdict.outcome == "denied":
        refusal, why = errors.APPROVAL_DENIED, f"an approver denied this call of {op.name}"
        data["reason"] = approval.reason
    else:
        refusal = errors.APPROVAL_EXPIRED
        why = f"the approval of this call of {op.name} ran out; call again to ask anew"
    error = {**errors.error_object(refusal, why), "data": data}
    return Denial(refusal.http_status, orjson.dumps({"jsonrpc": "2.0", "id": op.request_id, "error": error}))


def answer_denials(denied: list[Denial], message_count: int) -> tuple[int, bytes, Headers]:
    """The answer to a request whose every message was refused: the one refusal, or a batch of errors."""
    bodies = [d.body for d in denied if d.answerable]
    if message_count > 1:
        return (200, b"[" + b",".join(bodies) + b"]", []) if bodies else (202, b"", [])
    only = denied[0]
    headers = [(b"www-authenticate", only.challenge.encode())] if only.challenge is not None else []
    if only.retry_after is not None:
        headers.append((b"retry-after", str(only.retry_after).encode()))
    return only.status, only.body, headers
