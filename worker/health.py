"""`/metrics` and `/healthz` on one port, served from a daemon thread.

`Health` holds what the liveness check looks at: when the consumer loop last polled, and the
result of the sampler's last database round trip. `evaluate` turns those into the answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

DEFAULT_STALL_SECONDS = 60.0


def evaluate(
    *, now: float, last_poll: float, stall_seconds: float, database_error: str | None
) -> tuple[bool, dict[str, str]]:
    """Whether the worker is healthy, and each check's result ("ok" or what is wrong)."""
    stalled_for = now - last_poll
    checks = {
        "consumer": (
            "ok"
            if stalled_for <= stall_seconds
            else f"poll loop stalled for {stalled_for:.0f}s (limit {stall_seconds:.0f}s)"
        ),
        "database": "ok" if database_error is None else f"unreachable: {database_error}",
    }
    return all(v == "ok" for v in checks.values()), checks


class Health:
    """Liveness inputs, fed by the consumer loop (`beat`) and the sampler (`database`)."""

    def __init__(
        self,
        *,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_poll = clock()
        self._database_error: str | None = None

    def beat(self) -> None:
        """The consumer loop is alive: it is about to poll."""
        with self._lock:
            self._last_poll = self._clock()

    def database(self, error: str | None) -> None:
        """The result of the last database round trip: None when it worked."""
        with self._lock:
            self._database_error = error

    def report(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            return evaluate(
                now=self._clock(),
                last_poll=self._last_poll,
                stall_seconds=self.stall_seconds,
                database_error=self._database_error,
            )


class HealthServer:
    """A ThreadingHTTPServer for /metrics and /healthz in a daemon thread."""

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        *,
        host: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        handler = _handler(registry, health, details or {})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="smw-health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(
    port: int, registry: CollectorRegistry, health: Health, **details: Any
) -> HealthServer | None:
    """Start serving on `port`; port 0 means no server."""
    if port == 0:
        return None
    return HealthServer(port, registry, health, details=details).start()


def _handler(
    registry: CollectorRegistry, health: Health, details: dict[str, Any]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "smw"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                ok, checks = health.report()
                body = {"status": "ok" if ok else "unhealthy", **details, "checks": checks}
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            else:
                self._send(
                    404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n"
                )

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # base signature
            del format, args  # probes every few seconds would drown the worker's own logs

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
