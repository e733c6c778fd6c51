"""`qwen15 serve` with the real Qwen2.5-Coder-0.5B-Instruct: greedy parity, tool calls (plain and streamed), JSON mode."""

import json

import pytest

from serve_fixtures import ServerProcess

pytestmark = pytest.mark.real_model

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"}},
                   "required": ["city"]}}}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def server(real_gguf_path):
    srv = ServerProcess(real_gguf_path, "--max-batch", "4", "--kv-tokens", "8192", name="qwen")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_chat_greedy_equals_generate(client, real_gguf_path):
    from qwen15 import LLM

    messages = [{"role": "user", "content": "用一句话介绍一下北京。"}]
    ref = LLM.load(real_gguf_path).generate(messages, max_tokens=16)
    r = client.chat.completions.create(model="qwen", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == ref.text


def test_tool_call_is_parsed(client):
    r = client.chat.completions.create(model="qwen", messages=ASK_WEATHER, tools=TOOLS, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()


def test_tool_call_streamed(client):
    stream = client.chat.completions.create(model="qwen", messages=ASK_WEATHER, tools=TOOLS, temperature=0,
                                            max_tokens=60, stream=True)
    calls, reasons, content = [], [], ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert reasons == ["tool_calls"] and "<tool_call>" not in content
    assert [c.function.name for c in calls] == ["get_weather"]
    assert "paris" in json.loads(calls[0].function.arguments)["city"].lower()


def test_named_tool_choice_forces_that_call(client):
    messages = [{"role": "user", "content": "Tell me a joke about Berlin."}]
    r = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, temperature=0, max_tokens=40,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_makes_a_valid_call(client, stream):
    # Issue 16: "required" gave an empty answer (the model ended right after the forced `<tool_call>`).
    # A prompt that needs no tool: the call must still come, naming a known tool with a JSON object.
    messages = [{"role": "user", "content": "Tell me a joke about Berlin."}]
    tools = TOOLS + [{"type": "function", "function": {"name": "get_time", "description": "the time in a city",
                                                        "parameters": {"type": "object", "properties": {}}}}]
    kw = dict(model="qwen", messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=60)
    if stream:
        calls, reasons = [], []
        for chunk in client.chat.completions.create(stream=True, **kw):
            calls += chunk.choices[0].delta.tool_calls or []
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    else:
        r = client.chat.completions.create(**kw)
        calls, reasons = r.choices[0].message.tool_calls or [], [r.choices[0].finish_reason]
        assert r.usage.completion_tokens > 0
    assert reasons == ["tool_calls"] and len(calls) == 1
    assert calls[0].function.name in {"get_weather", "get_time"}
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_json_mode_returns_a_json_object(client):
    messages = [{"role": "user", "content": "Describe a person named Alice who is 30 years old, as JSON with keys name and age."}]
    r = client.chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value, dict) and r.choices[0].finish_reason == "stop"


def test_echo_logprobs_match_a_full_forward(client, real_gguf_path):
    """Multiple-choice scoring as evaluation harnesses do it: per-token log-probs of a prompt, no generation."""
    import torch

    from qwen15 import LLM

    llm = LLM.load(real_gguf_path)  # the server's default layout (the file's blocks)
    prompt = "Question: What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nAnswer: B"
    r = client.completions.create(model="qwen", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    from qwen15.engine.kv_cache import KVCache

    ids = llm.encode_prompt(prompt)
    with torch.inference_mode():  # one forward over the prompt through the engine's cache (as the server computes it)
        ref = torch.log_softmax(llm.model(torch.tensor([ids]), cache=KVCache(llm.config, len(ids))).float()[0], dim=-1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and "".join(lp.tokens) == prompt
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=2e-3)
