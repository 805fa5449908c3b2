"""Input parsing: the three shapes, overrides, and every kind of bad line reported precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.errors import Problem, UsageError
from runner.inputs import MAX_LINE_BYTES, Spec, read_jobs

URI = "yandexgpt-lite/latest"  # a short name is stored without a folder


def parse(tmp_path: Path, *lines: str | bytes) -> list[Spec | Problem]:
    p = tmp_path / "jobs.jsonl"
    p.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return list(read_jobs(str(p), "yandexgpt-lite"))


def body(item: Spec | Problem) -> dict:
    assert isinstance(item, Spec), item
    return json.loads(item.body)


def test_prompt_shape_with_system(tmp_path: Path) -> None:
    [spec] = parse(tmp_path, '{"id": "q1", "prompt": "Привет", "system": "Будь краток"}')
    assert spec.id == "q1"
    assert body(spec) == {
        "modelUri": URI,
        "completionOptions": {"stream": False},
        "messages": [{"role": "system", "text": "Будь краток"}, {"role": "user", "text": "Привет"}],
    }


def test_messages_shape_and_overrides(tmp_path: Path) -> None:
    line = {
        "id": "q2",
        "messages": [{"role": "user", "text": "hi"}],
        "model": "yandexgpt/rc",
        "completionOptions": {"temperature": 0.5, "maxTokens": 100,
                              "reasoningOptions": {"mode": "DISABLED"}},
        "jsonSchema": {"schema": {"type": "object"}},
    }  # fmt: skip
    b = body(parse(tmp_path, json.dumps(line))[0])
    assert b["modelUri"] == "yandexgpt/rc"
    assert b["completionOptions"] == {
        "stream": False, "temperature": 0.5, "maxTokens": "100",
        "reasoningOptions": {"mode": "DISABLED"},
    }  # fmt: skip
    assert b["jsonSchema"] == {"schema": {"type": "object"}}


def test_raw_body_shape_keeps_its_model_uri(tmp_path: Path) -> None:
    raw = {
        "modelUri": "gpt://other/yandexgpt/latest",
        "completionOptions": {"stream": False, "temperature": 0.6, "maxTokens": "2000"},
        "messages": [{"role": "user", "text": "x"}],
    }
    [spec] = parse(tmp_path, "", json.dumps(raw), "   ")
    assert spec.id == "line-2" and spec.line == 2  # blank lines skipped, numbering kept
    assert body(spec)["modelUri"] == "gpt://other/yandexgpt/latest"
    assert body(spec)["completionOptions"]["maxTokens"] == "2000"


def test_max_tokens_as_a_string_with_leading_zeros_is_its_value(tmp_path: Path) -> None:
    # a first fix of issue 11 session 5 capped the string's length and refused this valid 100
    [spec] = parse(tmp_path, '{"prompt": "p", "completionOptions": {"maxTokens": "0000000000000000000100"}}')
    assert body(spec)["completionOptions"]["maxTokens"] == "100"
    # what an earlier version accepted and sent is still accepted (its batches resume)
    [arabic, nulls] = parse(tmp_path, '{"prompt": "p", "completionOptions": {"maxTokens": "\u0661\u0660\u0660"}}',
                            '{"prompt": "p", "toolChoice": null, "parallelToolCalls": null}')  # fmt: skip
    assert body(arabic)["completionOptions"]["maxTokens"] == "100"
    assert body(nulls)["toolChoice"] is None and body(nulls)["parallelToolCalls"] is None


def test_same_job_serialises_identically(tmp_path: Path) -> None:
    a, b = parse(
        tmp_path,
        '{"id": "x", "prompt": "p", "completionOptions": {"temperature": 0.1, "maxTokens": 5}}',
        '{"completionOptions": {"maxTokens": "5", "temperature": 0.1}, "prompt": "p", "id": "x"}',
    )
    assert isinstance(a, Spec) and isinstance(b, Spec) and a.body == b.body


BAD = [
    ("not json", "{oops", "", "not valid JSON"),
    ("array", "[1, 2]", "", "expected a JSON object"),
    ("string", '"a prompt alone"', "", "expected a JSON object, got a string"),
    ("missing prompt", '{"id": "a"}', "prompt", "missing"),
    ("empty messages", '{"messages": []}', "messages", "must not be empty"),
    ("unknown role", '{"messages": [{"role": "bot", "text": "x"}]}', "messages[0].role", "must be one of"),
    ("text not string", '{"messages": [{"role": "user", "text": 5}]}', "messages[0].text", "must be a string"),
    ("prompt not string", '{"prompt": ["a"]}', "prompt", "must be a string"),
    ("unknown scheme", '{"prompt": "x", "modelUri": "emb://f/text-search-doc"}', "model", "unknown model URI scheme"),
    ("maxTokens zero", '{"prompt": "x", "completionOptions": {"maxTokens": 0}}', "completionOptions.maxTokens", "positive integer"),
    ("maxTokens float", '{"prompt": "x", "completionOptions": {"maxTokens": 1.5}}', "completionOptions.maxTokens", "positive integer"),
    ("temperature", '{"prompt": "x", "completionOptions": {"temperature": 1.5}}', "completionOptions.temperature", "from 0 to 1"),
    ("unknown field", '{"promt": "x"}', "promt", "unknown field"),
    ("id type", '{"id": {"a": 1}, "prompt": "x"}', "id", "string or an integer"),
    ("stream", '{"prompt": "x", "completionOptions": {"stream": true}}', "completionOptions.stream", "not supported"),
    # each of these was a traceback (exit 1) or was sent as it was, paid for (review, issue 11 session 5)
    ("huge integer", '{"id": ' + "1" * 5000 + ', "prompt": "x"}', "", "Exceeds the limit (4300 digits)"),
    ("deep nesting", '{"prompt": "x", "tools": ' + "[" * 100_000 + "]" * 100_000 + "}", "", "nested too deeply"),
    ("NaN", '{"prompt": "x", "tools": [NaN]}', "", "NaN is not a JSON number"),
    ("maxTokens superscript", '{"prompt": "x", "completionOptions": {"maxTokens": "\u00b2"}}', "completionOptions.maxTokens", "positive integer"),
    ("lone surrogate", '{"prompt": "\\ud800"}', "messages", "not valid Unicode"),
    ("surrogate id", '{"id": "\\udfff", "prompt": "x"}', "id", "not valid Unicode"),
    ("message typo", '{"messages": [{"role": "user", "text": "u", "extra": "typo"}]}', "messages[0].extra", "unknown field"),
    ("reasoning typo", '{"prompt": "x", "completionOptions": {"reasoningOptions": {"mode": "DISABLED", "foo": 1}}}', "completionOptions.reasoningOptions.foo", "unknown option"),
    ("toolChoice", '{"prompt": "x", "toolChoice": 5}', "toolChoice", "must be an object"),
    ("parallelToolCalls", '{"prompt": "x", "parallelToolCalls": "yes"}', "parallelToolCalls", "true or false"),
    ("tools of numbers", '{"prompt": "x", "tools": [1, 2]}', "tools", "list of objects"),
    ("toolResultList", '{"messages": [{"role": "user", "toolResultList": 5}]}', "messages[0].toolResultList", "must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "line", "field", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_line_names_line_and_field(
    tmp_path: Path, name: str, line: str, field: str, message: str
) -> None:
    items = parse(tmp_path, '{"prompt": "fine"}', line)
    assert isinstance(items[0], Spec)
    problem = items[1]
    assert isinstance(problem, Problem), problem
    assert (problem.line, problem.field) == (2, field)
    assert message in problem.message
    assert str(problem).startswith(f"{tmp_path / 'jobs.jsonl'}:2")


def test_invalid_utf8_bom_and_truncated_last_line(tmp_path: Path) -> None:
    p = tmp_path / "jobs.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff"}\n{"prompt": "cut')
    problems = list(read_jobs(str(p), "yandexgpt-lite"))
    assert [(x.line, x.message.split(" ")[0]) for x in problems if isinstance(x, Problem)] == [
        (1, "file"), (2, "invalid"), (3, "not"),
    ]  # fmt: skip
    assert "truncated" in problems[2].message  # type: ignore[union-attr]


def test_huge_line_is_reported_without_reading_it_whole(tmp_path: Path) -> None:
    p = tmp_path / "jobs.jsonl"
    with p.open("wb") as f:
        f.write(b'{"prompt": "' + b"a" * (10 * MAX_LINE_BYTES) + b'"}\n{"prompt": "next"}\n')
    items = list(read_jobs(str(p), "yandexgpt-lite"))
    assert (
        isinstance(items[0], Problem) and items[0].line == 1 and "longer than" in items[0].message
    )
    assert isinstance(items[1], Spec) and items[1].line == 2


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        list(read_jobs(str(tmp_path / "nope.jsonl"), "yandexgpt-lite"))
    with pytest.raises(UsageError, match="is a directory"):
        list(read_jobs(str(tmp_path), "yandexgpt-lite"))


def test_chat_shape_first_turn_body_and_turns(tmp_path: Path) -> None:
    [spec] = parse(tmp_path, '{"id": "c1", "system": "s", "turns": ["one", "two"]}')
    assert isinstance(spec, Spec)
    assert body(spec)["messages"] == [
        {"role": "system", "text": "s"},
        {"role": "user", "text": "one"},
    ]
    assert json.loads(spec.turns or "") == ["one", "two"]
    [single] = parse(tmp_path, '{"prompt": "x"}')
    assert isinstance(single, Spec) and single.turns is None


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"turns": []}', "turns"),
        ('{"turns": "one"}', "turns"),
        ('{"turns": ["ok", 3]}', "turns[1]"),
        ('{"turns": ["ok", " "]}', "turns[1]"),
        ('{"turns": ["a"], "prompt": "b"}', "prompt"),
    ],
)
def test_bad_chat_lines(tmp_path: Path, line: str, field: str) -> None:
    [problem] = parse(tmp_path, line)
    assert isinstance(problem, Problem) and problem.field == field


def test_a_json_error_is_given_whole_with_line_and_column(tmp_path: Path) -> None:
    # issue 12.7: "Invalid control character at" was cut mid-sentence
    [_, problem] = parse(tmp_path, '{"prompt": "ok"}', '{"prompt": "tab\there"}')
    assert isinstance(problem, Problem)
    assert problem.message == "not valid JSON: Invalid control character at line 2, column 16"


def test_a_json_error_at_the_end_of_a_line_is_placed_there_and_the_file_shape_is_named(
    tmp_path: Path,
) -> None:
    # newcomer: a line missing its "}" was reported at "column 1" (past the line break), an
    # indented file or a JSON array only as a bad line or "got list", with no word of the shape
    [_, cut] = parse(tmp_path, '{"prompt": "ok"}', '{"id": "b", "prompt": "hi"')
    assert isinstance(cut, Problem)
    assert cut.message.endswith("at line 2, column 27")
    indented = parse(tmp_path, "{", '  "prompt": "x"', "}")
    assert isinstance(indented[0], Problem) and "looks like indented JSON" in indented[0].message
    [array] = parse(tmp_path, '[{"prompt": "x"}]')
    assert isinstance(array, Problem) and "not a JSON array" in array.message


def test_the_folder_is_not_part_of_a_job(tmp_path: Path) -> None:
    from runner.inputs import expand, model_free

    [short, full] = parse(
        tmp_path, '{"prompt": "x"}', '{"prompt": "x", "modelUri": "gpt://b1gother/yandexgpt/latest"}'
    )
    assert isinstance(short, Spec) and isinstance(full, Spec)
    assert body(short)["modelUri"] == "yandexgpt-lite/latest"
    assert json.loads(expand(short.body, "b1gmine"))["modelUri"] == "gpt://b1gmine/yandexgpt-lite/latest"
    assert expand(full.body, "b1gmine") == full.body  # a URI the user wrote is sent as written
    # what older versions stored (the folder baked in) is the same job
    old = short.body.replace('"yandexgpt-lite/latest"', '"gpt://b1gold/yandexgpt-lite/latest"')
    assert model_free(old) == model_free(short.body)
