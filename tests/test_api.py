"""The Python API (issue 13): the same durable batches from a script, a notebook or a pipeline.

The README's "From Python" examples are extracted and run here, each in a fresh directory and a
fresh interpreter, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import runner
from runner.credentials import Credentials
from runner.polling import PollPolicy
from tests.conftest import Emu, batch_for, fast_settings, read_out
from tests.killloop import db_states
from tests.procs import ROOT, child_env, emulator_process, emulator_stats

pytestmark = pytest.mark.anyio


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("n", range(4))
def test_the_readme_python_examples_run(tmp_path: Path, n: int) -> None:
    examples = readme_examples()
    assert len(examples) == 4
    env = {k: v for k, v in child_env().items() if not k.startswith("YC_")}  # as on a fresh machine
    r = subprocess.run([sys.executable, "-c", examples[n]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


async def test_results_come_back_in_input_order_and_to_dict_is_the_jsonl_line(
    emulator: Emu, tmp_path: Path
) -> None:
    jobs: list[Any] = [f"prompt {i}" for i in range(12)]
    jobs[3] = {"id": "named", "prompt": "with an id"}
    jobs[7] = {"turns": ["first", "second"]}

    def call() -> list[runner.Result]:
        return runner.run(jobs, db=tmp_path / "r.db", output=tmp_path / "out.jsonl",
                          llm_url=emulator.url, operation_url=emulator.url,
                          latency_prior=0.2)  # fmt: skip

    results = await asyncio.to_thread(call)
    assert [r.id for r in results] == [
        "named" if i == 3 else f"item-{i}" for i in range(12)
    ]
    lines = {x["id"]: x for x in read_out(tmp_path / "out.jsonl")}
    for r in results:
        assert r.ok and r.text and r.usage is not None and r.usage.total_tokens > 0
        assert r.to_dict() == lines[r.id]  # exactly the line in the output file
    assert len(results[7].turns or []) == 2
    again = await asyncio.to_thread(call)  # the same call again resumes: nothing is resent
    assert [r.to_dict() for r in again] == [r.to_dict() for r in results]
    assert emulator.stats["submits"] == 13


SCRIPT = """
import sys, runner
results = runner.run([f"prompt {{i}}" for i in range(40)], db="kernel.db",
                     llm_url="{url}", operation_url="{url}")
