"""The embedded-default demo: every scenario machine ends exactly where its script says."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker import cli, demo
from worker.cli import main
from worker.demo import DemoBus, run_demo
from worker.states import State

pytestmark = pytest.mark.unit

EXPECTED = {
    "order: happy path": ("order_saga", "acct-1001", State.COMPLETED),
    "order: payment retried twice": ("order_saga", "acct-1002", State.COMPLETED),
    "order: rolled back": ("order_saga", "acct-1003", State.ROLLBACK_COMPLETED),
    "order: parked, overridden": ("order_saga", "acct-1004", State.CANCELLED),
    "order: holds acct-2001": ("order_saga", "acct-2001", State.COMPLETED),
    "order: waits for acct-2001": ("order_saga", "acct-2001", State.COMPLETED),
    "order: holds acct-3001": ("order_saga", "acct-3001", State.COMPLETED),
    "onboarding: waits, global": ("account_onboarding", "acct-3001", State.COMPLETED),
    "onboarding: quota exceeded": ("account_onboarding", "acct-3002", State.FAILED),
    "order: paused, resumed": ("order_saga", "acct-4001", State.COMPLETED),
}


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "configure", lambda *args, **kwargs: None)


def test_every_scenario_machine_reaches_its_exact_final_state(sqlite_url: str) -> None:
    out = io.StringIO()
    result = run_demo(sqlite_url, out)
    found = {
        label: (r.machine_type, r.lookup_key, r.final) for label, r in result.by_label().items()
    }
    assert found == EXPECTED
    assert all(r.visited for r in result.results)
    assert result.ok
    assert result.seconds < 30
    text = out.getvalue()
    assert f"all {len(EXPECTED)} machines reached their expected state" in text
    assert "FAILED" not in text


def test_the_output_shows_each_path_as_it_happens(sqlite_url: str) -> None:
    out = io.StringIO()
    result = run_demo(sqlite_url, out)
    text = out.getvalue()
    ids = {label: r.machine_id[:8] for label, r in result.by_label().items()}

    def transitions(label: str) -> list[str]:
        return [
            " ".join(line.split()[3:7])
            for line in text.splitlines()
            if line.split()[2:3] == [ids[label]]
        ]

    assert transitions("order: payment retried twice") == [
        "pending → open started",
        "open → open step_succeeded",
        "open → open step_succeeded",
        "open → retry retry_scheduled",
        "retry → retry retry_scheduled",
        "retry → open step_succeeded",
        "open → open step_succeeded",
        "open → completed step_succeeded",
    ]
    assert transitions("order: rolled back")[-4:] == [
        "open → rollback rollback_started",
        "rollback → rollback step_compensated",
        "rollback → rollback step_compensated",
        "rollback → rollback_completed step_compensated",
    ]
    assert transitions("order: waits for acct-2001")[0] == "pending → waiting lock_waiting"
    assert transitions("onboarding: waits, global")[0] == "pending → waiting lock_waiting"
    assert transitions("order: paused, resumed")[:3] == [
        "pending → paused paused",
        "paused → pending resumed",
        "pending → open started",
    ]
    assert "(next try in 0." in text
    assert "parked → cancelled             overridden" in text
    assert "by ops-oncall (fraud confirmed by review)" in text
    assert "local lock on acct-3001 held by STATE_MACHINE_ORDER_SAGA/" in text


def test_a_machine_that_ends_elsewhere_fails_the_demo(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(bus: DemoBus) -> None:
        order = bus.start("order_saga", "acct-9", amount=1)
        bus.run()
        bus.expect("order: expected to fail", order, State.FAILED)

    monkeypatch.setattr(demo, "SCENARIOS", (("A wrong expectation", wrong),))
    out = io.StringIO()
    result = run_demo(sqlite_url, out)
    assert not result.ok
    (only,) = result.results
    assert out.getvalue().splitlines()[-1] == (
        f"FAILED: order: expected to fail ({only.machine_id[:8]}) ended completed, expected failed"
    )
    exit_code = CliRunner().invoke(main, ["demo", "--database-url", sqlite_url]).exit_code
    assert exit_code == 1


def test_smw_demo_uses_a_fresh_temporary_sqlite_file_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMW_DATABASE_URL", "mysql+mysqldb://root:pw@127.0.0.1:1/unused")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert "State Machine Worker demo: 2 machine types on sqlite:///" in result.stdout
    assert list(tmp_path.iterdir()) == []
