"""How the CLI shows things: the text forms of the reports the Python API returns as data.

Every command has a ``--json`` that prints the API's dict as is; these functions are the human
form of the same figures, with the same names, so the two never disagree.
"""

from __future__ import annotations

import json
import time
from typing import Any

from runner.progress import outage_text

STATES = ("pending", "submitting", "running", "done", "failed", "cancelled")


def status(data: dict[str, Any]) -> str:
    u, cost = data["usage"], data["cost"]
    unpriced = f"; no price for {', '.join(cost['unpriced'])}" if cost["unpriced"] else ""
    lines = [
        f"database  {data['database']}" + ("  (a run is live)" if data["live"] else ""),
        f"jobs      {data['total']}: " + ", ".join(f"{s} {data[s]}" for s in STATES),
        f"tokens    input {u['inputTextTokens']}, completion {u['completionTokens']}, "
        f"reasoning {u['reasoningTokens']}, total {u['totalTokens']}",
        f"cost      ~{cost['total']:.2f} {cost['currency']} (estimate{unpriced})",
        f"submits   {data['submits']} (ambiguous {data['ambiguousSubmits']}, resubmits "
        f"{data['resubmits']}, faults {data['faults']}); polls {data['polls']}; stale answers "
        f"ignored {data['staleOutcomes']}",
    ]
    for o in data.get("outage") or []:
        lines.append(outage_text(o["family"], o["since"], o["error"],
                                 max(0.0, o["next_try_at"] - time.time())))  # fmt: skip
    if data["oldestRunningAgeSeconds"] is not None:
        lines.append(f"oldest running operation: {data['oldestRunningAgeSeconds']:.0f} s")
    if data["topErrors"]:
        lines.append("top errors:")
        lines += [f"  {e['count']:>6} x code {e['code']}: {e['message']}" for e in data["topErrors"]]
        lines.append("  (`runner retry` moves failed jobs back to pending; "
                     "`runner jobs --status failed` lists them)")  # fmt: skip
    return "\n".join(lines)


def summary(counts: dict[str, int], this_run: dict[str, int], added: int, db: str) -> str:
    unfinished = counts["pending"] + counts["running"] + counts["submitting"]
    return (
        f"{counts['done']} done, {counts['failed']} failed, {counts['cancelled']} cancelled, "
        f"{unfinished} unfinished in {db} ({added} new jobs; this run: {this_run['submits']} "
        f"submits, {this_run['ambiguousSubmits']} ambiguous, {this_run['resubmits']} resubmits, "
        f"{this_run['faults']} faults, {this_run['polls']} polls)"
    )


def jobs(rows: list[dict[str, Any]], total: int) -> str:
    lines = ["id\tstate\tattempts\toperation\tturn\tlast error"]
    for r in rows:
        error = r["lastError"]
        lines.append("\t".join((
            r["id"], r["state"], str(r["attempts"]), r["operationId"] or "-", r.get("turn", "-"),
            f"{error['code']}: {error['message']}" if error else "-",
        )))  # fmt: skip
    if total > len(rows):
        lines.append(f"... {total - len(rows)} more not shown (--limit)")
    return "\n".join(lines)


def show(data: dict[str, Any]) -> str:
    lines = [f"id        {data['id']}", f"state     {data['state']}"]
    if "turn" in data:
        lines.append(f"turn      {data['turn']}")
    lines.append("counters  " + ", ".join(f"{k} {v}" for k, v in data["counters"].items()))
    lines.append("request   " + json.dumps(data["request"], ensure_ascii=False))
    result = data.get("result")
    if result:
        if "text" in result:
            lines.append("answer    " + result["text"])
        if result.get("usage"):
            lines.append("usage     " + json.dumps(result["usage"]))
        if result.get("error"):
            lines.append(f"error     {result['error']['code']}: {result['error']['message']}")
    for op in data["operations"]:
        sent = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(op["sentAt"]))
        what = "answered" if op["answeredAt"] else ("ambiguous" if op["ambiguous"] else "sent")
        lines.append(f"attempt {op['attempt']} (turn {op['turn']}) {sent} {op['operationId'] or '-'} "
                     f"{what}, {op['totalTokens']} tokens")  # fmt: skip
    for r in data["retries"]:
        lines.append(f"retried from {r['state']} after {r['attempts']} attempts"
                     + (f" ({r['error']['message']})" if r["error"] else ""))  # fmt: skip
    return "\n".join(lines)


def _answers(p: dict[str, Any], most: dict[str, Any]) -> str:
    bounded = f"at most {p['answerTokensAtMost']} tokens (their maxTokens), ~{most['total']:.2f} {most['currency']}"
    open_ = p["jobsWithoutMaxTokens"]
    if not open_:
        return f"answers: {bounded}"
    rest = p["jobs"] - open_
    return (f"answers: no upper bound: {open_} of {p['jobs']} job{'s' * (p['jobs'] != 1)} set no "
            f"maxTokens (the model's own limit applies)" + (f"; the other {rest}: {bounded}" if rest else ""))


def plan(p: dict[str, Any], db: str) -> str:
    models = ", ".join(f"{m} x{n}" for m, n in p["models"].items())
    cost, most = p["cost"], p["answersCostAtMost"]
    unpriced = sorted(set(cost["unpriced"]) | set(most["unpriced"]))
    lines = [
        f"{p['jobs']} jobs ({p['new']} new, {p['known']} already in {db}); models: {models}",
        f"input: {p['inputTokens']} tokens ({p['inputTokensMethod']}), ~{cost['total']:.2f} "
        f"{cost['currency']}",
        _answers(p, most),
    ]
    if unpriced:
        lines.append(f"unpriced (not in the totals): {', '.join(unpriced)}; add --price MODEL=PER_1K")
    lines += [f"warning: {w}" for w in p["warnings"]]
    lines.append("Estimates only. Nothing was stored or sent.")
    return "\n".join(lines)
