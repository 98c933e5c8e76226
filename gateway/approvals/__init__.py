"""Approvals: a person approves one tool call before the gateway forwards it.

`model` (the record and every pure decision about it), `store` (memory or
Redis), `gate` (the request-path stage and an approver's decision), `stream`
(a held client: progress notifications on a legacy SSE answer, its departure).
"""

from gateway.approvals.gate import ApprovalGate, Verdict
from gateway.approvals.model import Approval, definition_hash
from gateway.approvals.store import open_approvals

__all__ = ["Approval", "ApprovalGate", "Verdict", "definition_hash", "open_approvals"]
