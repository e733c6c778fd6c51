"""Tool-call parsing and streaming hold-back, on hand-written answers in Qwen2.5's documented format."""

import json

import pytest

from qwen15.serve.app import _ToolStream
from qwen15.serve.tools import forced_prefix, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tagged_calls_are_parsed_with_the_content_around_them():
    content, calls = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me check."
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in calls)


def test_bare_call_object_counts_only_for_a_known_tool():
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(bare, {"get_weather"})[1][0]["function"]["name"] == "get_weather"
    assert parse_tool_calls(bare, {"other"}) == (bare, [])
    assert parse_tool_calls("plain answer", {"get_weather"}) == ("plain answer", [])


def test_forced_prefix_plus_the_rest_parses():
    prefix = forced_prefix({"type": "function", "function": {"name": "get_weather"}})
    assert parse_tool_calls(prefix + '"city": "Oslo"}}\n</tool_call>')[1][0]["function"]["arguments"] == '{"city": "Oslo"}'


@pytest.mark.parametrize("answer,content,has_call", [
    ("Sure: " + CALL, "Sure: ", True),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", True),
    ("No tools needed, <tool> is not a tag.", "No tools needed, <tool> is not a tag.", False),
])
def test_stream_sends_content_and_holds_the_call(answer, content, has_call):
    for size in (1, 3, 7):
        stream = _ToolStream("")
        sent = "".join(stream.add(answer[i:i + size]) for i in range(0, len(answer), size))
        calls = parse_tool_calls(stream.full, {"get_weather"})[1]
        assert bool(calls) == has_call
        assert (sent if calls else sent + stream.unsent()) == (content if calls else answer)
