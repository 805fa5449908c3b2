"""A wall clock that steps between runs (NTP, a hardware clock kept in local time, a restored
VM): what the stored times then say, and that a resumed run neither hangs nor holds back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import runner
from runner.polling import PollPolicy
from tests.conftest import batch_for, db_rows, execute, fast_settings
from tests.procs import emulator_process, emulator_stats

pytestmark = pytest.mark.anyio


async def start_and_stop(e: Any, tmp_path: Path, n: int, **kw: Any) -> None:
    """Submit ``n`` jobs and stop the run while their operations are still running."""
    async with batch_for(e, tmp_path, **kw) as batch:
        await batch.add([f"p{i}" for i in range(n)])
        with anyio.move_on_after(0.8):
            await batch.run()
    assert db_rows(tmp_path / "runner.db", "SELECT COUNT(*) FROM jobs WHERE state = 'running'") == [(n,)]


def clock_back(tmp_path: Path, seconds: float) -> None:
    """As if the clock the stored times were read from ran ``seconds`` ahead of today's."""
    db = tmp_path / "runner.db"
    execute(db, "UPDATE jobs SET submitted_at = submitted_at + ?, next_at = next_at + ?", seconds, seconds)
    execute(db, "UPDATE operations SET sent_at = sent_at + ?", seconds)


@pytest.mark.parametrize("step", [5, 3 * 3600])
async def test_running_operations_stored_ahead_of_the_clock_are_polled_on_resume(
    make_emulator: Any, tmp_path: Path, step: float
) -> None:
    # review G: a running job whose stored submit time lay ahead of the clock was never loaded
    # by the resumed run, which then waited for good (0 polls; "running 0, pending 5")
    e = await make_emulator(latency=(1.5, 1.5))
    await start_and_stop(e, tmp_path, 5)
    clock_back(tmp_path, step)
    async with batch_for(e, tmp_path) as batch:
        with anyio.fail_after(20):
            report = await batch.run()
        assert report.exit_code == 0 and [r.status for r in await batch.results()] == ["done"] * 5
    assert e.stats["submits"] == 5


async def test_a_retry_due_hours_ahead_of_the_clock_is_due_now(make_emulator: Any, tmp_path: Path) -> None:
    # a pending job's next try, stored by a clock hours ahead, was waited for
    e = await make_emulator(latency=(0.1, 0.2))
    async with batch_for(e, tmp_path) as batch:
        await batch.add([f"p{i}" for i in range(3)])
    execute(tmp_path / "runner.db", "UPDATE jobs SET next_at = ?", time.time() + 3 * 3600)
    async with batch_for(e, tmp_path) as batch:
        with anyio.fail_after(20):
            assert (await batch.run()).exit_code == 0
    assert e.stats["submits"] == 3


async def test_a_clock_stepped_back_mid_run_neither_storms_nor_starves_the_polls(
    make_emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # review G: ages were read off the wall clock; stepped back 600 s mid-run, the scouts
    # were polled at the minimum wait (~50 polls each, "finished after -559.8 s") and the other
    # operations not at all until the clock caught up (10 minutes)
    real = time.time

    def step_back_once_running(snap: Any) -> None:
        if snap.running == 30 and time.time is real:
            monkeypatch.setattr(time, "time", lambda: real() - 600)  # this process's OS clock

    with emulator_process("--latency", "2:2") as url:  # its own process, its own clock
        async with batch_for(None, tmp_path, llm_url=url, operation_url=url, progress=step_back_once_running,
                             progress_interval=0.1) as batch:  # fmt: skip
            await batch.add([f"p{i}" for i in range(30)])
            with anyio.fail_after(30):
                report = await batch.run()
        polls = emulator_stats(url)["polls"]
    assert time.time is not real  # it stepped
    assert report.exit_code == 0
    assert polls <= 30 * 20, polls  # as many as without the step (~430); a storm made ~50 each


async def test_operations_that_expired_over_a_suspend_are_sent_again_not_blamed_on_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # review J, of the monotonic ages: a suspend stops the monotonic clock, not the server's
    # retention; operations expired over it answered 404 and were judged too young to have
    # expired: exit 3, "check --operation-url"
    real, real_clock = time.time, time.clock_gettime

    def suspend_once_running(snap: Any) -> None:  # woken 120 s later: the wall and boot clocks
        if snap.running == 3 and time.time is real:
            monkeypatch.setattr(time, "time", lambda: real() + 120)
            monkeypatch.setattr(time, "clock_gettime", lambda c: real_clock(c) + (120 if c == time.CLOCK_BOOTTIME else 0))

    with emulator_process("--latency", "1:1", "--op-expire-rate", "1") as url:
        async with batch_for(None, tmp_path, llm_url=url, operation_url=url, progress=suspend_once_running,
                             progress_interval=0.05, settings=fast_settings(retention=60.0)) as batch:  # fmt: skip
            await batch.add([f"p{i}" for i in range(3)])
            with anyio.fail_after(30), pytest.raises(runner.CredentialsError):
                await batch.run()  # the operations sent again expire at once too: this emulator
        submits = emulator_stats(url)["submits"]
    assert submits == 6  # each expired one sent again once, before the young 404 stopped the run


async def test_a_clock_stepped_forward_days_does_not_pass_a_wrong_operation_url_for_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # review K, of ab69854: a 404's age taken as the larger of the wall and monotonic ones made
    # every running operation "expired" after a 4-day forward step, with a wrong operation URL
    # (every poll 404): all 20 paid for again before the young ones stopped the run
    real = time.time

    def step_once_running(snap: Any) -> None:
        if snap.running == 20 and time.time is real:
            monkeypatch.setattr(time, "time", lambda: real() + 4 * 86400)

    with emulator_process() as llm, emulator_process() as elsewhere:  # polls go to the wrong one
        async with batch_for(None, tmp_path, llm_url=llm, operation_url=elsewhere, progress=step_once_running,
                             progress_interval=0.05,
                             settings=fast_settings(policy=PollPolicy(prior=2.0, min_wait=0.01))) as batch:  # fmt: skip
            await batch.add([f"p{i}" for i in range(20)])
            with anyio.fail_after(30), pytest.raises(runner.CredentialsError, match="not expiry"):
                await batch.run()
        submits = emulator_stats(llm)["submits"]
    assert submits == 20
