"""Before and after a run: the dry run's plan, the credentials check, and cancelling a batch.

``plan`` validates jobs against the database exactly as ``add`` would (a rolled-back ingest, on
a throwaway copy of the schema when there is no database yet, so nothing is created), counts
them per model and prices them: input tokens estimated at 3.5 characters a token, or counted by
the API's tokenizer with ``exact`` (free of charge; needs credentials), and the answers as a
range from nothing to their ``maxTokens``. ``check`` makes one free authenticated tokenizer
request and says plainly whether key, folder, role and model are right.

``cancel`` checks everything it needs first (credentials, if operations are running), then asks
the server to cancel each running operation and reads what comes back: an operation that had
already finished is recorded as done (or failed) with its answer, one the server reports
cancelled becomes ``cancelled``, one it will not cancel is left running for a later run to
collect. Pending jobs are cancelled last, so an error part-way leaves them untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from runner import connect, ingest, pricing
from runner.database import Database
from runner.errors import CredentialsError
from runner.inputs import Spec, expand
from runner.jobs import Answered, Cancelled, Failed, Outcome
from runner.pacing import Pacer
from runner.queue import Queue

if TYPE_CHECKING:
    from runner.batch import Batch, Jobs

CHARS_PER_TOKEN = 3.5


async def plan(batch: Batch, jobs: Jobs, exact: bool) -> dict[str, Any]:
    from runner.batch import listed  # runner.batch imports this module

    specs, where = batch._specs(jobs)
    seen: list[Spec] = []

    def tally(items: Any) -> Any:
        for item in items:
            if isinstance(item, Spec):
                seen.append(item)
            yield item

    async with _database(batch) as db:
        added = await ingest.ingest(db, where, tally(specs), dry_run=True, listed=listed(jobs))
    models: dict[str, int] = {}
    chars: dict[str, int] = {}
    answers: dict[str, int] = {}
    unbounded = 0
    for spec in seen:
        body = json.loads(spec.body)
        uri = body["modelUri"]
        models[uri] = models.get(uri, 0) + 1
        text = sum(len(m.get("text", "")) for m in body["messages"])
        text += sum(len(t) for t in json.loads(spec.turns)) if spec.turns else 0
        chars[uri] = chars.get(uri, 0) + text
        turns = len(json.loads(spec.turns)) if spec.turns else 1
        most = int(body["completionOptions"].get("maxTokens", 0)) * turns
        answers[uri] = answers.get(uri, 0) + most
        unbounded += most == 0
    tokens = {uri: round(n / CHARS_PER_TOKEN) for uri, n in chars.items()}
    method = f"estimated at {CHARS_PER_TOKEN} characters per token"
    if exact:
        tokens = await _count_exactly(batch, seen)
        method = "counted by the API's tokenizer, first turn of each chat"
    priced = pricing.estimate(tokens, batch.prices, batch.mode)
    return {
        "jobs": len(seen),
        "new": added.added,
        "known": added.known,
        "models": {pricing.model_name(u): n for u, n in models.items()},
        "inputTokens": sum(tokens.values()),
        "inputTokensMethod": method,
        "answerTokensAtMost": sum(answers.values()),
        "jobsWithoutMaxTokens": unbounded,
        "cost": priced,
        "answersCostAtMost": pricing.estimate(answers, batch.prices, batch.mode),
        "warnings": pricing.warnings(set(models), batch.mode),
    }


@contextlib.asynccontextmanager
async def _database(batch: Batch) -> Any:
    if os.path.exists(batch.path) and os.path.getsize(batch.path) > 0:
        yield await batch._open()
        return
    with tempfile.TemporaryDirectory() as tmp:  # a new database is never created by a dry run
        async with Database.open(os.path.join(tmp, "plan.db")) as db:
            yield db


async def _count_exactly(batch: Batch, specs: list[Spec]) -> dict[str, int]:
    creds = connect.credentials(*batch._creds, emulator=batch.endpoints.emulator)
    counted: dict[str, int] = {}
    pacer = Pacer(45.0)  # under the tokenizer's 50 requests a second
    async with connect.connect(creds, batch.endpoints, batch.path, batch.request_timeout) as client:
        for spec in specs:
            await pacer.slot()
            n = await client.tokenize_completion(expand(spec.body, creds.folder_id))
            uri = json.loads(spec.body)["modelUri"]
            counted[uri] = counted.get(uri, 0) + n
    return counted


async def check(batch: Batch) -> dict[str, Any]:
    from runner.client import ApiError
    from runner.inputs import model_uri

    creds = connect.credentials(*batch._creds, emulator=batch.endpoints.emulator)
    uri = model_uri(batch.model, creds.folder_id)
    body = json.dumps({"modelUri": uri, "messages": [{"role": "user", "text": "ping"}]})
    report: dict[str, Any] = {"folder": creds.folder_id, "model": uri, "ok": False}
    async with connect.connect(creds, batch.endpoints, batch.path, batch.request_timeout) as client:
        report["llmUrl"] = client.llm_url
        try:
            await client.tokenize_completion(body)
        except CredentialsError as e:
            report["message"] = f"the key or token is refused: {e}"
        except ApiError as e:
            report["message"] = {
                "forbidden": f"permission denied ({e.message}): the service account needs the "
                "ai.languageModels.user role on folder " + creds.folder_id,
                "invalid": f"refused as invalid ({e.message}): check the folder id (an API key's "
                "service account must belong to it) and the model name",
                "not_found": f"not found ({e.message}): check --llm-url and the model name",
            }.get(e.kind, f"the API could not be reached: {e.message}")
        else:
            where = " by the built-in emulator (your real credentials were not checked)" \
                if batch.endpoints.emulator else ""
            report.update(ok=True, message=f"key, folder, role and model are accepted{where} "
                          "(checked with a free tokenizer request)")  # fmt: skip
    return report


async def cancel(batch: Batch, pending_only: bool) -> dict[str, int]:
    from runner.client import ApiError

    db = await batch._open()
    queue = Queue(db)
    running = [] if pending_only else await queue.running()
    creds = connect.credentials(*batch._creds, emulator=batch.endpoints.emulator) if running else None
    # first, in one transaction: nothing more is sent for this batch, whatever stops this
    # command (an answer the server gives below is a running job's last)
    report = {"cancelledPending": await queue.cancel_pending(running=bool(running)),
              "cancelledRunning": 0, "finishedRunning": 0, "leftRunning": len(running)}  # fmt: skip
    if creds is not None:
        outcomes: list[Outcome] = []
        try:
            async with connect.connect(creds, batch.endpoints, db.path, batch.request_timeout) as client:
                pacer = Pacer(batch.settings.poll_rps)
                for op in running:
                    await pacer.slot()
                    try:
                        state = await client.cancel(op.operation_id)
                    except ApiError:
                        continue
                    now = time.time()
                    if state is None or not state.done:
                        continue
                    if state.completion is not None:
                        outcomes.append(Answered(op.attempt, now, state.completion))
                        report["finishedRunning"] += 1
                    elif state.cancelled:
                        outcomes.append(Cancelled(op.attempt, now))
                        report["cancelledRunning"] += 1
                    elif state.failure is not None:
                        outcomes.append(Failed(op.attempt, now, state.failure))
                        report["finishedRunning"] += 1
        finally:
            await queue.apply(outcomes, batch.settings.context_budget)  # answers are never dropped
        report["leftRunning"] -= report["cancelledRunning"] + report["finishedRunning"]
    return report
