"""Findings of the adversarial review of the money-safety work, each reproduced, then fixed.

Every test here failed before its fix. They drive the real thing: SQLite files, the emulator
over loopback, subprocesses with a real file-size limit (RLIMIT_FSIZE) standing in for a full
disk, and a real tmpfs where the machine allows mounting one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.database import Database
from runner.errors import StorageError
from runner.jobs import Answered, Completion
from runner.pacing import Pacer
from runner.wire import Malformed, parse_completion
from tests.conftest import batch_for, db_rows, read_out, write_jobs
from tests.killloop import db_states
from tests.procs import (
    ROOT,
    child_env,
    emulator_process,
    emulator_stats,
    kill_when_running,
    make_jobs,
    run,
    runner_cmd,
    stoppable_emulator,
)


def answer(text: str) -> dict[str, Any]:
    return {"alternatives": [{"message": {"role": "assistant", "text": text}}],
            "usage": {"totalTokens": "3"}}  # fmt: skip


def test_an_answer_that_cannot_be_stored_is_malformed_not_a_crash() -> None:
    with pytest.raises(Malformed, match="not valid text"):
        parse_completion(answer("half an emoji \ud83d"))
    with pytest.raises(Malformed, match="out of range"):
        parse_completion({**answer("x"), "usage": {"totalTokens": str(2**63)}})


@pytest.mark.anyio
async def test_one_outcome_the_store_refuses_does_not_take_the_others_down(
    make_emulator: Any, tmp_path: Path
) -> None:
    from runner.queue import Queue
    from runner.writer import Writer

    e = await make_emulator()
    async with batch_for(e, tmp_path) as batch:
        await batch.add(["a", "b"])
    async with Database.open(str(tmp_path / "runner.db")) as db:
        queue = Queue(db)
        claims = await queue.claim(2, 1e12)
        writer = Writer(queue, None, budget=32768, on_applied=lambda _: None)
        bad = Completion("\ud83d", "FINAL", {"totalTokens": 1}, "v")  # past the wire's checks
        good = Completion("fine", "FINAL", {"totalTokens": 1}, "v")
        await writer.flush([Answered(claims[0].attempt, 1.0, bad),
                            Answered(claims[1].attempt, 1.0, good)])  # fmt: skip
    states = dict(db_rows(tmp_path / "runner.db", "SELECT id, state FROM jobs"))
    assert states == {"item-0": "failed", "item-1": "done"}


def test_output_files_a_user_owns_are_never_overwritten(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 3)
    out = tmp_path / "out.jsonl"
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl", "-o", "out.jsonl"], tmp_path, url).returncode == 0
        out.write_text("my own small file\n")  # A: replaced by the user, shorter than recorded
        r = run(["run", "-o", "out.jsonl"], tmp_path, url)
        assert r.returncode == 2 and out.read_text() == "my own small file\n"
        out.unlink()
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 0
        assert run(["retry", "--status", "failed"], tmp_path).returncode == 0
        big = "x" * 5000 + "\n"
        out.write_text(big)  # B: after a retry (a rebuild pending), a larger file of the user's
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 2 and out.read_text() == big
        assert run(["results", "-o", "export.jsonl"], tmp_path).returncode == 0
        export = tmp_path / "export.jsonl"
        edited = "EDITED" + export.read_text()[6:]  # C and D: an export edited at its start
        export.write_text(edited)
        assert run(["run", "-o", "export.jsonl"], tmp_path, url).returncode == 2
        assert run(["results", "-o", "export.jsonl"], tmp_path).returncode == 2
        assert export.read_text() == edited


def test_cancel_also_cancels_jobs_a_killed_run_left_mid_submit(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 6)
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl"], tmp_path, url).returncode == 0
        con = sqlite3.connect(tmp_path / "runner.db")
        with con:  # the state a kill -9 leaves: some claimed, not yet answered
            con.execute("UPDATE jobs SET state='submitting', finish_seq=NULL, result=NULL "
                        "WHERE id IN ('j0', 'j1')")  # fmt: skip
            con.execute("UPDATE jobs SET state='pending', finish_seq=NULL, result=NULL "
                        "WHERE id IN ('j2')")  # fmt: skip
        con.close()
        before = emulator_stats(url)["submits"]
        assert run(["cancel"], tmp_path, url).returncode == 0
        assert run(["run"], tmp_path, url).returncode == 0
        assert emulator_stats(url)["submits"] == before  # nothing paid for after the cancel
    status = json.loads(run(["status", "--json"], tmp_path).stdout)
    assert status["cancelled"] == 3 and status["ambiguousSubmits"] == 2


@pytest.mark.parametrize("mode", ["ignore", "refuse"])
def test_cancel_stops_chats_whose_turn_is_running_and_retry_resumes_them(
    tmp_path: Path, mode: str
) -> None:
    # review: the server ignored or refused the cancel (completions are probably not
    # cancellable), the next run collected the running turn and then paid for every remaining
    # turn of every chat the user had cancelled: 5 submits became 13
    jobs = [{"id": f"c{i}", "turns": [f"q1 {i}", f"q2 {i}", f"q3 {i}"]} for i in range(3)]
    write_jobs(tmp_path / "jobs.jsonl", [*jobs, {"id": "p", "prompt": "plain"}])
    with emulator_process("--latency", "2:2.5", "--cancel-mode", mode) as url:
        kill_when_running(tmp_path, url, 4)
        report = json.loads(run(["cancel", "--json"], tmp_path, url).stdout)
        assert report == {"cancelledPending": 0, "cancelledRunning": 0, "finishedRunning": 0,
                          "leftRunning": 4}  # fmt: skip
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 0
        assert emulator_stats(url)["submits"] == 4  # nothing sent after the cancel
        out = {r["id"]: r for r in read_out(tmp_path / "out.jsonl")}
        assert out["p"]["status"] == "done"  # its answer was paid for: it is kept
        for i in range(3):  # the paid turn is kept, the chat stops there
            assert out[f"c{i}"]["status"] == "cancelled" and len(out[f"c{i}"]["turns"]) == 1
        assert run(["retry", "--status", "cancelled"], tmp_path, url).returncode == 0
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 0
        stats = emulator_stats(url)
    assert stats["submits"] == 4 + 3 * 2  # each chat's two unanswered turns, once each
    assert max(stats["submits_per_body"].values()) == 1
    out = {r["id"]: r for r in read_out(tmp_path / "out.jsonl")}
    assert all(out[f"c{i}"]["status"] == "done" and len(out[f"c{i}"]["turns"]) == 3
               for i in range(3))  # fmt: skip


def test_a_cancelled_chat_whose_next_turn_is_over_budget_is_cancelled_with_its_usage(
    tmp_path: Path,
) -> None:
    # review: the collected answer of a cancelled chat, its next turn over the context budget,
    # failed the chat ("over the context budget") instead of cancelling it; and the line of a
    # failed or cancelled chat had no usage, though it carries paid turns
    write_jobs(tmp_path / "jobs.jsonl", [{"id": "c", "turns": ["x" * 300, "y" * 300]}])
    with emulator_process("--latency", "2:2.5", "--cancel-mode", "ignore") as url:
        kill_when_running(tmp_path, url, 1)
        assert run(["cancel"], tmp_path, url).returncode == 0
        r = run(["run", "-o", "out.jsonl", "--context-budget", "200"], tmp_path, url)
        assert r.returncode == 0, r.stderr
    [line] = read_out(tmp_path / "out.jsonl")
    assert line["status"] == "cancelled" and len(line["turns"]) == 1
    assert line["usage"] == line["turns"][0]["usage"] and line["usage"]["totalTokens"] > 0


def test_bytes_written_to_the_output_during_a_run_are_left_alone(tmp_path: Path) -> None:
    # review: runner checked the file only at start; a line a user appended mid-run was cut
    # (the file was cut back to runner's length and written over), and the run exited 0
    make_jobs(tmp_path / "jobs.jsonl", 40)
    out = tmp_path / "out.jsonl"
    with emulator_process("--latency", "0.5:4") as url:
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "-o", "out.jsonl"), cwd=tmp_path,
                                env=child_env(url), stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with out.open("a") as f:
            f.write("a line of the user's own\n")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 5, err
        assert "stopped writing out.jsonl: it has bytes runner did not write" in err
        assert out.read_text().endswith("a line of the user's own\n")
        out.rename(tmp_path / "mine.jsonl")  # moved away, the next run writes it in full
        assert run(["run", "-o", "out.jsonl"], tmp_path, url).returncode == 0
    assert sorted(r["id"] for r in read_out(out)) == sorted(f"j{i}" for i in range(40))


def test_two_runs_of_two_databases_never_write_one_output(tmp_path: Path) -> None:
    # review: each run checked the empty file, then wrote at its own offsets over the other's
    # lines: a.db's 50 lines were all overwritten by b.db's, and b exited 0
    make_jobs(tmp_path / "jobs.jsonl", 30)
    (tmp_path / "one.jsonl").write_text('{"id": "x", "prompt": "y"}\n')
    with emulator_process("--latency", "1:2") as url:
        assert run(["run", "one.jsonl", "--db", "c.db"], tmp_path, url).returncode == 0
        first = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--db", "a.db", "-o", "out.jsonl"),
                                 cwd=tmp_path, env=child_env(url), stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while not (tmp_path / "out.jsonl").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = run(["run", "jobs.jsonl", "--db", "b.db", "-o", "out.jsonl"], tmp_path, url)
        assert second.returncode == 2 and "another runner is writing it" in second.stderr
        assert not (tmp_path / "b.db").exists()  # refused before anything was stored
        # nor may an export of another database replace it (it was, while still empty)
        export = run(["results", "--db", "c.db", "-o", "out.jsonl"], tmp_path, url)
        assert export.returncode == 2 and "another runner is writing it" in export.stderr
        assert first.wait(timeout=60) == 0
    assert sorted(r["id"] for r in read_out(tmp_path / "out.jsonl")) == sorted(
        f"j{i}" for i in range(30)
    )


def test_ctrl_c_while_jobs_are_being_added_stops_before_anything_is_sent(tmp_path: Path) -> None:
    # review: a SIGINT before the run's workers listened was lost: a run of 20,000 jobs went on
    # submitting (paying) until a second Ctrl-C. Started as a shell starts `runner run ... &`
    # (SIGINT ignored until a handler is set), as in the review; cancelled while it connected
    # to the database, aiosqlite's thread outlived the loop with a traceback
    with (tmp_path / "jobs.jsonl").open("w") as f:
        for i in range(30_000):
            f.write(json.dumps({"id": f"j{i}", "prompt": f"prompt number {i}"}) + "\n")
    with emulator_process() as url:
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl"), cwd=tmp_path, env=child_env(url),
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        deadline = time.monotonic() + 30
        while not (tmp_path / "runner.db").exists():  # adding the jobs has begun
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        stats = emulator_stats(url)
    assert proc.returncode == 130, err
    assert "interrupted before anything was sent" in err and "Traceback" not in err
    assert stats.get("submits", 0) == 0


def test_a_second_ctrl_c_ends_a_run_waiting_for_its_requests(tmp_path: Path) -> None:
    # review: after the first Ctrl-C (the run waits for the requests on the wire: here sync
    # completions of 40 s), a second Ctrl-C and a SIGTERM were ignored until they came back
    make_jobs(tmp_path / "jobs.jsonl", 2)
    with stoppable_emulator("--latency", "40:41") as (url, _):
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--mode", "sync"), cwd=tmp_path,
                                env=child_env(url), stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while db_states(tmp_path / "runner.db").get("submitting", 0) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert proc.poll() is None  # the first waits for the answers on the wire
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_cancel_stopped_part_way_has_cancelled_every_pending_job(tmp_path: Path) -> None:
    # review: cancel marked the running jobs, then asked the server about each (at the poll
    # rate) and cancelled the pending ones last: stopped part way, the pending ones stayed
    # pending and the next run, which collects the running ones, paid for them
    jobs = [{"id": f"c{i}", "turns": ["one", "two"]} for i in range(2)]
    write_jobs(tmp_path / "jobs.jsonl", [*jobs, *({"id": f"p{i}", "prompt": "x"} for i in range(8))])
    with stoppable_emulator("--latency", "2:2.5", "--cancel-mode", "ignore") as (url, emu):
        kill_when_running(tmp_path, url, 2, rps="1")
        emu.send_signal(signal.SIGSTOP)  # the server stops answering: cancel waits on it
        cancel = subprocess.Popen(runner_cmd("cancel"), cwd=tmp_path, env=child_env(url),
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(3)
        cancel.send_signal(signal.SIGTERM)
        cancel.wait(timeout=30)
        emu.send_signal(signal.SIGCONT)
        states = db_states(tmp_path / "runner.db")
        assert states.get("pending", 0) == 0 and states["cancelled"] >= 6, states
        before = emulator_stats(url)["submits"]
        assert run(["run"], tmp_path, url).returncode == 0
        assert emulator_stats(url)["submits"] == before  # nothing more was paid for


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_a_command_other_than_run_says_so_after_its_cleanup(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # review: the handler that ends the process at once during start-up stayed for the whole
    # command: `cancel` (waiting on a server that hangs) exited 130 saying nothing, `results`
    # skipped closing its batch ("coroutine 'Batch.__aexit__' was never awaited") and once hung;
    # then SIGTERM killed `cancel` silently (rc -15)
    make_jobs(tmp_path / "jobs.jsonl", 4)
    with stoppable_emulator("--latency", "2:2.5") as (url, emu):
        kill_when_running(tmp_path, url, 2)
        emu.send_signal(signal.SIGSTOP)
        cancel = subprocess.Popen(runner_cmd("cancel"), cwd=tmp_path, env=child_env(url),
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(3)
        cancel.send_signal(sig)
        _, err = cancel.communicate(timeout=30)
    assert cancel.returncode == 130
    assert "interrupted: state is saved" in err and "Traceback" not in err
    assert "never awaited" not in err


def test_ctrl_c_stops_status_watch_with_130(tmp_path: Path) -> None:
    # review: `status --watch` ("until Ctrl-C") exited 1, "Aborted!", which means some jobs failed
    make_jobs(tmp_path / "jobs.jsonl", 2)
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl"], tmp_path, url).returncode == 0
    watch = subprocess.Popen(runner_cmd("status", "--watch"), cwd=tmp_path, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2.5)
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=20)
    assert watch.returncode == 130, err
    assert "Aborted" not in err and "Traceback" not in err


def test_a_command_run_in_process_leaves_the_hosts_signal_handlers_alone(tmp_path: Path) -> None:
    # review: every command set the process's SIGINT and SIGTERM handlers, so an application
    # (or test) calling the CLI in-process lost its own, and from a thread it failed
    from click.testing import CliRunner

    from runner.cli import cli

    def mine(*_: Any) -> None:
        pass

    kept = signal.signal(signal.SIGTERM, mine)
    try:
        for args in (["status", "--db", str(tmp_path / "none.db")], ["--version"]):
            CliRunner().invoke(cli, args)
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, kept)


def limited(limit: int) -> Any:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_at_start_is_exit_5_and_one_line(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 20)
    with emulator_process("--latency", "20:30") as url:
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--submit-rps", "5"), cwd=tmp_path,
                                env=child_env(url), stderr=subprocess.DEVNULL)  # fmt: skip
        while db_states(tmp_path / "runner.db").get("running", 0) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # leaves pending, running and maybe submitting jobs
        proc.wait()
        # each needs to write from its first step, on a disk with no room at all
        for args in (["run"], ["cancel", "--pending-only"], ["retry"]):
            r = subprocess.run(runner_cmd(*args), cwd=tmp_path, env=child_env(url), text=True,
                               capture_output=True, timeout=60, preexec_fn=limited(1))  # fmt: skip
            assert r.returncode in (0, 5), (args, r.stderr)
            assert "Traceback" not in r.stderr
            if r.returncode == 5:
                assert r.stderr.count("\n") == 1 and "free space" in r.stderr


def test_a_rescue_that_does_not_fit_saves_whole_records_and_says_how_many(tmp_path: Path) -> None:
    script = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
from runner.jobs import Attempt, Submitted
from runner.writer import save_rescue
resource.setrlimit(resource.RLIMIT_FSIZE, (250, 250))
records = [Submitted(Attempt(i, 1), "op-%04d" % i, 1.0) for i in range(10)]
print(save_rescue(sys.argv[1], records))
"""
    path = tmp_path / "runner.db.rescue"
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    saved = int(r.stdout)
    assert 0 < saved < 10, r.stderr
    text = path.read_bytes().split(b"\0", 1)[0].decode()
    assert [json.loads(x)["submitted"] for x in text.splitlines()] == [f"op-{i:04d}" for i in range(saved)]


