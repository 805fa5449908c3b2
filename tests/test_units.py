"""The small pure pieces: backoff, pacing, poll policy, error and operation parsing."""

from __future__ import annotations

import bisect
import random

import pytest

from runner import backoff
from runner.pacing import Pacer
from runner.wire import (
    Malformed,
    classify,
    maybe_done,
    parse_completion,
    parse_error,
    parse_operation,
    retry_after_seconds,
)  # fmt: skip

pytestmark = pytest.mark.anyio


def test_delay_is_capped_jittered_and_honours_retry_after() -> None:
    backoff.set_testing(False)
    try:
        assert backoff.delay(1, rand=0.0) == 0.5
        assert backoff.delay(1, rand=1.0) == 1.0
        assert backoff.delay(4, rand=1.0) == 8.0
        assert backoff.delay(50, rand=1.0) == 60.0  # capped
        assert backoff.delay(1, rand=0.0, retry_after=7.0) == 7.0
        assert backoff.delay(1, rand=1.0, retry_after=10_000.0) == 3600.0
    finally:
        backoff.set_testing(True)
    assert backoff.delay(9, retry_after=30.0) == 0.0  # the testing switch zeroes waits


async def test_pacer_spaces_slots() -> None:
    import anyio

    pacer = Pacer(rate=100.0)
    start = anyio.current_time()
    for _ in range(11):
        await pacer.slot()
    assert anyio.current_time() - start >= 0.099


def test_a_429_cuts_the_pace_by_a_tenth_after_calm_else_by_half() -> None:
    # a lone 429 halved the pace (5,000 submits at 360/s: 1.2 s lost), and the few refusals
    # right after it, from the same full second on the server, halved it again each (356/s
    # to 60/s on three refusals in 15 ms)
    now = [100.0]
    pacer = Pacer(rate=100.0, ramp=10.0, clock=lambda: now[0])
    pacer.throttle(None)
    assert pacer.rate == pytest.approx(99.0 * 0.9) and pacer.throttled == 1
    assert pacer._earliest(now[0])[0] == pytest.approx(now[0] + 0.05)  # everyone pauses
    now[0] += 0.01
    pacer.throttle(None, sent=now[0] - 0.02)  # sent before the cut: counted, no second cut
    assert pacer.rate == pytest.approx(99.0 * 0.9) and pacer.throttled == 2
    now[0] += 0.04 + 0.5  # the climb starts when the pause ends
    assert pacer.rate == pytest.approx(99.0 * 0.9 + 5.0)
    pacer.answered()
    before = pacer.rate
    pacer.throttle(None, sent=now[0] - 0.01)  # refused at the new pace: halve
    assert pacer.rate == pytest.approx(before / 2)
    assert pacer._earliest(now[0])[0] == pytest.approx(now[0] + 0.05)  # answered since: 50 ms
    now[0] += 20.0  # calm again: the next lone refusal costs a tenth
    before = pacer.rate
    pacer.throttle(None)
    assert pacer.rate == pytest.approx(before * 0.9)


async def test_grants_a_few_milliseconds_late_keep_the_schedule_at_a_high_rate() -> None:
    # at 360/s a busy event loop grants ~0.5-2 ms late; restarting the schedule past a
    # quarter slot (0.7 ms) on each kept ~320/s
    now = [0.0]
    pacer = Pacer(rate=360.0, clock=lambda: now[0])
    for _ in range(1000):
        now[0] = pacer._earliest(now[0])[0] + 0.002
        await pacer.slot()
    assert now[0] < 1000 / (0.99 * 360) + 0.01


async def test_slots_granted_a_little_late_never_put_more_than_the_limit_in_a_second() -> None:
    # keeping the schedule when a grant is late by up to a quarter slot let 11 slots into one
    # second at 10/s
    rng, now = random.Random(7), [0.0]
    pacer = Pacer(rate=10.0, clock=lambda: now[0])
    stamps = []
    for _ in range(300):
        now[0] = pacer._earliest(now[0])[0] + rng.choice([0.0, 0.0, rng.uniform(0, 0.02)])
        stamps.append(await pacer.slot())
    assert max(bisect.bisect_right(stamps, t + 1.0) - i for i, t in enumerate(stamps)) <= 10


async def test_pacer_after_an_idle_spell_leaves_a_full_gap_before_the_next_slot() -> None:
    # the "keep the schedule when a grant is a little late" rule also shortened the first gap
    # after any idle spell by a quarter slot: CI saw 11 slots at 100/s in 0.0989 s
    now = [0.0]
    pacer = Pacer(rate=10.0, clock=lambda: now[0])
    await pacer.slot()
    now[0] = 5.0  # idle, then a grant at 5.0
    await pacer.slot()
    assert pacer._earliest(now[0])[0] == pytest.approx(5.0 + 1 / 9.9)


