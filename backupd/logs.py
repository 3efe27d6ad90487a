"""Structured logs on stderr: JSON when not a TTY, readable lines when it is."""

from __future__ import annotations

import logging
import sys
from typing import Any

from backupd.redact import redact

LEVELS = ("debug", "info", "warning", "error")


def _redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def configure(fmt: str | None = None, level: str = "info") -> None:
    """Route structlog and stdlib logging (apscheduler, botocore) to one stderr stream."""
    import structlog  # here, not at module level: the per-WAL-file fast paths never log

    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def write_stderr(text: str) -> None:
    """Write operator-facing lines to stderr in one piece, between log records, never inside one.

    Log records come from any thread; holding the log handler's lock while the whole text
    is written and flushed keeps a JSON log line and the error message apart on a pipe.
    """
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr]
    for handler in handlers:
        handler.acquire()
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    finally:
        for handler in reversed(handlers):
            handler.release()