@pytest.mark.anyio
async def test_a_sync_answer_applied_twice_is_counted_once(make_emulator: Any, tmp_path: Path) -> None:
    from runner.queue import Queue

    e = await make_emulator()
    async with batch_for(e, tmp_path) as batch:
        await batch.add(["a"])
    async with Database.open(str(tmp_path / "runner.db")) as db:
        queue = Queue(db)
        [claim] = await queue.claim(1, 1e12)
        answered = Answered(claim.attempt, 1.0, Completion("x", "F", {"totalTokens": 7}, "v"))
        await queue.apply([answered])
        await queue.apply([answered])  # a rescue file applied again after a kill
    assert db_rows(tmp_path / "runner.db", "SELECT total_tokens FROM totals") == [(7,)]


@pytest.mark.anyio
async def test_a_failing_output_record_is_a_storage_error(make_emulator: Any, tmp_path: Path) -> None:
    from runner.output import OutputFile

    e = await make_emulator()
    async with batch_for(e, tmp_path) as batch:
        await batch.add(["a"])
        await batch.run()
    async with Database.open(str(tmp_path / "runner.db")) as db:
        out = OutputFile(db, str(tmp_path / "out.jsonl"))
        await out.open()
        await db.con.execute("UPDATE outputs SET last_seq = 0")  # so there is a line to write
        await db.con.execute("PRAGMA query_only = ON")  # and its record cannot be written
        with pytest.raises(StorageError, match="cannot write"):
            await out.export()