def test_pacer_recovers_with_time_without_429s_not_with_one_success() -> None:
    now = [0.0]
    pacer = Pacer(rate=10.0, ramp=10.0, clock=lambda: now[0])
    for _ in range(10):  # ten 429s in a row: down to the floor
        pacer.throttle(None)
    assert pacer.rate == pytest.approx(0.05)
    now[0] = pacer._earliest(now[0])[0]  # the pause, doubled on each, is a minute by now
    assert now[0] == pytest.approx(60.0)
    now[0] += 1.0  # one quiet second regains a tenth of the limit, not all of it
    assert pacer.rate == pytest.approx(0.05 + 1.0)
    now[0] += 5.0
    assert pacer.rate == pytest.approx(6.05)
    now[0] += 100.0
    assert pacer.rate == pytest.approx(9.9)  # never above the limit (1% under it)


async def test_a_long_run_of_accepted_probes_cannot_make_refusals_a_storm() -> None:
    # against a token bucket with spare room, thousands of accepted probes shrank the probe
    # interval to ~0; when the room ran out every probe at the per-second pace was refused
    # until hundreds of refusals had grown it back (516 429s in the quota-bucket benchmark)
    now = [0.0]
    pacer = Pacer(rate=100.0, per_hour=10, hour=100.0, clock=lambda: now[0])

    async def take() -> float:
        now[0] = pacer._earliest(now[0])[0]
        return await pacer.slot()

    for _ in range(10):  # the hourly model is full
        await take()
    for _ in range(500):  # past it, the server accepts every probe
        pacer.accepted(await take())
    start, refusals = now[0], 0
    while now[0] - start < 1.0:  # then refuses them all
        pacer.refused(await take(), None)
        refusals += 1
    assert refusals <= 10


async def test_the_hourly_window_counts_a_request_from_when_its_answer_came() -> None:
    # the window ran 1% longer than the server's hour to cover the request's travel: 1% of
    # every quota-bound run; the answer's arrival is a stamp that is never early, and exact
    now = [0.0]
    pacer = Pacer(rate=1000.0, per_hour=2, hour=100.0, clock=lambda: now[0])
    first = await pacer.slot()
    now[0] = 0.5
    second = await pacer.slot()
    now[0] = 0.01 + 0.5
    pacer.accepted(second)  # answered quickly
    now[0] = 3.0
    pacer.accepted(first)  # a slow answer: the server may have counted it as late as this
    room = []
    for now[0] in (100.5, 100.52, 102.99, 103.01):  # the quick one's hour, the slow one's
        room.append(pacer.left())
    assert room == [0, 1, 1, 2]


async def test_pacer_hour_window_blocks_past_the_hourly_limit() -> None:
    import anyio

    pacer = Pacer(rate=1000.0, per_hour=3)
    for _ in range(3):
        await pacer.slot()
    with anyio.move_on_after(0.2) as scope:
        await pacer.slot()
    assert scope.cancelled_caught  # the fourth slot waits for the hour to roll
    with anyio.move_on_after(0.2) as scope:
        await pacer.room()
    assert scope.cancelled_caught  # and so does the question "is there room?"


async def test_pacer_room_counts_what_the_hour_has_left() -> None:
    pacer = Pacer(rate=1000.0, per_hour=5)
    await pacer.slot()
    await pacer.slot()
    assert await pacer.room() == 3


async def test_pacer_horizon_counts_hourly_windows() -> None:
    pacer = Pacer(rate=10.0, per_hour=100, hour=100.0)
    assert pacer.horizon(0) == 0.0
    assert pacer.horizon(50) == pytest.approx(50 / 9.9)  # within the room left: the pace
    # 250 more: 100 now, then two more windows of 101 s (the 1% margin) each
    assert pacer.horizon(250) == pytest.approx(2 * 101.0, rel=0.01)


def test_both_error_shapes_parse() -> None:
    assert parse_error(401, '{"code": 16, "message": "Token is invalid or has expired.", "details": []}') == (
        16, "Token is invalid or has expired.", True,
    )  # fmt: skip
    shape2 = '{"error": {"grpcCode": 8, "httpCode": 429, "message": "quota", "httpStatus": "Too Many Requests"}}'
    assert parse_error(429, shape2) == (8, "quota", True)
    assert parse_error(502, "<html>bad gateway</html>") == (
        2, "HTTP 502: <html>bad gateway</html>", False,
    )  # fmt: skip
    assert parse_error(503, '{"code": 503, "message": "Service Unavailable"}')[2] is False
    assert not maybe_done(501, 12, True) and not maybe_done(503, 14, True)  # the service's own
    assert maybe_done(503, 14, False) and maybe_done(502, 13, True) and maybe_done(504, 4, True)
    assert classify(429, 8) == "rate" and classify(400, 3) == "invalid"
    assert classify(503, 14) == "transient" and classify(404, 5) == "not_found"
    assert classify(403, 7) == "forbidden" and classify(401, 16) == "auth"


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None


