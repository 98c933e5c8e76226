"""The audit trail: every decision becomes an `AuditEvent`, sealed into a hash chain and written to every sink.

The package hands its public names on from the modules that define them, each
imported on first use, so that importing one small module of it loads no more
than that module needs:

    event      AuditEvent, its canonical form and keyed hash chain, argument redaction
    writer     AuditLog: the bounded queue and the writer task that drains it to the sinks
    chainkey   the chain key file whose secret seals every event
    sinks      sqlite, jsonl and postgres sinks: writing batches, reading them back
    reading    the query parameters people type, and the sink that answers them
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy import names_from

if TYPE_CHECKING:
    from gateway.audit.chainkey import ChainKeyError, load_or_create_chain_key, read_chain_key
    from gateway.audit.event import AuditEvent, ChainKey, ChainReport, redact_arguments
    from gateway.audit.sinks import AuditQuery, open_sink
    from gateway.audit.writer import AuditLog, AuditUnavailable

__all__ = ["AuditEvent", "AuditLog", "AuditQuery", "AuditUnavailable", "ChainKey", "ChainKeyError", "ChainReport",
           "load_or_create_chain_key", "open_sink", "read_chain_key", "redact_arguments"]

_HOMES = {
    "gateway.audit.chainkey": ("ChainKeyError", "load_or_create_chain_key", "read_chain_key"),
    "gateway.audit.event": ("AuditEvent", "ChainKey", "ChainReport", "redact_arguments"),
    "gateway.audit.sinks": ("AuditQuery", "open_sink"),
    "gateway.audit.writer": ("AuditLog", "AuditUnavailable"),
}

if not TYPE_CHECKING:  # mypy reads the imports above; at run time each name's module is imported on first use
    __getattr__ = names_from(__name__, _HOMES)
