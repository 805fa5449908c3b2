"""The whole flow over real loopback HTTP and real SQLite files, including resumes from the
states a crash leaves behind."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner import emulator as emu
from runner.errors import InputError, StoreError
from runner.polling import PollPolicy
from tests.conftest import (
    Emu,
    batch_for,
    db_rows,
    execute,
    fast_settings,
    read_out,
    run_against,
    uncommit_last_line,
    write_jobs,
)

pytestmark = pytest.mark.anyio

JOBS = [
    {"id": "q1", "prompt": "Напиши хокку", "system": "Ты поэт"},
    {"id": "q2", "messages": [{"role": "system", "text": "s"}, {"role": "user", "text": "two"}]},
    {"modelUri": "gpt://f/yandexgpt/latest", "completionOptions": {"maxTokens": "10"},
     "messages": [{"role": "user", "text": "raw"}]},
]  # fmt: skip


def expected_text(tmp_path: Path, job_id: str) -> str:
    [(body,)] = db_rows(tmp_path / "runner.db", "SELECT body FROM jobs WHERE id = ?", job_id)
    return emu.answer_for(json.loads(body))


async def test_every_shape_runs_and_results_join_by_id(emulator: Emu, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    report = await run_against(emulator, tmp_path, jobs)
    assert report.exit_code == 0 and report.counts["done"] == 3
    lines = {r["id"]: r for r in read_out(tmp_path / "out.jsonl")}
    assert set(lines) == {"q1", "q2", "line-3"}
    for job_id, line in lines.items():
        assert line["status"] == "done"
        assert line["text"] == expected_text(tmp_path, job_id)
        assert all(isinstance(v, int) for v in line["usage"].values())
        assert line["usage"]["totalTokens"] == (
            line["usage"]["inputTextTokens"] + line["usage"]["completionTokens"]
        )
        assert line["operationId"].startswith("d7q") and line["attempts"] == 1
        assert line["alternativeStatus"] == "ALTERNATIVE_STATUS_FINAL"
    assert emulator.stats["submits"] == 3


async def test_second_run_submits_nothing_and_writes_nothing(emulator: Emu, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    await run_against(emulator, tmp_path, jobs)
    before = (tmp_path / "out.jsonl").read_bytes()
    async with batch_for(emulator, tmp_path) as batch:
        added = await batch.add(str(jobs))
        report = await batch.run(output=tmp_path / "out.jsonl")
    assert (added.added, added.known) == (0, 3)
    assert report.this_run["submits"] == 0
    assert emulator.stats["submits"] == 3
    assert (tmp_path / "out.jsonl").read_bytes() == before


async def test_known_id_with_changed_content_is_refused(emulator: Emu, tmp_path: Path) -> None:
    await run_against(emulator, tmp_path, write_jobs(tmp_path / "a.jsonl", JOBS))
    changed = write_jobs(
        tmp_path / "b.jsonl", [{"id": "new", "prompt": "x"}, {"id": "q1", "prompt": "changed"}]
    )
    db = tmp_path / "runner.db"
    before = db.read_bytes()
    with pytest.raises(InputError) as info:
        await run_against(emulator, tmp_path, changed)
    assert info.value.problems[0].line == 2 and "with different messages" in str(info.value)
    assert db.read_bytes() == before
    assert db_rows(db, "SELECT COUNT(*) FROM jobs") == [(3,)]


async def test_bad_file_stores_nothing_and_leaves_no_database(
    emulator: Emu, tmp_path: Path
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"prompt": "ok"}, "{bad", {"id": "d", "prompt": "1"}, {"id": "d", "prompt": "2"}],
    )
    with pytest.raises(InputError) as info:
        await run_against(emulator, tmp_path, jobs)
    assert [p.line for p in info.value.problems] == [2, 4]
    assert "duplicate id 'd' (first on line 3)" in str(info.value)
    assert not (tmp_path / "runner.db").exists()
    assert emulator.stats["requests"] == 0


def seed_crash_state(tmp_path: Path) -> dict[str, str]:
    """Rewrite a finished database into the state a kill leaves: one job of each kind."""
    db = sqlite3.connect(tmp_path / "runner.db")
    with db:
        db.execute("UPDATE jobs SET state='pending', finish_seq=NULL, result=NULL, operation_id=NULL, "
                   "idem_key=NULL WHERE id='q1'")  # fmt: skip
        db.execute("UPDATE jobs SET state='submitting', finish_seq=NULL, result=NULL, operation_id=NULL "
                   "WHERE id='q2'")  # fmt: skip
        db.execute(
            "UPDATE jobs SET state='running', finish_seq=NULL, result=NULL WHERE id='line-3'"
        )
        keys = dict(db.execute("SELECT id, idem_key FROM jobs"))
    db.close()
    return keys


async def test_resume_polls_running_resends_submitting_and_skips_done(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [*JOBS, {"id": "q4", "prompt": "done already"}])
    await run_against(e, tmp_path, jobs, output=None)
    keys = seed_crash_state(tmp_path)
    submits_before = e.stats["submits"]
    report = await run_against(e, tmp_path, None)
    assert report.exit_code == 0 and report.recovered == 1
    # q1 (pending) and q2 (submitting: ambiguous) are sent; line-3 (running) is only polled
    assert e.stats["submits"] - submits_before == 2
    assert (
        keys["q2"] in e.emulator.idem_keys[submits_before:]
    )  # the ambiguous one reuses its idempotency key
    assert db_rows(
        tmp_path / "runner.db", "SELECT id, ambiguous FROM jobs WHERE ambiguous > 0"
    ) == [("q2", 1)]
    out = read_out(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in out) == ["line-3", "q1", "q2", "q4"]


async def test_torn_output_tail_is_cut_and_rewritten_once(emulator: Emu, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    await run_against(emulator, tmp_path, jobs)
    out = tmp_path / "out.jsonl"
    uncommit_last_line(tmp_path / "runner.db", out, keep=17)  # a kill mid-append, never committed
    await run_against(emulator, tmp_path, None)
    lines = read_out(out)
    assert sorted(r["id"] for r in lines) == ["line-3", "q1", "q2"]


async def test_a_kill_in_the_first_line_of_a_new_output_is_cut_and_written_once(
    emulator: Emu, tmp_path: Path
) -> None:
    # nothing committed yet (a kill during the first append, or during a rebuild): the bytes on
    # disk are the start of what runner writes, so they are cut, not taken for a hand edit
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    await run_against(emulator, tmp_path, jobs)
    uncommit_last_line(tmp_path / "runner.db", tmp_path / "out.jsonl", keep=9)
    await run_against(emulator, tmp_path, None)
    assert [r["id"] for r in read_out(tmp_path / "out.jsonl")] == [JOBS[0]["id"]]


async def test_new_output_path_gets_every_result(emulator: Emu, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    await run_against(emulator, tmp_path, jobs)
    await run_against(emulator, tmp_path, None, output="other.jsonl")
    assert len(read_out(tmp_path / "other.jsonl")) == 3
    (tmp_path / "other.jsonl").write_text("")  # truncated by hand: rebuilt from the database
    await run_against(emulator, tmp_path, None, output="other.jsonl")
    assert len(read_out(tmp_path / "other.jsonl")) == 3


async def test_failed_operation_is_reported_with_exit_1(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator(op_error_rate=1.0)
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "j.jsonl", JOBS[:1]))
    assert report.exit_code == 1
    [line] = read_out(tmp_path / "out.jsonl")
    assert line["status"] == "failed" and line["error"]["code"] == 3
    assert "generation failed" in line["error"]["message"]


async def refused_untouched(e: Emu, tmp_path: Path, jobs: Path | None, match: str) -> None:
    db = tmp_path / "runner.db"
    before = db.read_bytes()
    with pytest.raises(StoreError, match=match):
        await run_against(e, tmp_path, jobs)
    assert db.read_bytes() == before


async def test_foreign_and_newer_databases_are_refused_untouched(
    emulator: Emu, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    db = tmp_path / "runner.db"
    execute(db, "CREATE TABLE customers (id INTEGER)")
    await refused_untouched(emulator, tmp_path, jobs, "did not create")

    db.unlink()
    await run_against(emulator, tmp_path, jobs)
    execute(db, "INSERT INTO runner_migrations VALUES (9999, 'future.sql', 0)")
    await refused_untouched(emulator, tmp_path, None, "newer runner")

    db.write_bytes(b"this is not a database at all" * 100)
    await refused_untouched(emulator, tmp_path, jobs, "not an SQLite database")


async def test_migrations_are_applied_once_and_recorded(emulator: Emu, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    await run_against(emulator, tmp_path, jobs)
    await run_against(emulator, tmp_path, None)
    rows = db_rows(tmp_path / "runner.db", "SELECT number, name FROM runner_migrations")
    assert rows and rows[0] == (1, "0001_jobs.sql")
    assert len(rows) == len({r[0] for r in rows})
    assert db_rows(tmp_path / "runner.db", "PRAGMA journal_mode") == [("wal",)]


async def test_the_last_one_is_polled_closely_once_the_others_are_done(
    make_emulator: Any, tmp_path: Path
) -> None:
    # a poll planned while others still ran stood once they were done: the last one then slept
    # through its own end for the whole back-off step (bench small: seen 33 s late, not 3 s)
    calibrate = await make_emulator(latency=(0.1, 1.0))
    prompts = [f"p{i}" for i in range(60)]
    (tmp_path / "c").mkdir()
    await run_against(calibrate, tmp_path / "c", prompts)
    lat = {op.body["messages"][-1]["text"]: op.ready_at - op.created
           for op in calibrate.emulator.ops.values()}  # fmt: skip
    short = [p for p in prompts if lat[p] < 0.3]
    last = next(p for p in prompts if 0.55 < lat[p] < 0.8)
    # sent 0.5 s apart: the last one's first poll (0.4 s old, one still to send) plans the
    # next 1.6 s on; the third is seen done at its first poll, 0.5 s after: the last one alone
    policy = PollPolicy(prior=0.4, prior_growth=5.0, last_few=1, last_cadence=0.25,
                        last_share=0.0, min_wait=0.01)  # fmt: skip
    e = await make_emulator(latency=(0.1, 1.0))
    report = await run_against(e, tmp_path, [short[0], last, short[1]],
                               settings=fast_settings(submit_rps=2.0, policy=policy))  # fmt: skip
    assert report.exit_code == 0
    [op] = [op for op in e.emulator.ops.values() if op.body["messages"][-1]["text"] == last]
    assert op.seen_done_at is not None and op.seen_done_at - op.ready_at < 0.7  # 1.2 s or more before


async def test_a_resumed_lone_operation_is_polled_finely_not_by_doubling(
    make_emulator: Any, tmp_path: Path
) -> None:
    # review L: a run stopped at 70 s of a 150 s completion, resumed: with nothing learned the
    # loaded operation's waits doubled (70, 140, 280 s) and its result was seen 130 s late
    e = await make_emulator(latency=(1.6, 1.6))
    settings = fast_settings(policy=PollPolicy(prior=0.4, min_wait=0.01))
    async with batch_for(e, tmp_path, settings=settings) as batch:
        await batch.add(["only"])
        with anyio.move_on_after(0.7):
            await batch.run()
    settings = fast_settings(policy=PollPolicy(prior=0.4, min_wait=0.01))
    report = await run_against(e, tmp_path, None, settings=settings)
    assert report.exit_code == 0 and e.stats["submits"] == 1
    [op] = e.emulator.ops.values()
    assert op.seen_done_at is not None and op.seen_done_at - op.ready_at < 0.5  # 1.4 s before


async def test_a_resumed_run_scouts_its_own_new_jobs(make_emulator: Any, tmp_path: Path) -> None:
    # review M: the previous run's operations took the 20 scout places; found done at their
    # first poll they taught nothing, and new jobs doubled their waits (end minutes late)
    e = await make_emulator(latency=(0.05, 0.05))
    slow = fast_settings(policy=PollPolicy(prior=30.0, min_wait=0.01))
    async with batch_for(e, tmp_path, settings=slow) as batch:
        await batch.add([f"old {i}" for i in range(20)])
        with anyio.move_on_after(0.5):
            await batch.run()
    e.emulator.config.latency = (1.0, 1.0)
    settings = fast_settings(policy=PollPolicy(prior=0.4, min_wait=0.01, last_few=0))
    async with batch_for(e, tmp_path, settings=settings) as batch:
        await batch.add([{"id": f"new-{i}", "prompt": f"new {i}"} for i in range(3)])
        assert (await batch.run()).exit_code == 0
    new = [op for op in e.emulator.ops.values() if op.body["messages"][-1]["text"].startswith("new")]
    assert len(new) == 3  # polled in 12% steps: seen within ~0.15 s; doubling: 0.6 s late
    assert all(op.seen_done_at is not None and op.seen_done_at - op.ready_at < 0.35 for op in new)