def test_operation_forms() -> None:
    assert not parse_operation({"id": "x"}).done  # done absent: running
    assert not parse_operation({"id": "x", "done": False}).done
    failed = parse_operation({"id": "x", "done": False, "error": {"code": 13, "message": "boom"}})
    assert failed.done and failed.failure is not None and failed.failure.code == 13
    ok = parse_operation({"id": "x", "done": True, "response": {
        "alternatives": [{"message": {"role": "assistant", "text": "hi"}, "status": "ALTERNATIVE_STATUS_FINAL"}],
        "usage": {"inputTextTokens": "31", "completionTokens": "10", "totalTokens": "41",
                  "completionTokensDetails": {"reasoningTokens": "2"}},
        "modelVersion": "18.01.2024"}})  # fmt: skip
    assert ok.completion is not None
    assert ok.completion.usage == {
        "inputTextTokens": 31,
        "completionTokens": 10,
        "reasoningTokens": 2,
        "totalTokens": 41,
    }
    with pytest.raises(Malformed):
        parse_completion({"alternatives": []})


@pytest.mark.parametrize(
    "response",
    [
        {"alternatives": ["oops"]},
        {"alternatives": [{"message": "hi"}]},
        {"alternatives": [{"message": {"text": 5}}]},
        {"alternatives": [{"message": {"text": "x"}}], "usage": {"totalTokens": "many"}},
        {"alternatives": [{"message": {"text": "x"}}], "usage": {"totalTokens": True}},
        {"alternatives": [{"message": {"text": "x"}}], "usage": []},
        {"alternatives": [{"message": {"text": "x"}, "status": 7}]},
        "a string",
    ],
)
def test_every_field_read_from_the_wire_is_type_checked(response: object) -> None:
    # issue 9.6: these crashed the run with AttributeError, on every restart
    with pytest.raises(Malformed):
        parse_operation({"id": "op", "done": True, "response": response})


def test_malformed_operations() -> None:
    for bad in ({"done": True}, {"id": 5}, {"id": "x", "done": "yes"},
                {"id": "x", "error": {"code": "13"}}, {"id": "x", "error": "boom"}):  # fmt: skip
        with pytest.raises(Malformed):
            parse_operation(bad)


def test_emulator_latency_is_a_fixed_draw_per_request_body() -> None:
    import statistics

    from runner.emulator import Config, Emulator

    a, b = (
        Emulator(Config(lognormal=(2.0, 0.8), seed=1)),
        Emulator(Config(lognormal=(2.0, 0.8), seed=1)),
    )
    bodies = [{"messages": [{"role": "user", "text": f"p{i}"}]} for i in range(4000)]
    for _ in range(50):
        a.rng.random()  # whatever else the emulator drew (429 shapes, faults) does not matter
    assert [a._latency(x) for x in bodies[:100]] == [b._latency(x) for x in bodies[:100]]
    draws = [a._latency(x) for x in bodies]
    assert 1.8 < statistics.median(draws) < 2.2  # the configured median
    assert Emulator(Config(lognormal=(2.0, 0.8), seed=2))._latency(bodies[0]) != draws[0]


def test_the_per_flush_queries_read_an_index_not_every_job() -> None:
    # the finishing number's MAX scanned every job (the partial index needs the WHERE), and a
    # page of finished jobs went by the state index, fetching every finished job and sorting
    # them all: both once per batch of outcomes, ~2 ms each at 6,000 jobs and growing
    import sqlite3

    from runner.migrations import migration_files, statements
    from runner.output import since_query
    from runner.queue import TOP_SEQ

    con = sqlite3.connect(":memory:")
    for _, _, script in migration_files():
        for statement in statements(script):
            con.execute(statement)
    states = ("done", "failed", "cancelled")
    for sql, args in ((TOP_SEQ, ()), (since_query(states, True), (0, *states, 10))):
        plan = " | ".join(row[3] for row in con.execute(f"EXPLAIN QUERY PLAN {sql}", args))
        assert "USING COVERING INDEX jobs_finished" in plan or "USING INDEX jobs_finished" in plan
        assert "TEMP B-TREE" not in plan, plan


async def test_a_server_refusing_everything_draws_few_429s_not_a_steady_stream() -> None:
    # review: the hourly quota used up by another client, every submit refused. The pace
    # climbed back during each pause and the round trip, settling near sqrt(limit / ramp):
    # a refusal every 0.2 s for as long as it lasted (3,149 in 10 minutes at 360/s)
    now = [0.0]
    for limit in (360.0, 10.0):
        now[0] = 0.0
        pacer = Pacer(rate=limit, clock=lambda: now[0])
        while now[0] < 600.0:
            now[0] = pacer._earliest(now[0])[0]
            stamp = await pacer.slot()
            now[0] += 0.05  # the round trip
            pacer.refused(stamp, None)
        assert pacer.throttled < 60, (limit, pacer.throttled)


async def test_pacer_room_counts_the_slots_the_hour_frees_in_the_next_100_ms() -> None:
    # with the window full, slots come back one or two at a time as old ones roll out; room
    # counted only those free now, so the claimer took them in a transaction each
    import anyio

    pacer = Pacer(rate=1000.0, per_hour=3, hour=0.5)
    for _ in range(3):
        await pacer.slot()  # ~1 ms apart
    with anyio.fail_after(5):
        assert await pacer.room() == 3  # waits for the first to roll out; the others follow
