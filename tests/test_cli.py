"""The command line, through click's CliRunner and through real subprocesses and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from tests.conftest import SENTINEL_KEY, read_out
from tests.procs import child_env, emulator_process, emulator_stats, make_jobs, runner_cmd

ROOT = Path(__file__).parent.parent
EXAMPLE = str(ROOT / "jobs.example.jsonl")


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_example_runs_on_the_emulator_without_credentials(
    cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("YC_API_KEY")
    monkeypatch.delenv("YC_FOLDER_ID")
    r = CliRunner().invoke(cli, ["run", EXAMPLE, "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 0, r.output
    n = sum(1 for line in Path(EXAMPLE).read_text().splitlines() if line.strip())
    out = read_out(cwd / "out.jsonl")
    assert len(out) == n and len({x["id"] for x in out}) == n
    assert all(x["status"] == "done" for x in out)

    r = CliRunner().invoke(cli, ["status", "--json"])
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["total"] == n and data["done"] == n
    for key in ("pending", "running", "failed", "cancelled"):
        assert data[key] == 0
    assert data["usage"]["totalTokens"] == sum(x["usage"]["totalTokens"] for x in out)

    r = CliRunner().invoke(cli, ["run", EXAMPLE, "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 0 and "0 submits" in r.output
    assert len(read_out(cwd / "out.jsonl")) == n


def test_run_json_prints_its_report_on_stdout(cwd: Path) -> None:
    # `run --json` printed nothing on stdout (only --dry-run honoured it)
    r = CliRunner().invoke(cli, ["run", EXAMPLE, "--emulator", "-o", "out.jsonl", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    n = len(read_out(cwd / "out.jsonl"))
    assert data["added"] == n and data["counts"]["done"] == n and data["exitCode"] == 0
    assert data["thisRun"]["submits"] >= n


def test_results_export_csv_and_status_filter(cwd: Path) -> None:
    CliRunner().invoke(cli, ["run", EXAMPLE, "--emulator"])
    r = CliRunner().invoke(cli, ["results", "-o", "r.csv", "--format", "csv", "--status", "done"])
    assert r.exit_code == 0, r.output
    assert (cwd / "r.csv").stat().st_mode & 0o077 == 0
    header, *rows = (cwd / "r.csv").read_text().splitlines()
    assert header.startswith("id,status,text,alternativeStatus,inputTextTokens")
    assert len(rows) == sum(1 for line in Path(EXAMPLE).read_text().splitlines() if line.strip())
    r = CliRunner().invoke(cli, ["results", "--status", "failed"])
    assert r.exit_code == 0 and r.output == ""


def test_missing_credentials_is_a_usage_error(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YC_API_KEY")
    r = CliRunner().invoke(cli, ["run", EXAMPLE])
    assert r.exit_code == 2
    assert "YC_API_KEY" in r.output and "YC_FOLDER_ID" in r.output
    assert not (cwd / "runner.db").exists()


def test_bad_input_exits_2_with_file_line_field(cwd: Path) -> None:
    (cwd / "bad.jsonl").write_text(
        '{"prompt": "ok"}\n{"prompt": "x", "completionOptions": {"temperature": 3}}\n'
    )
    r = CliRunner().invoke(cli, ["run", "bad.jsonl", "--emulator"])
    assert r.exit_code == 2
    assert "bad.jsonl:2 [completionOptions.temperature]" in r.output
    assert "Nothing was stored or sent" in r.output


def test_status_of_missing_database(cwd: Path) -> None:
    r = CliRunner().invoke(cli, ["status", "--db", "nope.db"])
    assert r.exit_code == 2 and "no such database" in r.output
    assert not (cwd / "nope.db").exists()


def test_subprocess_against_standalone_emulator(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path / "jobs.jsonl", 20)
    with emulator_process("--latency", "0.01:0.05") as url:
        cmd = runner_cmd("run", str(jobs), "-o", "out.jsonl", "--submit-rps", "100")
        done = subprocess.run(
            cmd, cwd=tmp_path, env=child_env(url), capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
        assert emulator_stats(url)["submits"] == 20
        again = subprocess.run(
            cmd, cwd=tmp_path, env=child_env(url), capture_output=True, timeout=60
        )
        assert again.returncode == 0
        assert emulator_stats(url)["submits"] == 20
    out = read_out(tmp_path / "out.jsonl")
    assert sorted(x["id"] for x in out) == sorted(f"j{i}" for i in range(20))
    for path in tmp_path.iterdir():  # the key never reaches a file the run produced
        if path.is_file():
            assert SENTINEL_KEY.encode() not in path.read_bytes(), path
            if path.name != "jobs.jsonl":
                assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_then_rerun_gives_every_job_exactly_once(
    tmp_path: Path, sig: signal.Signals
) -> None:
    jobs = make_jobs(tmp_path / "jobs.jsonl", 60)
    with emulator_process("--latency", "0.3:0.8") as url:
        cmd = runner_cmd("run", str(jobs), "-o", "out.jsonl", "--submit-rps", "40")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(url), stderr=subprocess.PIPE)
        out_file = tmp_path / "out.jsonl"
        deadline = time.monotonic() + 30
        while not (out_file.exists() and out_file.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err.decode()
        assert b"resume" in err
        first = read_out(tmp_path / "out.jsonl")
        assert 0 < len(first) < 60
        rerun = subprocess.run(
            cmd, cwd=tmp_path, env=child_env(url), capture_output=True, timeout=60
        )
        assert rerun.returncode == 0, rerun.stderr.decode()
        stats = emulator_stats(url)
    out = read_out(tmp_path / "out.jsonl")
    assert sorted(x["id"] for x in out) == sorted(f"j{i}" for i in range(60))
    assert stats["submits"] == 60  # the interrupted run left no ambiguous submit behind


def test_python_dash_m_is_the_same_cli(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "runner", "--help"], capture_output=True, timeout=30,
                       env={**os.environ}, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0
    for command in (b"run", b"status", b"results", b"emulator"):
        assert command in r.stdout
