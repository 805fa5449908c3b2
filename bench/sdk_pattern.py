"""The official SDK example's pattern for many prompts, in a few lines of aiohttp.

Submit in chunks of 100 with a 1 s pause, then poll every operation every 10 s (both divided
by the time scale). Submits are retried the SDK's way on RESOURCE_EXHAUSTED and UNAVAILABLE:
backoff min(10 s, 1 s * 1.5^attempt) + U(0, 1 s), scaled. Unlike the SDK (5 attempts) this
retries without limit, so that it finishes every job and the comparison is of time and polls,
not of jobs dropped. It keeps no state on disk, as the SDK example does not.

    python bench/sdk_pattern.py JOBS.jsonl BASE_URL SCALE OUT.jsonl
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import aiohttp

HEADERS = {"Authorization": "Api-Key bench", "x-folder-id": "bench"}


async def submit(session: aiohttp.ClientSession, url: str, body: dict, scale: float) -> str:
    attempt = 0
    while True:
        async with session.post(f"{url}/foundationModels/v1/completionAsync", json=body) as r:
            if r.status == 200:
                return str((await r.json())["id"])
            await r.read()
        attempt += 1
        await asyncio.sleep((min(10.0, 1.5**attempt) + random.random()) / scale)


async def poll(session: aiohttp.ClientSession, url: str, op: str) -> dict | None:
    async with session.get(f"{url}/operations/{op}") as r:
        if r.status != 200:
            await r.read()
            return None
        data: dict = await r.json()
        return data if data.get("done") else None


async def main(jobs: str, url: str, scale: float, out: str) -> None:
    with open(jobs, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bodies = [
        (r["id"], {"modelUri": "gpt://bench/yandexgpt-lite/latest",
                   "completionOptions": {"stream": False},
                   "messages": [{"role": "user", "text": r["prompt"]}]})
        for r in rows
    ]  # fmt: skip
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        ops: dict[str, str] = {}
        for i in range(0, len(bodies), 100):
            chunk = bodies[i : i + 100]
            ids = await asyncio.gather(*(submit(session, url, b, scale) for _, b in chunk))
            ops.update({op: job for (job, _), op in zip(chunk, ids, strict=True)})
            await asyncio.sleep(1.0 / scale)
        with open(out, "w", encoding="utf-8") as f:
            while ops:
                await asyncio.sleep(10.0 / scale)
                pending = list(ops)
                results = await asyncio.gather(*(poll(session, url, op) for op in pending))
                for op, result in zip(pending, results, strict=True):
                    if result is not None:
                        f.write(
                            json.dumps({"id": ops.pop(op), "response": result.get("response")})
                            + "\n"
                        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]))