def test_an_output_file_shorter_than_recorded_is_never_padded(tmp_path: Path) -> None:
    from runner.output import OutputFile

    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n')
    file = OutputFile.__new__(OutputFile)
    file.path, file._torn = str(path), False
    file._fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(StorageError, match="is shorter than runner wrote"):
            file._append(b'{"id": 2}\n', 50)
    finally:
        file.close()
    assert path.read_bytes() == b'{"id": 1}\n'


def test_sync_mode_collects_operations_an_async_run_left_running(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 10)
    with emulator_process("--latency", "2:3") as url:
        kill_when_running(tmp_path, url, 10)
        r = run(["run", "--mode", "sync", "-o", "out.jsonl"], tmp_path, url, timeout=60)
        stats = emulator_stats(url)
    assert r.returncode == 0, r.stderr
    assert len(read_out(tmp_path / "out.jsonl")) == 10 and stats["submits"] == 10


def test_a_cancelled_chat_keeps_the_turns_it_paid_for(tmp_path: Path) -> None:
    write_jobs(tmp_path / "c.jsonl", [{"id": "c1", "turns": ["one", "two"]}])
    with emulator_process("--latency", "0.05:0.1") as url:
        assert run(["run", "c.jsonl"], tmp_path, url).returncode == 0
    con = sqlite3.connect(tmp_path / "runner.db")
    with con:  # turn 2 was pending when the batch was cancelled
        con.execute("UPDATE jobs SET state='cancelled', result=NULL, "
                    "transcript=json_array(json_extract(result, '$.turns[0]'))")  # fmt: skip
    con.close()
    [line] = [json.loads(x) for x in run(["results"], tmp_path).stdout.splitlines()]
    assert line["status"] == "cancelled" and len(line["turns"]) == 1


