"""Logging: structlog for the worker and, through it, for SQLAlchemy and librdkafka.

JSON when stderr is not a terminal, console when it is. Log events have stable names
(`machine.transition`, `command.rejected`, ...). Passwords in URLs never reach the output.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.hooks import Hooks
from worker.records import HistoryEntry, Machine

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://[^:/@\s]*):[^@\s]*@", re.IGNORECASE)


def scrub(text: str) -> str:
    """Mask the password of any URL in the text."""
    return _URL_PASSWORD.sub(r"\g<scheme>:***@", text)


def _scrub_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = scrub(value)
    return event_dict


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Set up structlog and route the standard library's logging through it."""
    json_output = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _scrub_event,
    ]
    if json_output:  # the console renderer formats exceptions itself
        shared.insert(-1, structlog.processors.format_exc_info)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # a disabled level costs no further processing
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)


class LoggingHooks(Hooks):
    """Logs each lifecycle event under a stable name."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("worker")

    def command(self, machine_type: str, command: str, outcome: str) -> None:
        name = "command.applied" if outcome == "applied" else f"command.{outcome}"
        self.log.info(name, machine_type=machine_type, command=command)

    def transition(self, machine: Machine, entry: HistoryEntry) -> None:
        self.log.info(
            "machine.transition",
            machine_type=machine.machine_type,
            machine_id=machine.id,
            lookup_key=machine.lookup_key,
            sequence=entry.sequence,
            transition=entry.event,
            from_state=entry.from_state,
            to_state=entry.to_state,
            step=entry.handler,
            error=entry.error,
            command_id=entry.command_id,
        )

    def step(self, machine_type: str, step: str, seconds: float, outcome: str) -> None:
        if outcome in ("raised", "fail"):
            self.log.warning("step.failed", machine_type=machine_type, step=step, outcome=outcome)

    def lock_wait(self, machine_type: str, reason: str) -> None:
        self.log.info("lock.waiting", machine_type=machine_type, reason=reason)

    def stale_write(self, machine_type: str, machine_id: str) -> None:
        self.log.warning("machine.stale_write", machine_type=machine_type, machine_id=machine_id)

    def dead_letter(self, reason: str) -> None:
        self.log.warning("command.dead_lettered", reason=reason)
