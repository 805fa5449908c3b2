"""Operator commands: status, jobs, retry, cancel, dry run, results with requests, progress."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from tests.conftest import read_out, uncommit_last_line
from tests.procs import (
    child_env,
    emulator_process,
    emulator_stats,
    kill_when_running,
    make_jobs,
)


def invoke(url: str, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args), env=child_env(url), catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_status_json_field_by_field(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 40)
    with emulator_process("--op-error-rate", "0.25", "--seed", "3") as url:
        code, _ = invoke(url, "run", "jobs.jsonl", "-o", "out.jsonl")
    assert code == 1
    out = read_out(cwd / "out.jsonl")
    failed = [r for r in out if r["status"] == "failed"]
    done = [r for r in out if r["status"] == "done"]
    assert failed and done
    data = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    assert data["total"] == 40
    assert (data["done"], data["failed"]) == (len(done), len(failed))
    assert data["pending"] == data["running"] == data["submitting"] == data["cancelled"] == 0
    tokens = sum(r["usage"]["totalTokens"] for r in done)
    assert data["usage"]["totalTokens"] == tokens
    assert data["usage"]["inputTextTokens"] == sum(r["usage"]["inputTextTokens"] for r in done)
    assert data["cost"]["estimate"] is True and data["cost"]["currency"] == "RUB"
    assert data["cost"]["total"] == pytest.approx(tokens / 1000 * 0.10, abs=1e-4)
    assert data["submits"] == 40 and data["ambiguousSubmits"] == 0 and data["faults"] == 0
    assert data["resubmits"] == 0 and data["staleOutcomes"] == 0
    assert data["polls"] >= 40 and data["live"] is False and data["outage"] is None
    assert data["oldestRunningAgeSeconds"] is None
    assert data["topErrors"] == [
        {"code": 3, "message": "injected: generation failed", "count": len(failed)}
    ]
    price = json.loads(
        CliRunner().invoke(cli, ["status", "--json", "--price", "yandexgpt-lite=1"]).output
    )
    assert price["cost"]["total"] == pytest.approx(tokens / 1000, abs=1e-4)
    text = CliRunner().invoke(cli, ["status"]).output
    assert "top errors:" in text and "(estimate" in text


def test_status_prices_synchronous_tokens_at_the_synchronous_rate(cwd: Path) -> None:
    # newcomer and review: a `--mode sync` batch (full price) was priced by `status` at the
    # asynchronous (half) price: the database did not say which tokens were synchronous
    (cwd / "a.jsonl").write_text('{"id": "a1", "prompt": "one"}\n{"id": "a2", "prompt": "two"}\n')
    (cwd / "s.jsonl").write_text('{"id": "s1", "prompt": "three"}\n{"id": "s2", "prompt": "4"}\n')
    with emulator_process("--latency", "0.05:0.1") as url:
        assert invoke(url, "run", "a.jsonl", "--latency-prior", "0.2")[0] == 0
        code, output = invoke(url, "run", "s.jsonl", "--mode", "sync")
    assert code == 0, output
    with sqlite3.connect(cwd / "runner.db") as con:
        tokens = dict(con.execute("SELECT j.id, SUM(o.total_tokens) FROM operations o "
                                  "JOIN jobs j ON j.rowid = o.job GROUP BY j.id").fetchall())
    paid = tokens["a1"] + tokens["a2"] + 2 * (tokens["s1"] + tokens["s2"])
    data = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    assert data["usage"]["totalTokens"] == sum(tokens.values())
    assert data["cost"]["total"] == pytest.approx(paid / 1000 * 0.10, abs=1e-4)
    # a later run in either mode prices what is recorded the same way
    last = [ln for ln in output.splitlines() if " progress: " in ln][-1]
    assert f"cost ~{paid / 1000 * 0.10:.2f} RUB" in last
    # a database from before migration 0007 is priced the same once it is applied
    with sqlite3.connect(cwd / "runner.db") as con:
        con.execute("DROP TRIGGER operations_sync_tokens_insert")
        con.execute("DROP TRIGGER operations_sync_tokens_update")
        con.execute("ALTER TABLE usage_by_model DROP COLUMN sync_tokens")
        con.execute("DELETE FROM runner_migrations WHERE number = 7")
    again = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    assert again["cost"]["total"] == pytest.approx(paid / 1000 * 0.10, abs=1e-4)


def test_jobs_lists_state_attempts_operation_and_error(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 6)
    with emulator_process("--op-error-rate", "1") as url:
        invoke(url, "run", "jobs.jsonl")
    listed = json.loads(
        CliRunner().invoke(cli, ["jobs", "--status", "failed", "--limit", "4", "--json"]).output
    )
    rows = listed["jobs"]
    assert len(rows) == 4 and listed["total"] == 6
    first = rows[0]
    assert first["id"] == "j0" and first["state"] == "failed" and first["attempts"] == 1
    assert first["operationId"].startswith("d7q")
    assert first["lastError"] == {"code": 3, "message": "injected: generation failed"}
    text = CliRunner().invoke(cli, ["jobs", "--limit", "4"]).output
    assert text.splitlines()[0].startswith("id\tstate")  # a header
    assert "3: injected" in text and "2 more not shown" in text


def test_retry_moves_failed_back_keeps_history_and_output_stays_exact(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 10)
    with emulator_process("--op-error-rate", "1") as url:
        code, _ = invoke(url, "run", "jobs.jsonl", "-o", "out.jsonl")
    assert code == 1 and all(r["status"] == "failed" for r in read_out(cwd / "out.jsonl"))
    r = CliRunner().invoke(cli, ["retry", "--error-code", "13"])
    assert "0 jobs moved" in r.output  # the filter matches nothing: code 3, not 13
    r = CliRunner().invoke(cli, ["retry", "--json"])
    assert json.loads(r.output) == {"moved": 10}
    con = sqlite3.connect(cwd / "runner.db")
    assert con.execute(
        "SELECT COUNT(*) FROM jobs WHERE state='pending' AND attempts=1"
    ).fetchone() == (10,)
    history = con.execute("SELECT state, json_extract(error, '$.code') FROM job_history").fetchall()
    con.close()
    assert history == [("failed", 3)] * 10
    with emulator_process() as url:
        code, _ = invoke(url, "run", "-o", "out.jsonl")
        assert emulator_stats(url)["submits"] == 10
    assert code == 0
    out = read_out(cwd / "out.jsonl")
    assert sorted(r["id"] for r in out) == sorted(f"j{i}" for i in range(10))  # one line each
    assert all(r["status"] == "done" and r["attempts"] == 2 for r in out)


def test_retry_then_run_refuses_lines_added_by_hand_to_the_output(cwd: Path) -> None:
    # the rebuild after `retry` cut them: the mark for it lost how far the file had got
    make_jobs(cwd / "jobs.jsonl", 3)
    with emulator_process("--op-error-rate", "1") as url:
        code, _ = invoke(url, "run", "jobs.jsonl", "-o", "out.jsonl")
    assert code == 1
    with (cwd / "out.jsonl").open("a") as f:
        f.write('{"id": "mine", "note": "my own line"}\n')
    before = (cwd / "out.jsonl").read_bytes()
    assert json.loads(CliRunner().invoke(cli, ["retry", "--json"]).output) == {"moved": 3}
    with emulator_process() as url:
        code, out = invoke(url, "run", "-o", "out.jsonl")
        assert emulator_stats(url).get("submits", 0) == 0  # refused before sending
    assert code == 2 and "not what runner writes (lines added by hand?" in out
    assert (cwd / "out.jsonl").read_bytes() == before
    (cwd / "out.jsonl").write_bytes(before[: before.index(b'{"id": "mine"')])  # taken out again
    with emulator_process() as url:
        code, out = invoke(url, "run", "-o", "out.jsonl")
    assert code == 0, out
    out_lines = read_out(cwd / "out.jsonl")  # rebuilt: one line per job, the new answers
    assert sorted(r["id"] for r in out_lines) == ["j0", "j1", "j2"]
    assert all(r["status"] == "done" for r in out_lines)


def test_a_crash_tail_then_retry_is_refused_saying_so_and_moving_it_away_rebuilds(
    cwd: Path,
) -> None:
    # a kill after an append was synced but before its record committed, then `retry` of the
    # job it wrote: the tail is runner's, but no longer what it writes; the refusal blamed the
    # user ("lines added by hand?") alone
    make_jobs(cwd / "jobs.jsonl", 3)
    with emulator_process("--op-error-rate", "1") as url:
        assert invoke(url, "run", "jobs.jsonl", "-o", "out.jsonl")[0] == 1
    line = (cwd / "out.jsonl").read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    uncommit_last_line(cwd / "runner.db", cwd / "out.jsonl", keep=len(line) + 1)
    assert json.loads(CliRunner().invoke(cli, ["retry", "--json"]).output) == {"moved": 3}
    with emulator_process() as url:
        code, out = invoke(url, "run", "-o", "out.jsonl")
        assert code == 2 and "after `runner retry`, a write a crash cut short" in out
        (cwd / "out.jsonl").rename(cwd / "old.jsonl")
        assert invoke(url, "run", "-o", "out.jsonl")[0] == 0
    assert sorted(r["id"] for r in read_out(cwd / "out.jsonl")) == ["j0", "j1", "j2"]


def test_cancel_pending_only(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 5)
    with emulator_process("--fault", "submit:403=1") as url:
        code, _ = invoke(url, "run", "jobs.jsonl")
    assert code == 3
    r = CliRunner().invoke(cli, ["cancel", "--pending-only", "--json"])
    assert json.loads(r.output) == {"cancelledPending": 5, "cancelledRunning": 0,
                                    "finishedRunning": 0, "leftRunning": 0}  # fmt: skip
    data = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    assert data["cancelled"] == 5 and data["pending"] == 0
    lines = [
        json.loads(x)
        for x in CliRunner().invoke(cli, ["results", "--status", "cancelled"]).output.splitlines()
    ]
    assert len(lines) == 5 and {x["status"] for x in lines} == {"cancelled"}


def test_cancel_asks_the_server_to_cancel_running_operations(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 8)
    with emulator_process("--latency", "30:40") as url:
        kill_when_running(cwd, url, 8)
        code, output = invoke(url, "cancel", "--json")
        assert code == 0, output
        assert json.loads(output) == {
            "cancelledPending": 0,
            "cancelledRunning": 8,
            "finishedRunning": 0,
            "leftRunning": 0,
        }
        assert emulator_stats(url)["cancels"] == 8
    assert json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)["cancelled"] == 8


def test_dry_run_sends_nothing_and_stores_nothing(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 30)
    with emulator_process() as url:
        code, output = invoke(url, "run", "jobs.jsonl", "--dry-run", "--json")
        assert code == 0, output
        assert emulator_stats(url).get("requests", 0) == 0
    plan = json.loads(output)
    assert (plan["jobs"], plan["new"], plan["known"]) == (30, 30, 0)
    assert plan["models"] == {"yandexgpt-lite": 30}
    chars = sum(len(f"prompt number {i}") for i in range(30))
    assert plan["inputTokens"] == round(chars / 3.5)
    assert plan["cost"]["estimate"] is True
    assert list(cwd.iterdir()) == [cwd / "jobs.jsonl"]  # no database, no lock file


def test_dry_run_on_existing_database_reports_known_and_changes_nothing(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 4)
    with emulator_process() as url:
        invoke(url, "run", "jobs.jsonl")
        before = (cwd / "runner.db").read_bytes()
        make_jobs(cwd / "more.jsonl", 6)
        code, output = invoke(url, "run", "more.jsonl", "--dry-run", "--json")
    assert code == 0
    assert (json.loads(output)["new"], json.loads(output)["known"]) == (2, 4)
    assert (cwd / "runner.db").read_bytes() == before


def test_results_include_request(cwd: Path) -> None:
    (cwd / "j.jsonl").write_text('{"id": "a", "prompt": "hello", "system": "sys"}\n')
    with emulator_process() as url:
        invoke(url, "run", "j.jsonl")
    [line] = [
        json.loads(x)
        for x in CliRunner().invoke(cli, ["results", "--include-request"]).output.splitlines()
    ]
    assert line["request"]["messages"] == [
        {"role": "system", "text": "sys"},
        {"role": "user", "text": "hello"},
    ]
    csv_out = CliRunner().invoke(cli, ["results", "--format", "csv", "--include-request"]).output
    assert csv_out.splitlines()[0].endswith(",request")


def test_progress_in_non_tty_mode_prints_plain_lines(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 20)
    with emulator_process("--latency", "0.5:1") as url:
        code, output = invoke(url, "run", "jobs.jsonl", "--progress-interval", "0.3")
        quiet_code, quiet = invoke(url, "-q", "run", "jobs.jsonl", "--db", "other.db",
                                   "--progress-interval", "0.3")  # fmt: skip
    assert code == quiet_code == 0
    assert " progress: " not in quiet  # -q: no progress lines, same work done
    lines = [ln for ln in output.splitlines() if " progress: " in ln]
    assert len(lines) >= 2
    assert (
        "submits" in lines[0]
        and "/10 per s" in lines[0]
        and "polls" in lines[0]
        and "/50 per s" in lines[0]
    )
    assert "cost ~" in lines[-1] and "(estimate)" in lines[-1] and "ETA" in lines[-1]
    assert "\x1b[" not in output  # no terminal control codes off a terminal


@pytest.mark.parametrize(
    "command", ["run", "status", "results", "jobs", "retry", "cancel", "emulator"]
)
def test_every_command_has_help_with_an_example(command: str) -> None:
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and "Example" in r.output
