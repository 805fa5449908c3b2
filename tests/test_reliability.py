"""Crash safety with real kill -9, two runners on one database, bad input that must not touch
stored state, and credentials that must not leak into anything the run writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from tests.conftest import SENTINEL_KEY, db_rows, read_out, write_jobs
from tests.killloop import db_states, kill_loop
from tests.procs import child_env, emulator_process, emulator_stats, make_jobs, runner_cmd


def test_kill_9_loop_loses_nothing_and_duplicates_only_ambiguous_submits(tmp_path: Path) -> None:
    report = kill_loop(tmp_path, n_jobs=300, cycles=12, seed=5, max_sleep=1.2)
    assert report.lost == 0
    assert report.duplicate_lines == 0 and report.torn_lines == 0
    assert report.wrong_answers == 0  # every chat turn's answer is its own question's
    assert report.unexplained_duplicates == 0
    assert report.killed_in_state  # the kills landed while jobs were in flight
    assert report.retried > 0  # the retry in the middle had failed jobs to send again


def test_second_runner_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path / "jobs.jsonl", 50)
    with emulator_process("--latency", "1:2") as url:
        cmd = runner_cmd("run", str(jobs), "-o", "out.jsonl", "--submit-rps", "20")
        first = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(url), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (tmp_path / "runner.db.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        second = subprocess.run(
            cmd, cwd=tmp_path, env=child_env(url), capture_output=True, timeout=30
        )
        assert second.returncode == 2
        assert f"another runner (pid {first.pid})".encode() in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        third = subprocess.run(
            cmd, cwd=tmp_path, env=child_env(url), capture_output=True, timeout=120
        )
        assert third.returncode == 0, third.stderr.decode()
    assert len(read_out(tmp_path / "out.jsonl")) == 50


def test_a_database_reached_through_a_symlink_has_one_lock(tmp_path: Path) -> None:
    # review: the lock was named after the path as typed; `cancel --db alias` ran beside a live
    # run of the same database, dropped billed operation ids and left the run hanging
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / "t.db").symlink_to("../real/t.db")
    jobs = make_jobs(tmp_path / "jobs.jsonl", 30)
    with emulator_process("--latency", "2:3") as url:
        cmd = runner_cmd("run", str(jobs), "--db", "real/t.db", "--submit-rps", "20")
        first = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(url), stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while db_states(tmp_path / "real" / "t.db").get("running", 0) < 5:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for args in (["cancel"], ["retry"], ["run"]):
                r = subprocess.run(runner_cmd(*args, "--db", "alias/t.db"), cwd=tmp_path,
                                   env=child_env(url), capture_output=True, timeout=30)  # fmt: skip
                assert r.returncode == 2 and f"another runner (pid {first.pid})".encode() in r.stderr
            status = subprocess.run(runner_cmd("status", "--json", "--db", "alias/t.db"),
                                    cwd=tmp_path, env=child_env(url), capture_output=True)  # fmt: skip
            assert json.loads(status.stdout)["live"] is True
            assert first.wait(timeout=60) == 0
        finally:
            first.kill()
    assert db_states(tmp_path / "real" / "t.db") == {"done": 30}
    assert sorted(p.name for p in (tmp_path / "alias").iterdir()) == ["t.db"]


GOOD = '{"id": "a", "prompt": "stored already"}\n'
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope\n", "bad.jsonl:1: not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
    ("truncated last line", b'{"prompt": "ok"}\n{"prompt": "cut', "truncated"),
    ("array", b"[1, 2]\n", "expected a JSON object"),
    ("missing prompt", b'{"id": "x"}\n', "[prompt]"),
    ("empty messages", b'{"messages": []}\n', "[messages]"),
    ("unknown role", b'{"messages": [{"role": "robot", "text": "x"}]}\n', "[messages[0].role]"),
    ("text not a string", b'{"messages": [{"role": "user", "text": 1}]}\n', "[messages[0].text]"),
    ("duplicate ids", b'{"id": "d", "prompt": "1"}\n{"id": "d", "prompt": "2"}\n', "duplicate id 'd'"),
    ("known id changed", b'{"id": "a", "prompt": "changed"}\n', "already in the database (added from line 1) with different messages"),
    ("invalid utf-8", b'{"prompt": "\xc3\x28"}\n', "invalid UTF-8"),
    ("bom", b'\xef\xbb\xbf{"prompt": "x"}\n', "byte-order mark"),
    ("10 MB line", b'{"prompt": "' + b"x" * (10 << 20) + b'"}\n', "longer than"),
    ("unknown scheme", b'{"prompt": "x", "modelUri": "emb://f/m"}\n', "[model]"),
    ("maxTokens", b'{"prompt": "x", "completionOptions": {"maxTokens": -5}}\n', "[completionOptions.maxTokens]"),
    ("temperature", b'{"prompt": "x", "completionOptions": {"temperature": 2}}\n', "[completionOptions.temperature]"),
    ("unknown field", b'{"prompt": "x", "temprature": 0.5}\n', "[temprature]"),
]  # fmt: skip


@pytest.mark.parametrize("how", ["deleted", "replaced", "removed, named through a link and ..",
                                 "deleted with the working directory"])
def test_a_database_deleted_or_replaced_mid_run_stops_the_run_and_is_copied_out(tmp_path: Path, how: str) -> None:
    # rm -rf of the database's directory mid-run: the run went on writing to the unlinked
    # file, sent all 200 and exited 0; the same command then started a new database and paid
    # for all 200 again (review F). Stopping alone lost the operations still running, whose
    # ids were only in the unlinked file (review H): the run copies it out
    make_jobs(tmp_path / "jobs.jsonl", 200)
    (tmp_path / "state" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "state" / "sub")
    db = "link/../r.db" if how.startswith("removed") else "state/r.db"  # both state/r.db
    cwd, up = (tmp_path / "state", "../") if "working" in how else (tmp_path, "")
    with emulator_process("--latency", "2:3") as url:
        proc = subprocess.Popen(runner_cmd("run", f"{up}jobs.jsonl", "--db", "r.db" if up else db,
                                           "-o", f"{up}out.jsonl", "--submit-rps", "20"),
                                cwd=cwd, env=child_env(url), stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(3)  # ~60 submitted of 200, most of them running
        if how.startswith("deleted"):
            shutil.rmtree(tmp_path / "state")
        elif how.startswith("removed"):  # review H: "link/../r.db" was checked as ./r.db
            (tmp_path / "state" / "r.db").unlink()
        else:
            (tmp_path / "state" / "r.db").rename(tmp_path / "state" / "old.db")
            (tmp_path / "state" / "r.db").write_bytes((tmp_path / "state" / "old.db").read_bytes())
        _, err = proc.communicate(timeout=60)
        sent = emulator_stats(url)["submits"]
        assert proc.returncode == 5, err
        assert "deleted or replaced" in err and "sent nothing more" in err, err
        assert sent < 150, (sent, err)  # it stopped sending
        # the folder gone: the working directory, or with it the output's folder
        copy = "r.db.recovered" if how.startswith("deleted") else "state/r.db.recovered"
        assert f"saved to {tmp_path / copy}" in err, err
        if how == "replaced":  # review I: the run's -wal beside it, read as the new file's
            assert not (tmp_path / "state" / "r.db-wal").exists()
        r = subprocess.run(runner_cmd("run", "--db", copy, "-o", "out.jsonl"), cwd=tmp_path,
                           env=child_env(url), capture_output=True, text=True, timeout=90)  # fmt: skip
        total = emulator_stats(url)["submits"]
    assert r.returncode == 0, r.stderr
    lines = read_out(tmp_path / "out.jsonl")
    assert sorted(x["id"] for x in lines) == sorted(f"j{i}" for i in range(200))
    assert os.stat(tmp_path / copy).st_mode & 0o077 == 0
    ambiguous = db_rows(tmp_path / copy, "SELECT SUM(ambiguous) FROM jobs")[0][0]
    assert total - 200 <= ambiguous, (total, ambiguous)  # nothing paid twice that was not reported


def test_a_database_deleted_then_a_ctrl_c_before_any_commit_is_still_copied_out(tmp_path: Path) -> None:
    # review I: nothing committed after the removal, so nothing met it; Ctrl-C then said "state
    # is saved" while the 30 running operations' ids were only in the unlinked file
    make_jobs(tmp_path / "jobs.jsonl", 30)
    (tmp_path / "state").mkdir()
    with emulator_process("--latency", "30:31") as url:
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--db", "state/r.db", "-o", "out.jsonl"),
                                cwd=tmp_path, env=child_env(url), stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 20
        while db_states(tmp_path / "state" / "r.db").get("running", 0) < 30:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        shutil.rmtree(tmp_path / "state")
        proc.send_signal(signal.SIGINT)  # at once: before the watchdog's next look (1 s)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert f"saved to {tmp_path / 'r.db.recovered'}" in err, err
    assert db_rows(tmp_path / "r.db.recovered", "SELECT COUNT(*) FROM jobs WHERE state = 'running'") == [(30,)]


def test_an_emulator_batch_whose_database_was_replaced_resumes_from_its_copy(tmp_path: Path) -> None:
    # review I: the copy of a built-in emulator batch had no emulator state beside it, so its
    # running operations were unknown to the emulator that resumed it: 404, exit 3, every time
    make_jobs(tmp_path / "jobs.jsonl", 100)
    (tmp_path / "state").mkdir()
    env = child_env()
    proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--emulator", "--db", "state/r.db", "-o", "out.jsonl",
                                       "--submit-rps", "20"),
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2.5)
    (tmp_path / "state" / "r.db").rename(tmp_path / "state" / "old.db")
    (tmp_path / "state" / "r.db").write_bytes(b"")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5 and "r.db.recovered" in err, err
    r = subprocess.run(runner_cmd("run", "--emulator", "--db", "state/r.db.recovered", "-o", "out.jsonl"),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(read_out(tmp_path / "out.jsonl")) == 100


def test_a_database_moved_into_place_during_a_quiet_spell_is_read_as_it_is(tmp_path: Path) -> None:
    # review J: with every operation running and nothing to commit, the swap went unnoticed
    # for as long as they ran; meanwhile the run's -wal beside the path made `runner status`
    # read the run's 50 jobs from the other batch's file, and checkpoint them into it for good
    make_jobs(tmp_path / "jobs.jsonl", 50)
    write_jobs(tmp_path / "other.jsonl", [{"id": f"o{i}", "prompt": "x"} for i in range(10)])
    assert CliRunner().invoke(cli, ["run", str(tmp_path / "other.jsonl"), "--emulator", "--db",
                                    str(tmp_path / "other.db")]).exit_code == 0  # fmt: skip
    with emulator_process("--latency", "40:41") as url:
        proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--db", "r.db", "-o", "out.jsonl"),
                                cwd=tmp_path, env=child_env(url), stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 20
        while db_states(tmp_path / "r.db").get("running", 0) < 50:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (tmp_path / "other.db").rename(tmp_path / "r.db")
        time.sleep(3)  # the run notices within a second or two
        status = subprocess.run(runner_cmd("status", "--json", "--db", "r.db"), cwd=tmp_path,
                                env=child_env(url), capture_output=True, text=True, timeout=30)  # fmt: skip
        _, err = proc.communicate(timeout=20)  # it stopped by itself, its operations still running
    assert json.loads(status.stdout)["done"] == 10, status.stdout  # the other batch, as it was
    assert proc.returncode == 5 and "r.db.recovered" in err, err
    assert db_rows(tmp_path / "r.db.recovered", "SELECT COUNT(*) FROM jobs WHERE state = 'running'") == [(50,)]


@pytest.fixture
def stored_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text(GOOD)
    r = CliRunner().invoke(cli, ["run", "good.jsonl", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 0, r.output
    return tmp_path / "runner.db"


@pytest.mark.parametrize(("name", "content", "expect"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_leaves_the_database_byte_for_byte(
    stored_db: Path, name: str, content: bytes, expect: str
) -> None:
    bad = stored_db.parent / "bad.jsonl"
    bad.write_bytes(content)
    before = stored_db.read_bytes()
    r = CliRunner().invoke(cli, ["run", "bad.jsonl", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 2, r.output
    assert "bad.jsonl:" in r.output and expect in r.output
    assert stored_db.read_bytes() == before


@pytest.mark.parametrize("target", ["missing.jsonl", "."])
def test_missing_file_or_directory_leaves_the_database(stored_db: Path, target: str) -> None:
    before = stored_db.read_bytes()
    r = CliRunner().invoke(cli, ["run", target, "--emulator"])
    assert r.exit_code == 2
    assert ("no such file" in r.output) or ("is a directory" in r.output)
    assert stored_db.read_bytes() == before


def test_credentials_never_reach_files_or_logs(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"s{i}", "prompt": "x"} for i in range(5)])
    with emulator_process(
        "--latency", "0.01:0.05", "--fault", "submit:503=0.3", "--fault", "poll:500=0.3"
    ) as url:
        # 30% of requests fail: a budget of 50 faults per job keeps the run from failing a job
        # (six 503s in a row for one job did, about once in 300 runs)
        r = subprocess.run(runner_cmd("-vv", "run", str(jobs), "-o", "out.jsonl", "--max-faults", "50"),
                           cwd=tmp_path, env=child_env(url), capture_output=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr.decode()
        r2 = subprocess.run(runner_cmd("-vv", "status"), cwd=tmp_path, env=child_env(url),
                            capture_output=True, timeout=60)  # fmt: skip
    assert SENTINEL_KEY.encode() not in r.stdout + r.stderr + r2.stdout + r2.stderr
    assert b"Authorization" not in r.stderr
    for path in tmp_path.iterdir():
        if path.is_file():
            assert SENTINEL_KEY.encode() not in path.read_bytes(), path
            if path.name != "jobs.jsonl":
                assert os.stat(path).st_mode & 0o077 == 0, path


def test_permission_denied_exits_3_with_a_clear_message_and_resumes(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path / "jobs.jsonl", 5)
    with emulator_process("--fault", "submit:403=1") as url:
        r = subprocess.run(runner_cmd("run", str(jobs), "-o", "out.jsonl"), cwd=tmp_path,
                           env=child_env(url), capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 3, r.stderr.decode()
    assert b"permission denied" in r.stderr and b"rerun to resume" in r.stderr
    with emulator_process() as url:
        r = subprocess.run(runner_cmd("run", "-o", "out.jsonl"), cwd=tmp_path, env=child_env(url),
                           capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert len(read_out(tmp_path / "out.jsonl")) == 5