@pytest.mark.anyio
async def test_the_pacer_never_asks_to_sleep_a_negative_time() -> None:
    ticks = [0.0]

    def clock() -> float:  # every read a little later, as a real clock under load
        ticks[0] += 0.0004
        return ticks[0]

    pacer = Pacer(rate=1000.0, clock=clock)
    for _ in range(200):
        await pacer.slot()


def tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_on_a_really_full_disk_the_reserved_rescue_keeps_every_operation_id(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not tmpfs(disk, "6m"):
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        make_jobs(disk / "jobs.jsonl", 300)
        with emulator_process("--latency", "0.3:0.8") as url:
            proc = subprocess.Popen(
                runner_cmd("run", "jobs.jsonl", "-o", "out.jsonl", "--submit-rps", "100",
                           "--storage-patience", "1"),
                cwd=disk, env=child_env(url), stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            while not (disk / "out.jsonl").exists() or (disk / "out.jsonl").stat().st_size < 3000:
                time.sleep(0.01)
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:  # fill the disk to the last byte
                while os.write(fd, b"\0" * 65536) > 0:
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 5, err
            (disk / "filler").unlink()
            assert run(["run", "-o", "out.jsonl"], disk, url, timeout=120).returncode == 0
            stats = emulator_stats(url)
            ambiguous = json.loads(run(["status", "--json"], disk).stdout)["ambiguousSubmits"]
        # a claim the full disk kept from being released is counted ambiguous though never sent
        # (the submitter holds one batch of ~100 ms while the next is claimed: at 100/s, 20)
        assert 300 <= stats["submits"] <= 300 + ambiguous and ambiguous <= 25
        assert len(read_out(disk / "out.jsonl")) == 300
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_ctrl_c_with_thousands_of_polls_due_at_once_and_no_pace_stops_at_once(tmp_path: Path) -> None:
    # the request semaphores and the pacer's lock take no checkpoint when free (53d43d2): at a
    # pace beyond the loop's, with every operation of a resumed run due at once, the poller
    # must still yield, so a Ctrl-C ends the run promptly and nothing is submitted again
    make_jobs(tmp_path / "jobs.jsonl", 1000)
    with stoppable_emulator("--latency", "3:3", "--submit-rps", "100000", "--poll-rps",
                            "1000000") as (url, _):  # fmt: skip
        kill_when_running(tmp_path, url, 1000, rps="100000")
        assert db_states(tmp_path / "runner.db").get("running") == 1000
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--poll-rps", "1000000"),
                                cwd=tmp_path, env=child_env(url, RUNNER_LATENCY_PRIOR="0.01"),
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while emulator_stats(url).get("polls", 0) < 200:  # the loaded operations' first polls
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
        assert proc.returncode == 130, err
        assert stopped < 3.0, stopped
        assert emulator_stats(url)["submits"] == 1000  # nothing paid for again
        assert run(["run", "jobs.jsonl", "--poll-rps", "100000"], tmp_path, url).returncode == 0
        assert emulator_stats(url)["submits"] == 1000
    assert db_states(tmp_path / "runner.db") == {"done": 1000}
