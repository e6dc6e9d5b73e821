"""The facts about the machine the numbers came from, and the one Markdown table."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = "not run"


@dataclass
class Row:
    """One line of the table; empty strings print as blanks."""

    phase: str
    concurrency: str = ""
    machines: str = ""
    seconds: str = ""
    steps_per_second: str = ""
    machines_per_second: str = ""
    ratio: str = ""
    commits_per_step: str = ""
    round_trips_per_step: str = ""
    bytes_per_step: str = ""
    cpu: str = ""
    latency: str = ""
    rss: str = ""
    target: str = ""
    result: str = ""


HEADER = (
    "phase",
    "concurrency",
    "machines",
    "seconds",
    "steps/s",
    "machines/s",
    "ratio",
    "commits/step",
    "round trips/step",
    "JSON bytes/step",
    "CPU ms/step: client / DB / Kafka",
    "latency p50 / p95 / p99 ms",
    "worker RSS MB",
    "target",
    "result",
)


@dataclass
class Report:
    facts: list[tuple[str, str]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["# State Machine Worker benchmark", ""]
        lines += [f"- {name}: {value}" for name, value in self.facts]
        lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for row in self.rows:
            cells = [
                row.phase,
                row.concurrency,
                row.machines,
                row.seconds,
                row.steps_per_second,
                row.machines_per_second,
                row.ratio,
                row.commits_per_step,
                row.round_trips_per_step,
                row.bytes_per_step,
                row.cpu,
                row.latency,
                row.rss,
                row.target,
                row.result,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines) + "\n"


def verdict(passed: bool | None) -> str:
    if passed is None:
        return NOT_RUN
    return "PASS" if passed else "MISS"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def uname() -> str:
    info = platform.uname()
    return f"{info.system} {info.release} {info.machine}"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def kafka_version(bootstrap: str) -> str:
    """The broker's version when it is the local one `make services` runs (from its jar)."""
    host = urlsplit(f"//{bootstrap.split(',', maxsplit=1)[0]}").hostname or ""
    libs = ROOT / ".services" / "kafka" / "libs"
    if host in ("127.0.0.1", "localhost") and libs.is_dir():
        for jar in sorted(libs.glob("kafka_*.jar")):
            match = re.fullmatch(r"kafka_[0-9.]+-([0-9][0-9A-Za-z.\-]*)\.jar", jar.name)
            if match:
                return f"Apache Kafka {match.group(1)} (KRaft, single broker)"
    return f"unknown (broker at {bootstrap} is not the local one)"


def number(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def write(report: Report, path: Path) -> str:
    text = report.markdown()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text
