"""The emulator's own switches, each checked over real HTTP on loopback (and one real subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner

from runner import emulator as emu
from runner.emulator import quotas
from runner.emulator.cli import emulator as emulator_command
from tests.procs import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FOLDER = "b1gtestfolder"
HEADERS = {"Authorization": "Api-Key test-key", "x-folder-id": FOLDER}
SUBMIT = "/foundationModels/v1/completionAsync"
COMPLETE = "/foundationModels/v1/completion"
TOKENIZE = "/foundationModels/v1/tokenize"
TOKENIZE_COMPLETION = "/foundationModels/v1/tokenizeCompletion"


def request_body(
    text: str, *, folder: str = FOLDER, model: str = "yandexgpt-lite"
) -> dict[str, Any]:
    return {
        "modelUri": f"gpt://{folder}/{model}/latest",
        "completionOptions": {"stream": False, "temperature": 0.3, "maxTokens": "200"},
        "messages": [{"role": "system", "text": "Answer briefly."}, {"role": "user", "text": text}],
    }


def grpc_code(data: dict[str, Any]) -> int:
    """The gRPC code of an error body, in either documented shape."""
    return int(
        data["error"]["grpcCode"]
        if "error" in data and "grpcCode" in data["error"]
        else data["code"]
    )


class Client:
    """A real HTTP client of one emulator."""

    def __init__(self, session: aiohttp.ClientSession, url: str, emulator: emu.Emulator) -> None:
        self.session = session
        self.url = url
        self.emulator = emulator

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, json=body, headers=HEADERS if headers is None else headers
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def submit(self, body: dict[str, Any], **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", SUBMIT, body, **kw)

    async def poll(self, op_id: str) -> tuple[int, Any]:
        return await self.call("GET", f"/operations/{op_id}")

    async def stats(self, detail: bool = False) -> dict[str, Any]:
        status, data = await self.call("GET", "/emulator/stats" + ("?detail=1" if detail else ""))
        assert status == 200
        result: dict[str, Any] = data
        return result

    async def until_done(self, op_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status, data = await self.poll(op_id)
            assert status == 200, data
            if data.get("done"):
                result: dict[str, Any] = data
                return result
            assert time.monotonic() < deadline, f"{op_id} never finished"
            await asyncio.sleep(0.02)


Start = Callable[..., Coroutine[Any, Any, Client]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start emulators on TestServer (as tests/conftest.py does); close them all afterwards."""
    servers: list[TestServer] = []
    session = aiohttp.ClientSession()

    async def make(**config: Any) -> Client:
        config.setdefault("latency", (0.01, 0.05))
        config.setdefault("seed", 7)
        e = emu.Emulator(emu.Config(**config))
        server = TestServer(e.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Client(session, str(server.make_url("")).rstrip("/"), e)

    yield make
    await session.close()
    for server in servers:
        await server.close()


@pytest.fixture
async def served() -> AsyncIterator[Start]:
    """Start emulators through ``serve()`` (the only way that owns the socket)."""
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def make(**config: Any) -> Client:
        config.setdefault("latency", (0.01, 0.05))
        e = emu.Emulator(emu.Config(**config))
        runner, url = await emu.serve(e, "127.0.0.1", 0)
        runners.append(runner)
        return Client(session, url, e)

    yield make
    await session.close()
    for runner in runners:
        await runner.cleanup()


# -- what existed before the package keeps working ---------------------------------------


async def test_public_names_and_a_round_trip(start: Start) -> None:
    for name in ("Config", "Emulator", "serve", "answer_for", "body_key", "parse_latency",
                 "parse_lognormal", "parse_fault", "Window"):  # fmt: skip
        assert hasattr(emu, name), name
    c = await start(latency=(0.05, 0.05))
    body = request_body("hello there")
    status, op = await c.submit(body, headers={**HEADERS, "Idempotency-Key": "k1"})
    assert status == 200 and isinstance(op["id"], str) and not op.get("done")
    done = await c.until_done(op["id"])
    assert done["response"]["alternatives"][0]["message"]["text"] == emu.answer_for(body)
    assert done["response"]["usage"]["inputTextTokens"] == str(
        emu.count_tokens("Answer briefly.") + emu.count_tokens("hello there")
    )
    stats = await c.stats()
    assert stats["submits"] == 1 and stats["submits_per_body"] == {emu.body_key(body): 1}
    assert stats["messages_seen"] == [2] and "ops" not in stats
    assert c.emulator.stats["submits"] == 1 and c.emulator.idem_keys == ["k1"]
    assert c.emulator.messages_seen == [2] and c.emulator.submits_per_body[emu.body_key(body)] == 1


# -- 1. outages --------------------------------------------------------------------------


async def test_configured_503_outage_then_service_resumes(start: Start) -> None:
    c = await start(outages=(emu.Outage(0.0, 0.6, "503"),))
    codes = set()
    for path, body in ((SUBMIT, request_body("a")), (COMPLETE, request_body("b")),
                       (TOKENIZE, {"modelUri": "gpt://f/yandexgpt-lite", "text": "x"})):  # fmt: skip
        status, data = await c.call("POST", path, body)
        assert status == 503, data
        codes.add(grpc_code(data))
    status, data = await c.poll("anything")
    assert status == 503 and grpc_code(data) == 14
    assert codes == {14}
    stats = await c.stats()  # the control endpoints are never down
    assert stats["outage_requests"] == 4 and stats["outage_503"] == 4
    assert stats.get("submits", 0) == 0
    await asyncio.sleep(0.6 - c.emulator.elapsed() + 0.05)
    status, _ = await c.submit(request_body("a"))
    assert status == 200


async def test_reset_outage_started_on_demand(start: Start) -> None:
    c = await start()
    assert (await c.submit(request_body("before")))[0] == 200
    status, data = await c.call("POST", "/emulator/outage", {"length": 0.5, "kind": "reset"})
    assert status == 200 and data["kind"] == "reset" and data["length"] == 0.5
    with pytest.raises(aiohttp.ClientError):
        await c.submit(request_body("during"))
    stats = await c.stats()
    assert stats["outage_reset"] >= 1 and stats["outage_requests"] == stats["outage_reset"]
    assert stats["submits"] == 1
    await asyncio.sleep(0.55)
    assert (await c.submit(request_body("after")))[0] == 200
    bad, _ = await c.call("POST", "/emulator/outage", {"length": 1, "kind": "flood"})
    assert bad == 400


async def _http_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def test_refuse_outage_closes_the_socket_and_listens_again(served: Start) -> None:
    c = await served()
    port = int(c.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a keep-alive connection
    assert b" 200 " in await _http_exchange(reader, writer, "/emulator/stats")
    status, _ = await c.call("POST", "/emulator/outage", {"length": 0.6, "kind": "refuse"})
    assert status == 200
    assert await asyncio.wait_for(reader.read(), 2) == b""  # the open connection was closed
    writer.close()
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.7)
    assert (await c.submit(request_body("after")))[0] == 200  # same port again
    assert (await c.stats())["outage_refuse"] == 1


async def test_refuse_needs_serve(start: Start) -> None:
    c = await start()
    status, data = await c.call("POST", "/emulator/outage", {"length": 1, "kind": "refuse"})
    assert status == 409 and "serve()" in data["message"]
    e = emu.Emulator(emu.Config(outages=(emu.Outage(1, 1, "refuse"),)))
    server = TestServer(e.app(), host="127.0.0.1")
    with pytest.raises(RuntimeError, match="serve"):
        await server.start_server()
    await server.close()


def test_cli_outage_refuse_in_a_subprocess(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.emulator.cli", "--port", str(port), "--outage", "0.8:0.6:refuse"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        t0 = time.monotonic()
        assert line.strip() == f"emulator listening on {url}"
        assert _get(url + "/emulator/stats")[0] == 200
        refused_at = back_at = None
        while time.monotonic() - t0 < 3:
            try:
                _get(url + "/emulator/stats")
                if refused_at is not None:
                    back_at = time.monotonic() - t0
                    break
            except (urllib.error.URLError, ConnectionError) as e:
                # a connection caught at the very moment the socket closes may be reset instead
                if isinstance(getattr(e, "reason", None), ConnectionRefusedError):
                    refused_at = refused_at or time.monotonic() - t0
            time.sleep(0.05)
        assert refused_at is not None and 0.6 < refused_at < 1.2, refused_at
        assert back_at is not None and 1.3 < back_at < 2.0, back_at
        assert _get(url + "/emulator/stats")[1]["outage_refuse"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # SIGTERM is a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={**HEADERS, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_cli_flags_reach_the_config(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = tmp_path / "ops.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.emulator.cli", "--port", str(port), "--poison", "POISON",
         "--known-model", "yandexgpt-lite", "--folder", FOLDER, "--cancel-mode", "refuse",
         "--op-error-rate", "1", "--op-error-code", "14", "--lognormal", "5:1:0.1",
         "--state-file", str(state), "--tokenize-rps", "1", "--hour-shape", "fixed",
         "--submit-per-hour", "4", "--hour-seconds", "100"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().decode().startswith("emulator listening on")
        assert _get(url + SUBMIT, request_body("POISON here"))[0] == 500
        assert _get(url + SUBMIT, request_body("x", model="yandexgpt"))[0] == 400
        assert _get(url + SUBMIT, request_body("x"), {"x-folder-id": "other"})[0] == 403
        status, op = _get(url + SUBMIT, request_body("fine"))
        assert status == 200
        assert _get(url + f"/operations/{op['id']}:cancel", {})[0] == 400  # refused
        time.sleep(0.15)  # the 5 s median latency is capped at 0.1 s
        assert _get(url + f"/operations/{op['id']}")[1]["error"]["code"] == 14
        assert _get(url + SUBMIT, request_body("two"))[0] == 200
        # 4 per fixed "hour": the poisoned and the unknown-model submits took their share
        assert _get(url + SUBMIT, request_body("three"))[0] == 429
        tok = {"modelUri": f"gpt://{FOLDER}/yandexgpt-lite", "text": "abcdefgh"}
        assert _get(url + TOKENIZE, tok)[0] == 200
        assert _get(url + TOKENIZE, tok)[0] == 429
        assert len(state.read_text().splitlines()) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_cli_help_and_usage_errors() -> None:
    assert isinstance(emulator_command, click.Command) and emulator_command.name == "emulator"
    for param in emulator_command.params:
        assert isinstance(param, click.Option) and param.help, param.name
    flags = {opt for p in emulator_command.params for opt in p.opts}
    for flag in ("--host", "--port", "--latency", "--lognormal", "--submit-rps", "--submit-per-hour",
                 "--hour-seconds", "--poll-rps", "--retry-after", "--fault", "--op-error-rate",
                 "--expire-after", "--reject-token", "--dedupe", "--seed", "--outage", "--poison",
                 "--tokenize-rps", "--known-model", "--folder", "--hour-shape", "--state-file",
                 "--cancel-mode", "--op-error-code"):  # fmt: skip
        assert flag in flags, flag
    for bad in (["--outage", "1"], ["--outage", "1:2:flood"], ["--fault", "poll:boom=0.1"],
                ["--lognormal", "1:0.5:-1"], ["--hour-shape", "weekly"]):  # fmt: skip
        r = CliRunner().invoke(emulator_command, bad)
        assert r.exit_code == 2, (bad, r.output)


# -- 2. poison -----------------------------------------------------------------------------


async def test_poisonous_prompt_always_gets_500(start: Start) -> None:
    c = await start(poison_marker="<<POISON>>")
    for _ in range(3):
        status, data = await c.submit(request_body("please <<POISON>> me"))
        assert status == 500 and grpc_code(data) == 13
    status, data = await c.call("POST", COMPLETE, request_body("<<POISON>>"))
    assert status == 500 and grpc_code(data) == 13
    assert (await c.submit(request_body("harmless")))[0] == 200
    assert (await c.call("POST", COMPLETE, request_body("harmless too")))[0] == 200
    stats = await c.stats()
    assert stats["poison_500"] == 4 and stats["submits"] == 1 and len(c.emulator.ops) == 1


# -- 3. tokenizer --------------------------------------------------------------------------


async def test_tokenizer_counts_what_a_generation_reports(start: Start) -> None:
    c = await start()
    text = "The quick brown fox jumps over the lazy dog, twice."
    status, data = await c.call(
        "POST", TOKENIZE, {"modelUri": f"gpt://{FOLDER}/yandexgpt-lite/latest", "text": text}
    )
    assert status == 200 and data["modelVersion"]
    assert len(data["tokens"]) == len(text) // 4
    assert "".join(t["text"] for t in data["tokens"]) == text
    assert all(t["id"].isdigit() and t["special"] is False for t in data["tokens"])
    body = request_body("a prompt of some length, to be counted exactly")
    status, tokens = await c.call("POST", TOKENIZE_COMPLETION, body)
    assert status == 200
    status, result = await c.call("POST", COMPLETE, body)
    assert status == 200
    assert len(tokens["tokens"]) == int(result["result"]["usage"]["inputTextTokens"])
    assert "".join(t["text"] for t in tokens["tokens"]) == "".join(
        m["text"] for m in body["messages"]
    )
    stats = await c.stats()
    assert stats["tokenize"] == 2 and stats.get("submits", 0) == 0 and not c.emulator.ops
    status, _ = await c.call("POST", TOKENIZE, {"modelUri": "gpt://f/m", "text": "x"}, headers={})
    assert status == 401
    status, data = await c.call("POST", TOKENIZE, {"modelUri": "gpt://f/m"})
    assert status == 400 and grpc_code(data) == 3


async def test_tokenizer_quota(start: Start) -> None:
    c = await start(tokenize_rps=2)
    tok = {"modelUri": f"gpt://{FOLDER}/yandexgpt-lite", "text": "abc"}
    statuses = [(await c.call("POST", TOKENIZE, tok))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await c.stats())["tokenize_429"] == 1


# -- 4. model and folder checks ------------------------------------------------------------


async def test_known_models_and_folder(start: Start) -> None:
    c = await start(known_models=frozenset({"yandexgpt-lite"}), folder=FOLDER)
    assert (await c.submit(request_body("ok")))[0] == 200
    ft = request_body("fine-tuned")
    ft["modelUri"] += "@ft-suffix"
    assert (await c.submit(ft))[0] == 200
    status, data = await c.submit(request_body("x", model="yandexgpt"))
    assert status == 400 and grpc_code(data) == 3 and "not found" in json.dumps(data)
    status, data = await c.call("POST", COMPLETE, request_body("x", model="yandexgpt"))
    assert status == 400 and grpc_code(data) == 3
    tok = {"modelUri": f"gpt://{FOLDER}/aliceai-llm", "text": "x"}
    assert (await c.call("POST", TOKENIZE, tok))[0] == 400
    status, data = await c.submit(request_body("x"), headers={**HEADERS, "x-folder-id": "other"})
    assert status == 403 and grpc_code(data) == 7
    status, data = await c.submit(request_body("x", folder="other"))
    assert status == 400 and grpc_code(data) == 3
    # without the switches any folder and any model are served, as before
    open_ = await start()
    assert (await open_.submit(request_body("x", folder="other", model="anything")))[0] == 200


# -- 5. hourly quota shapes ----------------------------------------------------------------


def test_rolling_window_admits_at_most_limit_in_any_span() -> None:
    q = quotas.RollingWindow(3, 10.0)
    assert [q.admit(t) for t in (0, 1, 2, 3, 9.9)] == [True, True, True, False, False]
    assert [q.admit(t) for t in (10.0, 10.5, 11.0, 11.5, 12.0)] == [True, False, True, False, True]


def test_token_bucket_starts_full_and_refills_continuously() -> None:
    q = quotas.TokenBucket(4, 8.0, now=100.0)  # one token every 2 s
    assert sum(q.admit(100.0) for _ in range(6)) == 4
    assert q.admit(101.0) is False
    assert q.admit(102.0) is True and q.admit(102.0) is False
    assert sum(q.admit(110.0) for _ in range(6)) == 4  # refilled, never beyond capacity
    # over a long stretch it admits the rate, not more
    q = quotas.TokenBucket(5, 10.0, now=0.0)
    admitted = sum(q.admit(t / 10) for t in range(1001))  # 100 s, 10 tries a second
    assert admitted == 5 + 50


def test_fixed_window_resets_at_each_boundary() -> None:
    q = quotas.FixedWindow(3, 10.0, origin=5.0)
    assert sum(q.admit(14.9) for _ in range(5)) == 3  # window [5, 15)
    assert sum(q.admit(15.0) for _ in range(5)) == 3  # window [15, 25), though 0.1 s later
    assert q.admit(24.99) is False and q.admit(25.0) is True
    assert isinstance(quotas.hourly("fixed", 3, 10, 0), quotas.FixedWindow)
    assert isinstance(quotas.hourly("bucket", 3, 10, 0), quotas.TokenBucket)
    assert isinstance(quotas.hourly("rolling", 3, 10, 0), quotas.RollingWindow)


@pytest.mark.parametrize(("shape", "second_batch"), [("rolling", 0), ("bucket", 1), ("fixed", 3)])
async def test_hour_shape_over_http(start: Start, shape: str, second_batch: int) -> None:
    # 3 per 0.5 s "hour": a batch late in the first window, another just after its boundary
    c = await start(submit_per_hour=3, hour_seconds=0.5, hour_shape=shape, retry_after=1.5)
    await asyncio.sleep(0.3 - c.emulator.elapsed())
    first = [(await c.submit(request_body(f"a{i}")))[0] for i in range(4)]
    assert first == [200, 200, 200, 429]
    await asyncio.sleep(0.55 - c.emulator.elapsed())
    second = [(await c.submit(request_body(f"b{i}")))[0] for i in range(4)]
    assert second.count(200) == second_batch, second
    async with c.session.post(c.url + SUBMIT, json=request_body("c"), headers=HEADERS) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1.5"
        assert grpc_code(await resp.json()) == 8


# -- 6. state file -------------------------------------------------------------------------


async def test_operations_survive_a_restart(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    a = await start(state_file=str(path), latency=(0.3, 0.3))
    body = request_body("remember me")
    _, first = await a.submit(body, headers={**HEADERS, "Idempotency-Key": "key-1"})
    _, second = await a.submit(request_body("cancel me"))
    assert (await a.call("POST", f"/operations/{second['id']}:cancel", {}))[0] == 200
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 3  # two operations and a cancel
    await asyncio.sleep(0.35)  # both are older than their latency now

    b = await start(state_file=str(path), latency=(5, 5), dedupe=True)
    assert (await b.stats())["state_ops_loaded"] == 2
    status, data = await b.poll(first["id"])  # done at once: its age came along
    assert status == 200 and data["done"] is True
    assert data["response"]["alternatives"][0]["message"]["text"] == emu.answer_for(body)
    _, data = await b.poll(second["id"])
    assert data["done"] is True and data["error"]["code"] == 1
    status, _ = await b.poll("d7qneverheardof")
    assert status == 404
    _, again = await b.submit(body, headers={**HEADERS, "Idempotency-Key": "key-1"})
    assert again["id"] == first["id"]  # the key was remembered too

    with path.open("a") as f:
        f.write('{"type": "op", "id": "torn')  # a write cut short by a kill
    c = await start(state_file=str(path))
    assert c.emulator.stats["state_lines_skipped"] == 1 and len(c.emulator.ops) == 2
    _, third = await c.submit(request_body("after the torn line"))
    d = await start(state_file=str(path))
    assert third["id"] in d.emulator.ops and len(d.emulator.ops) == 3


async def test_operation_times_are_wall_clock(start: Start) -> None:
    c = await start(latency=(0.2, 0.2))
    before = time.time()
    _, op = await c.submit(request_body("when"))
    created = c.emulator.ops[op["id"]].created
    assert before <= created <= time.time()
    assert c.emulator.ops[op["id"]].ready_at == pytest.approx(created + 0.2)


# -- 7. wrong-shaped JSON ------------------------------------------------------------------


async def test_shape_faults(start: Start) -> None:
    assert emu.parse_fault("poll:shape=0.1") == ("poll:shape", 0.1)
    c = await start(faults={"submit:shape": 1.0})
    status, data = await c.submit(request_body("x"))
    assert status == 200 and data == {"id": 12345}
    assert (await c.stats())["fault_submit_shape"] == 1 and not c.emulator.ops

    c = await start(faults={"poll:shape": 1.0}, latency=(5, 5))
    _, op = await c.submit(request_body("x"))
    status, data = await c.poll(op["id"])
    assert status == 200 and data["done"] is True and data["response"]["alternatives"] == ["oops"]
    assert (await c.stats())["fault_poll_shape"] == 1

    c = await start(faults={"complete:shape": 1.0})
    status, data = await c.call("POST", COMPLETE, request_body("x"))
    assert status == 200 and data == {"result": {"alternatives": [{"message": "hi"}]}}
    assert (await c.stats())["fault_complete_shape"] == 1


# -- 8. cancel -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["allow", "refuse", "ignore"])
async def test_cancel_modes(start: Start, mode: str) -> None:
    c = await start(cancel_mode=mode, latency=(5, 5))
    _, running = await c.submit(request_body("long"))
    cancel = f"/operations/{running['id']}:cancel"
    status, data = await c.call("POST", cancel, {})
    if mode == "allow":
        assert status == 200 and data["done"] is True and data["error"]["code"] == 1
        _, polled = await c.poll(running["id"])
        assert polled["done"] is True and polled["error"]["code"] == 1
    elif mode == "refuse":
        assert status == 400 and grpc_code(data) == 9
        assert not (await c.poll(running["id"]))[1].get("done")
    else:
        assert status == 200 and not data.get("done") and "error" not in data
        assert not (await c.poll(running["id"]))[1].get("done")
    # GET is accepted as well (the proto maps cancel to GET)
    status, _ = await c.call("GET", cancel)
    assert status == (400 if mode == "refuse" else 200)
    # cancelling a finished operation returns it unchanged, with its response, in every mode
    fast = await start(cancel_mode=mode, latency=(0.01, 0.01))
    _, op = await fast.submit(request_body("short"))
    await fast.until_done(op["id"])
    for method in ("POST", "GET"):
        status, data = await fast.call(
            method, f"/operations/{op['id']}:cancel", {} if method == "POST" else None
        )
        assert status == 200 and data["done"] is True and "response" in data
    assert (await fast.call("POST", "/operations/d7qunknown:cancel", {}))[0] == 404
    stats = await fast.stats()
    assert stats["cancels"] == 2 and stats["cancels_of_finished"] == 2


# -- 9. latency cap ------------------------------------------------------------------------


async def test_latency_cap_and_latency_of(start: Start) -> None:
    assert emu.parse_lognormal_capped("2:1.5:0.3") == (2.0, 1.5, 0.3)
    assert emu.parse_lognormal_capped("2:1.5") == (2.0, 1.5, None)
    assert emu.parse_lognormal("2:1.5") == (2.0, 1.5)
    with pytest.raises(ValueError):
        emu.parse_lognormal("2:1.5:0.3")
    bodies = [request_body(f"job {i}") for i in range(50)]
    free = emu.Emulator(emu.Config(lognormal=(0.1, 1.5), seed=1))
    capped = emu.Emulator(emu.Config(lognormal=(0.1, 1.5), latency_cap=0.2, seed=1))
    raw = [free.latency_of(b) for b in bodies]
    assert max(raw) > 0.2
    assert [capped.latency_of(b) for b in bodies] == [min(x, 0.2) for x in raw]
    # the latency a request gets is latency_of its body
    c = await start(lognormal=(0.05, 1.0), latency_cap=0.08, seed=3)
    for b in bodies[:5]:
        _, op = await c.submit(b)
        o = c.emulator.ops[op["id"]]
        assert o.ready_at - o.created == pytest.approx(c.emulator.latency_of(b), abs=1e-6)
        assert c.emulator.latency_of(b) <= 0.08


# -- 10. measurements ----------------------------------------------------------------------


async def test_notice_lag_and_poll_peak(start: Start) -> None:
    c = await start(latency=(0.1, 0.1))
    bodies = [request_body(f"m{i}") for i in range(3)]
    ops = [(await c.submit(b))[1]["id"] for b in bodies]
    for op in ops:  # polled while running: these do not count as seen
        assert not (await c.poll(op))[1].get("done")
    await asyncio.sleep(0.35)  # ready at ~0.1 s, first seen done at ~0.35 s
    for op in ops + ops:  # the second poll of each does not change its lag
        assert (await c.poll(op))[1]["done"] is True
    stats = await c.stats()
    assert stats["ops_seen_done"] == 3
    assert 0.2 <= stats["notice_lag_mean"] <= stats["notice_lag_max"] < 1.0
    assert stats["notice_lag_ratio_max"] == pytest.approx(stats["notice_lag_max"] / 0.1, rel=0.01)
    assert 6 <= stats["polls_peak_per_second"] <= 9
    assert "ops" not in stats and "submit_times" not in stats
    detail = await c.stats(detail=True)
    assert len(detail["submit_times"]) == 3 and detail["submit_times"] == sorted(
        detail["submit_times"]
    )
    assert {o["id"] for o in detail["ops"]} == set(ops)
    for o in detail["ops"]:
        assert o["body_key"] in {emu.body_key(b) for b in bodies}
        assert o["ready_at"] == pytest.approx(o["created"] + 0.1, abs=1e-3)
        assert o["seen_done_at"] - o["ready_at"] >= 0.2
        assert 0 <= o["created"] < 1.0  # relative to when serving began


# -- 11. operation error code --------------------------------------------------------------


@pytest.mark.parametrize("code", [3, 14])
async def test_op_error_code(start: Start, code: int) -> None:
    config: dict[str, Any] = {"op_error_rate": 1.0}
    if code != 3:
        config["op_error_code"] = code  # 3 is the default
    c = await start(**config)
    _, op = await c.submit(request_body("fails"))
    data = await c.until_done(op["id"])
    assert data["error"]["code"] == code and "response" not in data
