"""Multi-turn chats, as pure functions: given a chat's state and an answer, what comes next.

The models keep no history, so each turn resends the whole conversation with the earlier
answers as ``assistant`` messages. A chat is one job whose ``body`` is always the exact request
of its current turn; when a turn is answered, ``answer`` returns either the next turn's request
(the job goes back to pending and is claimed again as a new attempt), the final result, or a
stop: the next turn would not fit the context budget. A stop keeps the answered turns and
already holds the unanswered turn's request, so ``runner retry`` resumes exactly there.

There is no SQL and no clock here: the store reads a row into a ``Chat``, calls these functions
and writes what they return under the same fencing rule as every other outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.jobs import ApiFailure, Completion

CHARS_PER_TOKEN_LOW = 3  # generous for Russian and English: errs towards more tokens


@dataclass(frozen=True)
class Chat:
    turns: list[str]
    turn: int  # 0-based index of the turn whose request ``body`` is
    body: dict[str, Any]
    transcript: list[dict[str, Any]]


@dataclass(frozen=True)
class Next:
    """Answered, and another turn follows: its request, to be claimed as a new attempt."""

    turn: int
    body: dict[str, Any]
    transcript: list[dict[str, Any]]


@dataclass(frozen=True)
class Done:
    result: dict[str, Any]
    transcript: list[dict[str, Any]]


@dataclass(frozen=True)
class Stopped:
    """Answered, but the next turn cannot be sent; ``turn``/``body`` are that turn's request."""

    failure: ApiFailure
    turn: int
    body: dict[str, Any]
    transcript: list[dict[str, Any]]


def label(chat: Chat, failure: ApiFailure) -> ApiFailure:
    """A turn's failure, named by the turn, as the conversation's error."""
    return ApiFailure(failure.code, f"turn {chat.turn + 1} of {len(chat.turns)}: {failure.message}")


def summed(transcript: list[dict[str, Any]]) -> dict[str, int]:
    """The usage of the turns answered so far, field by field."""
    keys = dict.fromkeys(k for t in transcript for k in (t.get("usage") or {}))
    return {k: sum(int((t.get("usage") or {}).get(k, 0)) for t in transcript) for k in keys}


def answer(
    chat: Chat, completion: Completion, operation_id: str | None, budget: int
) -> Next | Done | Stopped:
    transcript = [
        *chat.transcript,
        {"text": completion.text, "usage": completion.usage, "operationId": operation_id},
    ]
    messages = [*chat.body["messages"], {"role": "assistant", "text": completion.text}]
    following = chat.turn + 1
    if following >= len(chat.turns):
        usage = summed(transcript)
        result = {
            **completion.as_result(),
            "usage": usage,
            "turns": transcript,
            "messages": messages,
        }
        return Done(result, transcript)
    question = chat.turns[following]
    body = {**chat.body, "messages": [*messages, {"role": "user", "text": question}]}
    max_tokens = int(chat.body.get("completionOptions", {}).get("maxTokens", 0))
    # the server counted this history exactly; add the next question and the answer's room
    needed = completion.usage.get("totalTokens", 0) + len(question) // CHARS_PER_TOKEN_LOW + 1
    needed += max_tokens
    if needed > budget:
        failure = ApiFailure(
            3,
            f"turn {following + 1} of {len(chat.turns)} would need about {needed} tokens, over "
            f"the context budget of {budget} (--context-budget); the answered turns are kept, "
            "and `runner retry` resumes at this turn (with a larger --context-budget)",
        )
        return Stopped(failure, following, body, transcript)
    return Next(following, body, transcript)
