"""The first hour with runner (issue 12): what a new user meets, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import runner
from runner.cli import cli
from tests.conftest import read_out, uncommit_last_line, write_jobs
from tests.killloop import db_states
from tests.procs import (
    child_env,
    emulator_process,
    emulator_stats,
    free_port,
    kill_when_running,
    make_jobs,
    run,
    runner_cmd,
)  # fmt: skip

ROOT = Path(__file__).parent.parent


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_folder_is_not_part_of_a_jobs_identity(tmp_path: Path) -> None:
    # 12.1: another YC_FOLDER_ID made every job "already in the database with different content"
    make_jobs(tmp_path / "jobs.jsonl", 60)
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl"], tmp_path, url, YC_FOLDER_ID="b1gfirst").returncode == 0
        r = run(["run", "jobs.jsonl"], tmp_path, url, YC_FOLDER_ID="b1gsecond")
        assert r.returncode == 0, r.stderr
        assert emulator_stats(url)["submits"] == 60


def test_when_problems_are_cut_at_50_the_rest_are_counted(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 60)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(tmp_path.joinpath("jobs.jsonl").read_text().replace("prompt number", "edited"))
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl"], tmp_path, url).returncode == 0
        r = run(["run", "changed.jsonl"], tmp_path, url)
    assert r.returncode == 2 and r.stderr.count("with different messages;") == 50
    assert "... and 10 more problems not shown" in r.stderr


def test_the_example_sends_nothing_to_a_folder_that_is_not_the_users() -> None:
    # 12.2: a line named gpt://b1gexample/...
    for line in (ROOT / "jobs.example.jsonl").read_text().splitlines():
        job = json.loads(line)
        assert "modelUri" not in job and "gpt://" not in line


def test_cancel_without_credentials_changes_nothing(tmp_path: Path) -> None:
    # 12.3: it exited 2 after it had already cancelled the pending jobs
    make_jobs(tmp_path / "jobs.jsonl", 40)
    with emulator_process("--latency", "30:40") as url:
        kill_when_running(tmp_path, url, 5, rps="10")
    before = db_states(tmp_path / "runner.db")
    assert before.get("pending", 0) > 0 and before.get("running", 0) > 0
    r = run(["cancel"], tmp_path, YC_API_KEY="")
    assert r.returncode == 2 and "no credentials" in r.stderr
    assert db_states(tmp_path / "runner.db") == before


def test_verbosity_levels_keep_library_debug_out_unless_asked(tmp_path: Path) -> None:
    # 12.4: -v turned on DEBUG: 20 jobs gave 1,239 lines, nearly all aiosqlite internals
    make_jobs(tmp_path / "jobs.jsonl", 20)
    with emulator_process() as url:
        one = run(["-v", "run", "jobs.jsonl", "--db", "a.db"], tmp_path, url).stderr
        two = run(["run", "jobs.jsonl", "--db", "b.db", "-vv"], tmp_path, url).stderr  # after, too
        three = run(["-vvv", "run", "jobs.jsonl", "--db", "c.db"], tmp_path, url).stderr
    assert "DEBUG" not in one and len(one.splitlines()) < 20
    assert "DEBUG runner" in two and "aiosqlite" not in two
    assert "DEBUG aiosqlite" in three


def test_a_db_in_a_missing_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # 12.5: a traceback and exit 1
    make_jobs(tmp_path / "jobs.jsonl", 2)
    for args in (["run", "jobs.jsonl", "--emulator"], ["status"], ["results"]):
        r = run([*args, "--db", "no/such/dir/runner.db"], tmp_path)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_the_run_summary_and_status_count_the_same_things(tmp_path: Path) -> None:
    # 12.6: the summary said "0 ambiguous submits" where status said 15, "0 submits" vs 1,500
    make_jobs(tmp_path / "jobs.jsonl", 30)
    with emulator_process("--fault", "submit:reset=0.3", "--fault", "poll:shape=0.2", "--seed", "5") as url:
        r = run(["run", "jobs.jsonl", "--max-faults", "20"], tmp_path, url)
    assert r.returncode == 0, r.stderr
    status = json.loads(run(["status", "--json"], tmp_path).stdout)
    summary = r.stderr.strip().splitlines()[-1]
    for name, key in (("submits", "submits"), ("ambiguous", "ambiguousSubmits"),
                      ("faults", "faults"), ("polls", "polls")):  # fmt: skip
        assert f" {status[key]} {name}" in summary, (name, summary, status)
    assert status["ambiguousSubmits"] > 0 and status["submits"] > 30


def test_run_writes_outputs_of_a_finished_batch_without_credentials(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 5)
    with emulator_process() as url:
        assert run(["run", "jobs.jsonl"], tmp_path, url).returncode == 0
    r = run(["run", "-o", "new.jsonl"], tmp_path, YC_API_KEY="")  # nothing left to send
    assert r.returncode == 0, r.stderr
    assert len(read_out(tmp_path / "new.jsonl")) == 5
    # the same with the jobs file named again (the README's resume command): nothing to send
    r = run(["run", "jobs.jsonl", "-o", "again.jsonl"], tmp_path, YC_API_KEY="")
    assert r.returncode == 0, r.stderr
    assert len(read_out(tmp_path / "again.jsonl")) == 5
    # a file with a new job does need them, and is refused before anything is stored
    make_jobs(tmp_path / "more.jsonl", 6)
    before = db_states(tmp_path / "runner.db")
    r = run(["run", "more.jsonl", "-o", "more-out.jsonl"], tmp_path, YC_API_KEY="")
    assert r.returncode == 2 and "no credentials" in r.stderr
    assert db_states(tmp_path / "runner.db") == before and not (tmp_path / "more-out.jsonl").exists()


def test_an_empty_batch_warns_and_names_its_database(cwd: Path) -> None:
    (cwd / "empty.jsonl").write_text("")
    r = CliRunner().invoke(cli, ["run", "empty.jsonl", "--emulator"])
    assert r.exit_code == 0 and "no jobs in runner.db" in r.output
    assert "empty.jsonl holds none" in r.output  # not "give a JOBS file": one was given
    # newcomer: a resume from a mistyped --db said "nothing to do" and exited 0, as if the batch
    # were finished; status, jobs and results already exit 2 on the same mistake
    r = CliRunner().invoke(cli, ["run", "--emulator", "--db", "fresh.db"])
    assert r.exit_code == 2 and "fresh.db: no such database" in r.output
    assert not (cwd / "fresh.db").exists()  # an empty database is not left behind


@pytest.mark.parametrize("option", [["--submit-rps", "inf"], ["--poll-rps", "nan"],
                                    ["--request-timeout", "inf"], ["--op-deadline", "0"],
                                    ["--max-outage", "-5"], ["--op-deadline", "nan"],
                                    ["--latency-prior", "0.0001"]])  # fmt: skip
def test_non_finite_or_negative_numbers_are_refused_before_anything_is_stored(
    cwd: Path, option: list[str]
) -> None:
    # review: inf crashed with a traceback (exit 1) after storing the jobs and claiming one,
    # nan left a run that never finished, a zero deadline failed every paid job at its first poll
    (cwd / "one.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    r = CliRunner().invoke(cli, ["run", "one.jsonl", "--emulator", *option])
    assert r.exit_code == 2 and option[0] in r.output and "Traceback" not in r.output
    assert not (cwd / "runner.db").exists()
    name, value = option[0][2:].replace("-", "_"), float(option[1])
    quota = name in ("submit_rps", "poll_rps")  # the Python API refuses the same (a value
    # only it refused, the CLI let through and crashed on: --latency-prior 0.0001)
    with pytest.raises(runner.UsageError, match=f"quotas.{name}" if quota else name):
        runner.Batch("py.db", **({"quotas": runner.Quotas(**{name: value})} if quota else {name: value}))


def test_the_built_in_emulator_is_polled_from_its_own_latency_not_the_apis(cwd: Path) -> None:
    # newcomer: the README's first command took 35-46 s for seven jobs the emulator answers in
    # 0.2 s: every first poll (each chat turn's too) waited the API's 15 s prior
    assert runner.Batch("e.db", emulator=True).settings.policy.prior == 1.0
    assert runner.Batch("a.db").settings.policy.prior == 60.0
    assert runner.Batch("p.db", emulator=True, latency_prior=3).settings.policy.prior == 3


def test_a_dangling_symlink_as_db_is_left_as_it_was_when_nothing_is_stored(cwd: Path) -> None:
    # review: a bad jobs file with --db a dangling link deleted the user's link and left the
    # database it had made at the link's target
    (cwd / "data").mkdir()
    (cwd / "my.db").symlink_to("data/real.db")
    (cwd / "bad.jsonl").write_text('{"id": "a", "promt": "typo"}\n')
    r = CliRunner().invoke(cli, ["run", "bad.jsonl", "--emulator", "--db", "my.db"])
    assert r.exit_code == 2 and "unknown field" in r.output
    assert (cwd / "my.db").is_symlink() and not (cwd / "data" / "real.db").exists()
    assert list((cwd / "data").iterdir()) == []


def test_exact_without_dry_run_is_refused_not_ignored(cwd: Path) -> None:
    (cwd / "one.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    r = CliRunner().invoke(cli, ["run", "one.jsonl", "--emulator", "--exact"])
    assert r.exit_code == 2 and "add --dry-run" in r.output
    assert not (cwd / "runner.db").exists()


def test_unknown_and_open_weight_models_are_warned_about_and_priced_as_unpriced(cwd: Path) -> None:
    write_jobs(cwd / "jobs.jsonl", [{"prompt": "a", "model": "yandexgpt-lightt"},
                                    {"prompt": "b", "model": "llama"}])  # fmt: skip
    r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "'yandexgpt-lightt' is not one runner knows" in r.output
    assert "'llama' is an open-weight model" in r.output
    assert "unpriced (not in the totals): yandexgpt-lightt" in r.output
    data = json.loads(CliRunner().invoke(cli, ["run", "jobs.jsonl", "--dry-run", "--json"]).output)
    assert data["cost"]["unpriced"] == ["yandexgpt-lightt"]


def test_the_dry_run_counts_exactly_with_the_tokenizer_and_gives_a_range(cwd: Path) -> None:
    write_jobs(cwd / "jobs.jsonl", [
        {"id": "a", "prompt": "Напиши хокку о весеннем дожде.", "completionOptions": {"maxTokens": 100}},
        {"id": "b", "prompt": "Explain why the sky is blue.", "completionOptions": {"maxTokens": 50}},
    ])  # fmt: skip
    r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--dry-run", "--exact", "--emulator", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["inputTokensMethod"].startswith("counted by the API's tokenizer")
    from runner.emulator import count_tokens

    expected = count_tokens("Напиши хокку о весеннем дожде.") + count_tokens("Explain why the sky is blue.")
    assert plan["inputTokens"] == expected
    assert plan["answerTokensAtMost"] == 150 and plan["jobsWithoutMaxTokens"] == 0
    assert not (cwd / "runner.db").exists()


def test_check_says_plainly_whether_credentials_folder_and_model_are_right(tmp_path: Path) -> None:
    with emulator_process("--known-model", "yandexgpt-lite", "--folder", "b1gtestfolder") as url:
        ok = run(["check"], tmp_path, url)
        wrong_model = run(["check", "--model", "yandexgpt-lightt"], tmp_path, url)
        wrong_folder = run(["check", "--folder-id", "b1gother"], tmp_path, url)
        stats = emulator_stats(url)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: key, folder, role and model")
    assert wrong_model.returncode == 3 and "model" in wrong_model.stdout
    assert wrong_folder.returncode == 3 and "folder" in wrong_folder.stdout
    assert stats.get("submits", 0) == 0  # nothing was paid for


def test_offline_the_progress_line_says_the_api_is_unreachable(tmp_path: Path) -> None:
    make_jobs(tmp_path / "jobs.jsonl", 3)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--progress-interval", "0.5", "--probe-max", "1"),
                            cwd=tmp_path, env=child_env(dead), stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "API unreachable since" in err and "cannot connect" in err and "ETA" not in err.split("API unreachable")[-1]


def test_the_built_in_emulator_keeps_its_operations_so_a_killed_run_resumes_cleanly(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 30)
    proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--emulator", "-o", "out.jsonl",
                                       "--submit-rps", "30"),
                            cwd=cwd, env=child_env(), stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 20
    while db_states(cwd / "runner.db").get("running", 0) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # newcomer: resumed without --emulator, it blamed the credentials (none set) or, with
    # credentials, the operation URL (its operations are the emulator's: 404). It says why now,
    # sends nothing and changes nothing, with or without new jobs and credentials
    before = db_states(cwd / "runner.db")
    with emulator_process() as other:
        for args, env in ((["run"], {"YC_API_KEY": ""}), (["run", "jobs.jsonl"], {}),
                          (["run", "-o", "out.jsonl"], {})):  # fmt: skip
            r = run(args, cwd, other, **env)
            assert r.returncode == 2 and "was run against the built-in emulator" in r.stderr, r
        seen = emulator_stats(other)
        assert seen.get("submits", 0) == seen.get("polls", 0) == 0 and not seen["submits_per_body"]
    assert db_states(cwd / "runner.db") == before
    r = run(["run", "jobs.jsonl", "--emulator", "-o", "out.jsonl"], cwd)
    assert r.returncode == 0, r.stderr
    status = json.loads(run(["status", "--json"], cwd).stdout)
    assert status["resubmits"] == 0 and status["done"] == 30
    assert len(read_out(cwd / "out.jsonl")) == 30


def test_help_names_environment_variables_and_every_option_is_explained() -> None:
    r = CliRunner().invoke(cli, ["run", "--help"])
    for env in ("RUNNER_DB", "RUNNER_LLM_URL", "RUNNER_OPERATION_URL", "YC_FOLDER_ID",
                "RUNNER_IAM_TOKEN_COMMAND"):  # fmt: skip
        assert env in r.output, env
    for command in ("run", "status", "jobs", "show", "results", "retry", "cancel", "check"):
        for param in cli.commands[command].params:  # type: ignore[union-attr]
            if isinstance(param, __import__("click").Option) and not param.hidden:
                assert param.help, f"{command} {param.opts}"
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("runner, version ")


def test_show_gives_one_jobs_request_answer_usage_and_attempts(cwd: Path) -> None:
    write_jobs(cwd / "jobs.jsonl", [{"id": "q1", "prompt": "hello"}])
    assert CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator"]).exit_code == 0
    r = CliRunner().invoke(cli, ["show", "q1"])
    assert r.exit_code == 0
    assert "answer    [" in r.output and "you said: hello" in r.output and "usage" in r.output
    assert "attempt 1 (turn 1)" in r.output and "answered" in r.output
    data = json.loads(CliRunner().invoke(cli, ["show", "q1", "--json"]).output)
    assert data["request"]["messages"] == [{"role": "user", "text": "hello"}]
    assert data["operations"][0]["totalTokens"] == data["result"]["usage"]["totalTokens"]
    assert CliRunner().invoke(cli, ["show", "nope"]).exit_code == 2


def test_a_repaired_output_file_is_said_in_the_log(cwd: Path) -> None:
    make_jobs(cwd / "jobs.jsonl", 3)
    assert CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", "out.jsonl"]).exit_code == 0
    uncommit_last_line(cwd / "runner.db", cwd / "out.jsonl", keep=12)  # a kill mid-append
    r = CliRunner().invoke(cli, ["run", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 0 and "cut 12 bytes of a write a crash interrupted" in r.output
    assert len(read_out(cwd / "out.jsonl")) == 3


def test_lines_added_by_hand_to_an_output_are_refused_not_cut(cwd: Path) -> None:
    # it cut them silently (with a warning) although the README says a hand-edited file is refused
    make_jobs(cwd / "jobs.jsonl", 3)
    assert CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", "out.jsonl"]).exit_code == 0
    with (cwd / "out.jsonl").open("a") as f:
        f.write('{"id": "mine", "note": "my own line"}\n')
    before = (cwd / "out.jsonl").read_bytes()
    r = CliRunner().invoke(cli, ["run", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 2 and "not what runner writes (lines added by hand?" in r.output
    assert (cwd / "out.jsonl").read_bytes() == before


def test_an_output_that_is_not_a_regular_file_is_refused_before_anything_is_stored(
    cwd: Path,
) -> None:
    # -o /dev/null exited 5 after the jobs were stored (and left a 1 MiB rescue file)
    make_jobs(cwd / "jobs.jsonl", 3)
    r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", "/dev/null"])
    assert r.exit_code == 2 and "not a regular file" in r.output
    assert sorted(p.name for p in cwd.iterdir()) == ["jobs.jsonl"]  # no database, no rescue file
    os.symlink(cwd / "gone" / "out.jsonl", cwd / "dangling.jsonl")  # its target's directory is gone
    os.symlink(cwd / "loop.jsonl", cwd / "loop.jsonl")
    for target, said in (("dangling.jsonl", "does not exist"), ("nodir/", "is a directory"),
                         ("nodir/../o.jsonl", "does not exist"), ("jobs.jsonl/../o.jsonl", "Not a directory"),
                         ("loop.jsonl", "Too many levels"), ("x" * 300, "File name too long"),
                         ("runner.db.rescue", "runner's own"), ("runner.db.emulator", "runner's own")):  # fmt: skip
        r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", target])
        assert r.exit_code == 2 and said in r.output, (target, r.output)
    assert sorted(p.name for p in cwd.iterdir()) == ["dangling.jsonl", "jobs.jsonl", "loop.jsonl"]


def test_a_moved_project_directory_resumes_with_the_same_command(
    cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # outputs are recorded by absolute path: after `mv`, the same command was refused (exit 2)
    (cwd / "a").mkdir()
    monkeypatch.chdir(cwd / "a")
    make_jobs(cwd / "a" / "jobs.jsonl", 3)
    assert CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", "out.jsonl"]).exit_code == 0
    (cwd / "a").rename(cwd / "b")
    monkeypatch.chdir(cwd / "b")
    make_jobs(cwd / "b" / "jobs.jsonl", 5)  # two more jobs, appended to the same file
    r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 0, r.output
    assert sorted(x["id"] for x in read_out(cwd / "b" / "out.jsonl")) == [f"j{i}" for i in range(5)]
    with (cwd / "b" / "out.jsonl").open("a") as f:  # and it is still checked as runner's own
        f.write('{"id": "mine"}\n')
    r = CliRunner().invoke(cli, ["run", "--emulator", "-o", "out.jsonl"])
    assert r.exit_code == 2 and "lines added by hand" in r.output


def test_run_output_refuses_an_export_of_results(cwd: Path) -> None:
    # `run -o x.csv` turned a CSV export into JSONL
    make_jobs(cwd / "jobs.jsonl", 3)
    assert CliRunner().invoke(cli, ["run", "jobs.jsonl", "--emulator"]).exit_code == 0
    assert CliRunner().invoke(cli, ["results", "-o", "x.csv", "--format", "csv"]).exit_code == 0
    before = (cwd / "x.csv").read_bytes()
    r = CliRunner().invoke(cli, ["run", "--emulator", "-o", "x.csv"])
    assert r.exit_code == 2 and "export written by `runner results`" in r.output
    assert (cwd / "x.csv").read_bytes() == before


def test_the_dry_run_says_answers_are_unbounded_without_max_tokens(cwd: Path) -> None:
    # it said "answers: up to 0 tokens ..., up to ~0.00 RUB; 1 jobs set no maxTokens"
    write_jobs(cwd / "jobs.jsonl", [{"id": "a", "prompt": "x"},
                                    {"id": "b", "prompt": "y", "completionOptions": {"maxTokens": 40}}])  # fmt: skip
    r = CliRunner().invoke(cli, ["run", "jobs.jsonl", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "answers: no upper bound: 1 of 2 jobs set no maxTokens" in r.output
    assert "the other 1: at most 40 tokens" in r.output and "up to 0 tokens" not in r.output
