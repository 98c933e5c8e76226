"""Structured logs: one line per record, a JSON object (the default) or text, with the fields a log call passes
in `extra`, in the order it passes them.

Owns the log format. Text reads `2026-12-03T16:40:00.123Z INFO message key=value ...`: the time in UTC, the
level, the message, then each field; a value is quoted as a JSON string when it holds a space, a quote, an `=`
or a control character (none is written raw: a caller's tool name cannot forge a line or colour a terminal),
None reads `-`, a list its items joined by `, `; a traceback follows on lines of its own, each indented and
escaped alike, so that no line but a record's first starts with a time. JSON carries the same fields after `ts`,
`level`, `logger` and `message` (and `exception`), with every control character escaped, C1 and U+2028/U+2029
included. uvicorn passes its message again with terminal colours (`color_message`): that field is never
written.

Each request produces one INFO line ("request", `audit.recording`) carrying its audit id, so a log line and an
audit event can be joined; a starting gateway one ("gateway started", `startup_summary`). An answer the gateway
cuts off on purpose (`AnswerWithheld`: raising is the one way an ASGI app can close a connection mid-answer) is
said in a line of the gateway's own; uvicorn's traceback for it is not written.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import orjson

# Not fields: the record's own attributes, and uvicorn's coloured copy of its message.
_NOT_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_CONTROL = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPED = {c: f"\\u{c:04x}" for c in _CONTROL} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_QUOTED = _ESCAPED | {ord('"'): '\\"', ord("\\"): "\\\\"}
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
# What JSON allows raw in a string, and orjson writes so: a terminal acts on C1 (CSI is ESC [), a JavaScript reader
# ends a line at U+2028/U+2029.
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")
# Before each line of a traceback after its record's first: no line but a record's own starts with its timestamp.
_CONTINUED = "\n    "


def escape_controls(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, U+2028/U+2029) written as an escape (`\\n`, `\\u009b`):
    printed, it stays on its line and cannot move the cursor or colour a terminal."""
    return text.translate(_ESCAPED)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a log call passed in `extra`, in its order."""
    return {k: v for k, v in vars(record).items() if k not in _NOT_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _RAW_IN_JSON.sub(lambda raw: f"\\u{ord(raw[0]):04x}", orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        pairs = "".join(f" {key}={_text(value)}" for key, value in fields(record).items())
        line = f"{ts} {record.levelname} {escape_controls(record.getMessage())}{pairs}"
        if record.exc_info:  # an exception's message is anyone's text: each of its lines escaped, and indented
            line += "".join(_CONTINUED + escape_controls(part)
                            for part in self.formatException(record.exc_info).split("\n"))
        return line


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        text = ", ".join("-" if item is None else str(item) for item in value)
    elif isinstance(value, dict):
        text = orjson.dumps(value, default=str).decode()
    else:
        text = str(value)
    if not text or text == "-" or _NEEDS_QUOTES.search(text):
        return '"' + text.translate(_QUOTED) + '"'
    return text


class _NotCutOffAnswers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from gateway.inspect import AnswerWithheld  # here: inspect's imports reach the audit log, which logs

        return not (record.exc_info and isinstance(record.exc_info[1], AnswerWithheld))


def configure(level: str, fmt: str = "json") -> None:
    """Send every log line to stderr, as JSON (the default) or as plain text."""
    handler = logging.StreamHandler()
    handler.addFilter(_NotCutOffAnswers())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