print("\\n".join(r.id + " " + r.status for r in results))
"""


def test_a_killed_process_resumes_on_the_next_call_paying_for_nothing_twice(tmp_path: Path) -> None:
    with emulator_process("--latency", "3:5") as url:
        script = SCRIPT.format(url=url)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while db_states(tmp_path / "kernel.db").get("running", 0) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a killed kernel, every operation in flight
        proc.wait()
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=child_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        stats = emulator_stats(url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [x for i in range(40) for x in (f"item-{i}", "done")]
    assert stats["submits"] == 40 and max(stats["submits_per_body"].values()) == 1


def test_the_blocking_helper_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    async def notebook_cell() -> list[runner.Result]:
        # Jupyter runs cells inside its event loop: a plain call must still work
        return runner.run(["from a notebook"], db=tmp_path / "nb.db", emulator=True)

    [result] = asyncio.run(notebook_cell())
    assert result.ok and "from a notebook" in (result.text or "")


def test_an_interrupt_becomes_interrupted_and_the_next_call_resumes(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import runner, sys
        try:
            runner.run([f"p{i}" for i in range(5)], db="i.db", llm_url=sys.argv[1],
                       operation_url=sys.argv[1])
        except runner.Interrupted as e:
            print("INTERRUPTED:", e)
            sys.exit(7)
    """)
    with emulator_process("--latency", "5:6") as url:
        proc = subprocess.Popen([sys.executable, "-c", script, url], cwd=tmp_path, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while db_states(tmp_path / "i.db").get("running", 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err
    assert "INTERRUPTED: interrupted: state is saved" in out
    assert db_states(tmp_path / "i.db") == {"running": 5}  # nothing lost, nothing resent


async def test_bad_input_raises_input_error_naming_the_item_and_field(tmp_path: Path) -> None:
    with pytest.raises(runner.InputError) as info:
        await asyncio.to_thread(
            runner.run, ["fine", {"prompt": "x", "temperature": 2}, {"id": 5, "prompt": ""}],
            db=tmp_path / "bad.db", emulator=True,
        )  # fmt: skip
    assert [str(p) for p in info.value.problems] == [
        "jobs[1] [temperature]: unknown field",
        "jobs[2] [prompt]: must not be empty",
    ]
    assert not (tmp_path / "bad.db").exists()  # nothing was stored


async def test_a_changed_item_names_what_changed_in_the_apis_words(tmp_path: Path) -> None:
    # newcomer: another model said "with different content", nothing about the model; a list
    # item said "(from line 0)", "use another --db" and "Fix the lines above"
    db = tmp_path / "m.db"
    await asyncio.to_thread(runner.run, ["hi"], db=db, emulator=True)
    with pytest.raises(runner.InputError) as info:
        await asyncio.to_thread(runner.run, ["hi"], db=db, emulator=True, model="yandexgpt")
    text = str(info.value)
    assert "jobs[0] [id]: job 'item-0' is already in the database (added from jobs[0]) with " \
        "another model (yandexgpt-lite/latest stored, yandexgpt/latest now; model= sets" in text
    assert "another database" in text and "Fix the items above" in text and "line" not in text
    with pytest.raises(runner.InputError) as info:
        await asyncio.to_thread(runner.run, [{"id": "item-0", "prompt": "hi", "completionOptions": {"temperature": 0.1}}],
                                db=db, emulator=True)  # fmt: skip
    assert "with different completionOptions;" in str(info.value)


async def test_items_that_are_not_json_raise_input_error_naming_the_item(tmp_path: Path) -> None:
    # each was a raw TypeError or sqlite3.OperationalError; a duplicate said "jobs:1 ... line 0"
    nan = {"prompt": "x", "jsonSchema": {"schema": {"a": float("nan")}}}
    bad = [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}, {"prompt": "x", "tools": [{"f": object()}]},
           {1: 2, "prompt": "x"}, nan, {"prompt": "ok", "id": 10**5000}]  # fmt: skip
    with pytest.raises(runner.InputError) as info:
        await asyncio.to_thread(runner.run, bad, db=tmp_path / "bad.db", emulator=True)
    shown = [str(p) for p in info.value.problems]
    assert shown[0] == "jobs[1] [id]: duplicate id 'x' (first at jobs[0])"
    assert shown[1].startswith("jobs[2] [tools]: is not JSON: Object of type object")
    assert shown[2] == "jobs[3]: field names must be strings"
    assert shown[3].startswith("jobs[4] [jsonSchema]: is not JSON: Out of range float")
    assert shown[4] == "jobs[5] [id]: integer out of range; give it as a string"
    with pytest.raises(runner.UsageError, match="a list of prompts or job objects, not dict"):
        await asyncio.to_thread(runner.run, {"id": "d1", "prompt": "x"}, db=tmp_path / "bad.db",
                                emulator=True)  # fmt: skip
    assert not (tmp_path / "bad.db").exists()  # nothing was stored


async def test_refused_credentials_raise_credentials_error(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator(reject_tokens=frozenset({"stale"}))
    with pytest.raises(runner.CredentialsError, match="401"):
        async with batch_for(e, tmp_path, credentials=Credentials("f", iam_token="stale")) as batch:
            await batch.add(["hello"])
            await batch.run()


async def test_the_async_batch_yields_results_as_they_finish(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator(latency=(0.05, 0.5))
    seen: list[runner.Result] = []
    snapshots: list[Any] = []
    async with batch_for(e, tmp_path, progress=snapshots.append, progress_interval=0.05) as batch:
        await batch.add([{"id": f"j{i}", "prompt": f"p{i}"} for i in range(30)])
        run = batch.run(output=tmp_path / "out.jsonl")
        async for result in run:
            seen.append(result)
            if len(seen) == 1:  # the first arrives while the others are still running
                assert (await batch.status())["done"] < 30
        report = await run
        status = await batch.status()
        assert [r.id for r in await batch.results()] == [r.id for r in seen]
    assert sorted(r.id for r in seen) == sorted(f"j{i}" for i in range(30))
    assert report.exit_code == 0 and report.this_run["submits"] == 30
    assert status["done"] == 30 and status["submits"] == 30
    assert snapshots and snapshots[-1].done == 30


async def test_retry_and_cancel_from_python(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator(op_error_rate=1.0)
    async with batch_for(e, tmp_path) as batch:
        await batch.add(["a", "b", "c"])
        report = await batch.run()
        assert report.exit_code == 1
        assert [r.status for r in await batch.results(status="failed")] == ["failed"] * 3
        assert await batch.retry() == 3
        assert (await batch.cancel(pending_only=True))["cancelledPending"] == 3
        assert (await batch.status())["cancelled"] == 3


def test_status_is_the_same_as_the_clis(tmp_path: Path) -> None:
    from tests.procs import run as cli_run

    runner.run(["one", "two"], db=tmp_path / "runner.db", emulator=True)

    async def status() -> dict[str, Any]:
        async with runner.Batch(tmp_path / "runner.db") as batch:
            return await batch.status()

    from_python = asyncio.run(status())
    from_cli = json.loads(cli_run(["status", "--json"], tmp_path).stdout)
    assert from_python.pop("database") == str(tmp_path / "runner.db")
    assert from_cli.pop("database") == "runner.db"  # each names it as it was given
    assert from_python == from_cli and from_cli["done"] == 2


def test_a_jobs_file_gives_its_results_in_the_files_order(tmp_path: Path) -> None:
    # for a path it returned every finished job in the database, in finishing order
    (tmp_path / "other.jsonl").write_text('{"id": "j4", "prompt": "prompt j4"}\n{"id": "zz", "prompt": "x"}\n')
    (tmp_path / "jobs.jsonl").write_text("".join(f'{{"id": "j{i}", "prompt": "prompt j{i}"}}\n' for i in range(5)))
    runner.run(tmp_path / "other.jsonl", db=tmp_path / "api.db", emulator=True)
    results = runner.run(tmp_path / "jobs.jsonl", db=tmp_path / "api.db", emulator=True)
    assert [r.id for r in results] == ["j0", "j1", "j2", "j3", "j4"]


def test_bad_input_leaves_a_users_empty_database_file_as_it_was(tmp_path: Path) -> None:
    # a 0-byte file (say from mkstemp) counted as "created by runner" and was deleted
    mine = tmp_path / "mine.db"
    mine.write_bytes(b"")
    with pytest.raises(runner.InputError):
        runner.run([{"id": "x", "prompt": ""}], db=mine, emulator=True)
    assert mine.exists() and mine.read_bytes() == b""


async def tail_snapshots(e: Emu, tmp_path: Path, prior: float) -> list[Any]:
    """Progress snapshots of three jobs while all are submitted and none is done."""
    snapshots: list[Any] = []
    settings = fast_settings(policy=PollPolicy(prior=prior, min_wait=0.01))
    async with batch_for(e, tmp_path, settings=settings, progress=snapshots.append,
                         progress_interval=0.2) as batch:  # fmt: skip
        await batch.add(["a", "b", "c"])
        assert (await batch.run()).exit_code == 0
    return [s for s in snapshots if s.pending == 0 and s.running > 0 and s.done == 0]


async def test_the_eta_counts_down_while_the_last_operations_run(make_emulator: Any, tmp_path: Path) -> None:
    # with nothing left to submit the ETA was the learned latency, the same on every line
    snaps = await tail_snapshots(await make_emulator(latency=(1.5, 1.5)), tmp_path, 3.0)
    tail = [s.eta for s in snaps if s.eta is not None]  # None only at the prior's very end
    assert len(tail) >= 3, tail
    assert tail[-1] < tail[0] - 0.5, tail  # it counts down


async def test_the_eta_is_unknown_not_zero_once_operations_outlive_the_prior(make_emulator: Any, tmp_path: Path) -> None:
    # review H: operations running past the prior, nothing learned: "ETA 0s" on every line
    tail = await tail_snapshots(await make_emulator(latency=(2.0, 2.0)), tmp_path, 0.5)
    assert len(tail) >= 3 and all(s.eta is None or s.eta > 0 for s in tail), [s.eta for s in tail]
    assert tail[-1].eta is None and "ETA unknown" in tail[-1].line(), tail[-1].line()


async def test_progress_rates_stay_within_the_quota_they_are_paced_by(make_emulator: Any, tmp_path: Path) -> None:
    # a snapshot taken 50 ms after another divided one submit by 50 ms: "20/10 per s"
    e = await make_emulator(latency=(0.05, 0.1))
    snapshots: list[Any] = []
    async with batch_for(e, tmp_path, settings=fast_settings(submit_rps=10.0),
                         progress=snapshots.append, progress_interval=0.05) as batch:  # fmt: skip
        await batch.add([f"p{i}" for i in range(25)])
        assert (await batch.run()).exit_code == 0
    rates = [round(s.submit_rate, 1) for s in snapshots]
    assert len(rates) > 20 and max(rates) > 5, rates  # it measured the pace
    assert max(rates) <= 10 * 1.3, rates


@pytest.mark.parametrize("form", ["await", "async for"])
async def test_a_refused_run_raises_where_it_is_awaited(make_emulator: Any, tmp_path: Path, form: str) -> None:
    # review F: the refusal (another Batch holds the database) cancelled the whole `async with`
    # body and came out of __aexit__: the caller's `except` never ran, nor the code after it
    e = await make_emulator()
    reached: list[str] = []
    async with batch_for(e, tmp_path) as holder:
        await holder.add(["x"])  # holds the run lock until it exits
        async with batch_for(e, tmp_path) as other:
            try:
                if form == "await":
                    await other.run()
                else:
                    async for _ in other.run():
                        pass
            except runner.RunnerError as error:
                reached.append(str(error))
            reached.append("after")
    assert len(reached) == 2 and "another runner" in reached[0], reached


async def test_a_chdir_during_a_run_does_not_pass_for_a_deleted_database(
    make_emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check that the database is still there must look where it was opened
    e = await make_emulator(latency=(0.2, 1.5), seed=1)  # results spread over a second
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    async with runner.Batch("rel.db", llm_url=e.url, operation_url=e.url,
                            credentials=Credentials("f", api_key="k"), settings=fast_settings()) as batch:  # fmt: skip
        await batch.add([f"p{i}" for i in range(8)])
        run = batch.run()
        seen = 0
        async for _ in run:
            seen += 1
            os.chdir(tmp_path / "elsewhere")  # a notebook changing directory mid-run
        assert (await run).exit_code == 0 and seen == 8
    assert not (tmp_path / "elsewhere" / "rel.db").exists()


async def test_a_batch_whose_database_was_deleted_refuses_more_work(make_emulator: Any, tmp_path: Path) -> None:
    # review I: after the run stopped on the deleted file, the same Batch took more jobs and
    # sent them into it (171 more submits), then pointed at a second copy
    e = await make_emulator(latency=(1.0, 1.5))
    db = tmp_path / "runner.db"

    def remove_once_running(snap: Any) -> None:
        if snap.running == 5 and db.exists():
            db.unlink()

    async with batch_for(e, tmp_path, progress=remove_once_running, progress_interval=0.1) as batch:
        await batch.add([f"p{i}" for i in range(5)])
        with pytest.raises(runner.StorageError, match=r"saved to .*runner\.db\.recovered"):
            await batch.run()
        with pytest.raises(runner.StorageError, match="deleted or replaced"):
            await batch.add([{"id": "more", "prompt": "more"}])
        with pytest.raises(runner.StorageError, match="deleted or replaced"):
            await batch.run()
    async with runner.Batch(tmp_path / "runner.db.recovered", llm_url=e.url, operation_url=e.url,
                            credentials=Credentials("f", api_key="k"), settings=fast_settings()) as copy:  # fmt: skip
        assert (await copy.run()).exit_code == 0
        assert [r.status for r in await copy.results()] == ["done"] * 5
    assert e.stats["submits"] == 5
