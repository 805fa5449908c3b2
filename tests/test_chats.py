"""Multi-turn chats (each turn its own operation, resumable per turn) and the sync endpoint."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from runner import emulator as emu
from tests.conftest import batch_for, db_rows, fast_settings, read_out, run_against, write_jobs

pytestmark = pytest.mark.anyio

CHAT = {
    "id": "c1",
    "system": "Be brief.",
    "turns": ["first question", "follow-up", "make it shorter"],
}


async def test_three_turns_send_one_three_five_messages(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator()
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", [CHAT]))
    assert report.exit_code == 0
    # system + question, then + answer + question each turn
    assert e.emulator.messages_seen == [2, 4, 6]
    [line] = read_out(tmp_path / "out.jsonl")
    messages = line["messages"]
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m["text"] for m in messages if m["role"] == "user"] == CHAT["turns"]
    # each answer is the emulator's answer to exactly the history sent on that turn
    for k, turn in enumerate(line["turns"]):
        assert turn["text"] == emu.answer_for({"messages": messages[: 2 + 2 * k]})
        assert messages[2 + 2 * k]["text"] == turn["text"]
        assert turn["operationId"].startswith("d7q")
    assert line["text"] == line["turns"][-1]["text"]
    assert line["usage"]["totalTokens"] == sum(t["usage"]["totalTokens"] for t in line["turns"])
    [(tokens,)] = db_rows(tmp_path / "runner.db", "SELECT total_tokens FROM totals")
    assert tokens == line["usage"]["totalTokens"]


async def test_without_system_the_turns_send_one_three_five(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator()
    chat = {"id": "c", "turns": ["a", "b", "c"]}
    await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", [chat]))
    assert e.emulator.messages_seen == [1, 3, 5]


async def test_messages_as_starting_history(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator()
    chat = {"id": "h", "messages": [{"role": "system", "text": "s"}, {"role": "user", "text": "u0"},
                                    {"role": "assistant", "text": "a0"}], "turns": ["t1", "t2"]}  # fmt: skip
    await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", [chat]))
    assert e.emulator.messages_seen == [4, 6]


async def test_kill_during_turn_two_resumes_at_turn_two(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator()
    jobs = write_jobs(tmp_path / "c.jsonl", [CHAT])
    await run_against(e, tmp_path, jobs, output=None)
    db = tmp_path / "runner.db"
    [(transcript, result)] = db_rows(db, "SELECT transcript, result FROM jobs")
    first_turn = json.loads(transcript)[:1]
    history = json.loads(result)["messages"][:4]  # system, q1, a1, q2: turn 2's request
    body = json.loads(db_rows(db, "SELECT origin FROM jobs")[0][0])
    body["messages"] = history
    con = sqlite3.connect(db)
    with con:  # the state a kill -9 leaves while turn 2 was being submitted
        con.execute(
            "UPDATE jobs SET state='submitting', turn=1, body=?, transcript=?, result=NULL, "
            "finish_seq=NULL, operation_id=NULL",
            (emu_canonical(body), json.dumps(first_turn)),
        )
    con.close()
    seen_before = len(e.emulator.messages_seen)
    report = await run_against(e, tmp_path, jobs)
    assert report.exit_code == 0
    assert e.emulator.messages_seen[seen_before:] == [4, 6]  # turns 2 and 3 only
    [line] = read_out(tmp_path / "out.jsonl")
    assert len(line["turns"]) == 3 and line["turns"][0] == first_turn[0]


def emu_canonical(body: dict[str, Any]) -> str:
    from runner.inputs import canonical

    return canonical(body)


async def test_many_conversations_interleave(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator()
    chats = [{"id": f"c{i}", "turns": [f"q{i}.{k}" for k in range(3)]} for i in range(20)]
    # 20 first turns take a second to submit at 20/s; answers come back within ~50 ms
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", chats),
                               settings=fast_settings(submit_rps=20.0))  # fmt: skip
    assert report.exit_code == 0
    out = {line["id"]: line for line in read_out(tmp_path / "out.jsonl")}
    assert len(out) == 20
    for i in range(20):
        users = [m["text"] for m in out[f"c{i}"]["messages"] if m["role"] == "user"]
        assert users == [f"q{i}.{k}" for k in range(3)]  # each conversation strictly in order
    # interleaved: some conversation's turn 2 went out before another's turn 1
    assert (
        e.emulator.messages_seen.index(3)
        < len(e.emulator.messages_seen) - e.emulator.messages_seen[::-1].index(1) - 1
    )


async def test_context_budget_fails_the_conversation_before_the_api_would(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator()
    chat = {"id": "long", "turns": ["x" * 300, "y" * 300, "z" * 300]}
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", [chat]),
                               settings=fast_settings(context_budget=200))  # fmt: skip
    assert report.exit_code == 1
    [line] = read_out(tmp_path / "out.jsonl")
    assert line["status"] == "failed"
    assert (
        "turn 2 of 3" in line["error"]["message"]
        and "context budget of 200" in line["error"]["message"]
    )
    assert e.emulator.messages_seen == [1]  # the over-long turn was never sent


async def test_a_failed_turn_fails_the_conversation_with_its_number(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator(op_error_rate=1.0)
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "c.jsonl", [CHAT]))
    assert report.exit_code == 1
    [line] = read_out(tmp_path / "out.jsonl")
    assert line["error"]["message"].startswith("turn 1 of 3: ")


async def test_sync_mode_gives_the_same_result_shape(make_emulator: Any, tmp_path: Path) -> None:
    e = await make_emulator()
    rows = [{"id": f"s{i}", "prompt": f"p{i}"} for i in range(30)] + [CHAT]
    report = await run_against(e, tmp_path, write_jobs(tmp_path / "j.jsonl", rows),
                               settings=fast_settings(mode="sync"))  # fmt: skip
    assert report.exit_code == 0
    assert e.stats["submits"] == 0 and e.stats["polls"] == 0
    assert e.stats["completions"] == 33
    assert 1 < e.stats["max_sync_inflight"] <= 10  # concurrent, within the documented limit
    out = {line["id"]: line for line in read_out(tmp_path / "out.jsonl")}
    assert len(out) == 31
    single = out["s0"]
    assert set(single) == {"id", "status", "text", "alternativeStatus", "usage", "modelVersion",
                           "operationId", "attempts"}  # fmt: skip
    assert single["operationId"] is None and single["status"] == "done"
    assert len(out["c1"]["turns"]) == 3


async def test_sync_mode_resends_a_request_cut_by_a_crash_and_counts_it(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator()
    jobs = write_jobs(
        tmp_path / "j.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    )
    await run_against(e, tmp_path, jobs, output=None, settings=fast_settings(mode="sync"))
    con = sqlite3.connect(tmp_path / "runner.db")
    with con:
        con.execute("UPDATE jobs SET state='submitting', finish_seq=NULL, result=NULL WHERE id='a'")
    con.close()
    report = await run_against(e, tmp_path, None, settings=fast_settings(mode="sync"))
    assert report.exit_code == 0 and report.recovered == 1
    assert e.stats["completions"] == 3
    assert db_rows(tmp_path / "runner.db", "SELECT ambiguous FROM jobs WHERE id='a'") == [(1,)]


async def test_retry_resumes_a_failed_conversation_at_its_failed_turn(
    make_emulator: Any, tmp_path: Path
) -> None:
    e = await make_emulator()
    jobs = write_jobs(tmp_path / "c.jsonl", [CHAT])
    await run_against(e, tmp_path, jobs, output=None)
    db = tmp_path / "runner.db"
    [(transcript, result)] = db_rows(db, "SELECT transcript, result FROM jobs")
    body = json.loads(db_rows(db, "SELECT origin FROM jobs")[0][0])
    body["messages"] = json.loads(result)["messages"][:4]
    con = sqlite3.connect(db)
    with con:  # turn 2 failed: the conversation failed with it
        con.execute(
            "UPDATE jobs SET state='failed', turn=1, body=?, transcript=?, result=NULL, "
            'error=\'{"code": 13, "message": "turn 2 of 3: boom"}\'',
            (emu_canonical(body), json.dumps(json.loads(transcript)[:1])),
        )
    con.close()
    async with batch_for(e, tmp_path) as batch:
        assert await batch.retry(("failed",)) == 1
    seen_before = len(e.emulator.messages_seen)
    report = await run_against(e, tmp_path, None)
    assert report.exit_code == 0
    assert e.emulator.messages_seen[seen_before:] == [4, 6]  # turn 1 is not sent again
    [line] = read_out(tmp_path / "out.jsonl")
    assert line["status"] == "done" and len(line["turns"]) == 3
