"""The writer's timing: what must be committed at once, and what may wait for company.

An operation id is committed within ``batch_window`` (a kill before that pays for the submit
again); other outcomes may wait ``hold`` so that in a busy run most answers share one commit,
except when they may be the last of the run. Real SQLite file, real writer task; the waits
asserted are seconds apart so load cannot blur them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from runner.database import Database
from runner.ingest import ingest
from runner.inputs import read_jobs
from runner.jobs import Answered, ApiFailure, Completion, Requeued, Submitted
from runner.output import OutputFile
from runner.queue import Applied, Queue
from runner.writer import Writer
from tests.conftest import db_rows, write_jobs

pytestmark = pytest.mark.anyio

DONE = Completion("fine", "ALTERNATIVE_STATUS_FINAL", {"totalTokens": 2}, "v1")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"j{i}", "prompt": "p"} for i in range(3)])
    async with Database.open(str(tmp_path / "runner.db")) as db:
        await ingest(db, str(jobs), read_jobs(str(jobs), "yandexgpt-lite"))
        yield Queue(db)


def states(tmp_path: Path) -> dict[str, str]:
    return dict(db_rows(tmp_path / "runner.db", "SELECT id, state FROM jobs"))


async def until(check: Callable[[], bool], seconds: float = 5.0) -> float:
    """Seconds until ``check`` holds (fails the test past ``seconds``)."""
    start = anyio.current_time()
    with anyio.fail_after(seconds):
        while not check():  # noqa: ASYNC110 - reads the file as another process would
            await anyio.sleep(0.01)
    return anyio.current_time() - start


async def test_ids_are_committed_at_once_answers_wait_for_company_or_the_end(
    queue: Queue, tmp_path: Path
) -> None:
    out = OutputFile(queue.db, str(tmp_path / "out.jsonl"))
    await out.open()
    commits: list[Applied] = []
    writer = Writer(queue, out, budget=32768, on_applied=commits.append, hold=60.0)
    writer.remaining = lambda: 3
    c0, c1, c2 = sorted(await queue.claim(3, 1e12), key=lambda c: c.id)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        writer.emit(Submitted(c0.attempt, "op-0", 1.0))
        assert await until(lambda: states(tmp_path)["j0"] == "running") < 2.0  # not 60 s
        writer.emit(Answered(c0.attempt.running("op-0"), 2.0, DONE))
        await anyio.sleep(1.0)
        assert states(tmp_path)["j0"] == "running"  # an answer waits (a kill costs a poll)
        writer.emit(Submitted(c1.attempt, "op-1", 3.0))  # an id's commit takes it along
        await until(lambda: states(tmp_path)["j0"] == "done")
        assert states(tmp_path)["j1"] == "running"
        writer.emit(Submitted(c2.attempt, "op-2", 3.0))
        await until(lambda: states(tmp_path)["j2"] == "running")
        # two jobs left: two answers may finish them all, so they are committed at once
        writer.remaining = lambda: 2
        writer.emit(Answered(c1.attempt.running("op-1"), 4.0, DONE))
        writer.emit(Answered(c2.attempt.running("op-2"), 4.0, DONE))
        assert await until(lambda: set(states(tmp_path).values()) == {"done"}) < 2.0
        # appends to the output go at most once per hold while the run goes on; all at the end
        writer.close()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert writer.written == 3
    assert sum(a.finished for a in commits) == 3


async def test_closing_commits_what_waits(queue: Queue, tmp_path: Path) -> None:
    writer = Writer(queue, None, budget=32768, on_applied=lambda _: None, hold=60.0)
    [c0, *_] = sorted(await queue.claim(3, 1e12), key=lambda c: c.id)
    await queue.apply([Submitted(c0.attempt, "op-0", 1.0)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        writer.emit(Answered(c0.attempt.running("op-0"), 2.0, DONE))
        await anyio.sleep(0.5)
        assert states(tmp_path)["j0"] == "running"
        writer.close()
    assert states(tmp_path)["j0"] == "done"


async def test_a_refused_submit_and_a_chats_answer_are_committed_at_once(tmp_path: Path) -> None:
    # review: a 429's requeue waited the hold with its job "submitting", so a kill then made it
    # an ambiguous submit (counted as maybe billed, resent, held against the hourly window);
    # and each chat turn waited the hold before its next turn could be claimed
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"id": "p", "prompt": "p"}, {"id": "c", "turns": ["one", "two"]}])  # fmt: skip
    async with Database.open(str(tmp_path / "runner.db")) as db:
        await ingest(db, str(jobs), read_jobs(str(jobs), "yandexgpt-lite"))
        queue = Queue(db)
        writer = Writer(queue, None, budget=32768, on_applied=lambda _: None, hold=60.0)
        writer.remaining = lambda: 2
        claims = {c.id: c for c in await queue.claim(2, 1e12)}
        assert claims["c"].chat and not claims["p"].chat
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            writer.emit(Requeued(claims["p"].attempt, 1e12, error=ApiFailure(8, "429")))
            assert await until(lambda: states(tmp_path)["p"] == "pending") < 2.0
            writer.emit(Submitted(claims["c"].attempt, "op-c", 1.0))
            await until(lambda: states(tmp_path)["c"] == "running")
            [running] = await queue.running()
            assert running.chat  # what the poller builds its answer from
            writer.emit(Answered(running.attempt, 2.0, DONE, chat=running.chat))
            assert await until(lambda: states(tmp_path)["c"] == "pending") < 2.0  # turn two
            writer.close()


HELD_RUN = """
import anyio, runner
from runner.polling import PollPolicy
from runner.settings import Settings

async def main() -> None:
    settings = Settings(hold_window=600.0, policy=PollPolicy(prior=0.2))
    async with runner.Batch("runner.db", settings=settings) as batch:
        await batch.add(["one", "two", "three", "four"])
        await batch.run()

anyio.run(main)
"""


def test_an_answer_held_for_company_and_lost_to_a_kill_costs_a_poll_not_a_token(
    tmp_path: Path,
) -> None:
    # a run holding answers for 10 minutes is killed -9 once a poll has answered "done" that
    # the database does not hold yet; the rerun polls that operation again: nothing is
    # submitted twice, every answer is counted once, every job has one line
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.procs import child_env, emulator_detail, emulator_process, run

    (tmp_path / "held.py").write_text(HELD_RUN)
    with emulator_process("--latency", "0.3:6") as url:
        proc = subprocess.Popen([sys.executable, "held.py"], cwd=tmp_path, env=child_env(url),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not any(o["seen_done_at"] is not None for o in emulator_detail(url)["ops"]):
                assert time.monotonic() < deadline, "no operation was seen done"
                time.sleep(0.02)
            seen = {o["id"] for o in emulator_detail(url)["ops"] if o["seen_done_at"] is not None}
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        held = db_rows(tmp_path / "runner.db", "SELECT operation_id FROM jobs WHERE state = "
                       f"'running' AND operation_id IN ({','.join('?' * len(seen))})", *seen)  # fmt: skip
        assert held, "the answer the emulator gave was not held: the test proves nothing"
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 0
        detail = emulator_detail(url)
    assert len(detail["submit_times"]) == 4  # none sent twice
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(x["status"] for x in lines) == ["done"] * 4
    ledger = db_rows(tmp_path / "runner.db",
                     "SELECT COUNT(*), SUM(total_tokens) FROM operations WHERE answered_at IS NOT NULL")  # fmt: skip
    assert ledger == [(4, sum(int(x["usage"]["totalTokens"]) for x in lines))]
    assert db_rows(tmp_path / "runner.db", "SELECT total_tokens FROM totals") == [(ledger[0][1],)]
