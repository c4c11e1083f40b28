"""Logging set-up: one JSON object per line on stderr (journald keeps it), structlog and stdlib alike.

Events carry their context as fields (request_id, worker_id, code ...), never inside the message.
`configure_logging` is called once, by a process's entry point; libraries only get loggers. Every
line carries `process` and `pid`; the stdlib loggers of workers/ and shm/ add fields with
`extra={"request_id": ...}`, and a process adds its own to every line with `context` (the worker:
its role and current worker_id, read at each line).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import structlog
from structlog.typing import Processor

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    level: str = "info", json_lines: bool = True, process: str = "", context: Callable[[], dict] | None = None
) -> None:
    """Route structlog and stdlib logging (workers/ and shm/ use it) to stderr as JSON lines; `context()`
    gives fields for every line (called per line, so they may change, e.g. a worker's id on re-registering)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    pid = os.getpid()
    shared.append(lambda _logger, _name, event: {**event, "process": process, "pid": pid} if process else event)
    if context is not None:
        shared.append(lambda _logger, _name, event: {**context(), **event})
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],  # stdlib `extra={...}` become fields
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
