"""`qwen15 serve` on a tiny random model, driven with the official openai client and raw HTTP.

References are independent of the server: greedy text from `LLM.generate` in this process on the same
file, log-probs from a plain full forward, the error shape from OpenAI's API reference.
"""

import json
import threading

import httpx
import openai
import pytest
import torch

from qwen15 import LLM
from serve_fixtures import ServerProcess

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_chat_gguf):
    srv = ServerProcess(tiny_chat_gguf, "--max-batch", "8", "--token-budget", "64", "--kv-tokens", "8192")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def llm(tiny_chat_gguf):
    return LLM.load(tiny_chat_gguf)


def full_logprobs(llm, ids):
    """log_softmax of one plain forward over ids: row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(llm.model(torch.tensor([ids])).float()[0], dim=-1)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_greedy_equals_generate(client, llm):
    ref = llm.generate(CHAT, max_tokens=20)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(llm.encode_prompt(CHAT))
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_chat_stream_matches_and_reports_usage(client, llm):
    ref = llm.generate(CHAT, max_tokens=20)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=server.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[-2][6:])


def test_completion_greedy_stop_string_and_batch_of_prompts(client, llm):
    prompts = ["def fibonacci(n):", "import numpy as np\n"]
    refs = [llm.generate(p, max_tokens=16) for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [x.text for x in refs]
    # A stop string taken from the middle of the greedy text cuts it right there.
    stop = refs[0].text[len(refs[0].text) // 2:][:3]
    cut = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == refs[0].text[:refs[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_each_get_their_own_greedy_answer(server, llm):
    prompts = [f"Item {i}: " + "abc " * i for i in range(6)]
    refs = [llm.generate(p, max_tokens=12).text for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = server.client().completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [g.choices[0].text for g in got] == refs


def test_n_choices_are_seeded_and_reproducible(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice draws its own tokens


def test_generated_token_logprobs_match_a_full_forward(client, llm):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = llm.encode_prompt(prompt)
    gen = llm.generate(prompt, max_tokens=6).token_ids
    ref = full_logprobs(llm, ids + gen)
    for k, token in enumerate(gen):
        row = ref[len(ids) + k - 1]
        assert lp.token_logprobs[k] == pytest.approx(float(row[token]), abs=1e-4)
        assert len(lp.top_logprobs[k]) == 3
        assert max(lp.top_logprobs[k].values()) == pytest.approx(float(row.max()), abs=1e-4)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy takes the top one


def test_echo_prompt_logprobs_match_a_full_forward(client, llm):
    prompt = "Question: what is 2 + 2?\nAnswer: 4"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    ids = llm.encode_prompt(prompt)
    ref = full_logprobs(llm, ids)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
    assert lp.text_offset == [len(llm.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert r.usage.completion_tokens == 0


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": "hi"}, "messages"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "messages": CHAT, "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "messages": CHAT, "n": 1000}, "n"),
    ({"model": "tiny", "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": "tiny", "messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT}, "model"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages"),
])
def test_bad_requests_answer_400_with_an_error_object(server, body, param):
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=server.headers())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_json_and_non_object_bodies(server):
    for raw in (b'{"model": "tiny", "messages": [', b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server.base_url + "/v1/completions", content=raw,
                       headers={**server.headers(), "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_context_overflow_unknown_model_and_keys(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 3000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert e.value.code == "model_not_found"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.base_url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # ...and everyone else is still served.
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_disconnect_mid_stream_cancels_and_frees_blocks(server):
    import time

    aborted = server.metric("qwen15_sequences_finished_total", 'reason="abort"')
    # Four long choices: far more work than the moment it takes to read one event and hang up.
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True, "n": 4}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=server.headers()) as r:
        lines = r.iter_lines()  # (an iterator dropped here would close the response: keep it)
        next(lines)
        assert server.metric("qwen15_kv_blocks_used") > 0
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("qwen15_kv_blocks_used") > 0:
        time.sleep(0.05)
    assert server.metric("qwen15_kv_blocks_used") == 0
    assert server.metric("qwen15_sequences_finished_total", 'reason="abort"') == aborted + 4


def test_disconnect_before_a_non_streaming_answer_cancels_and_frees_blocks(server):
    import time

    aborted = server.metric("qwen15_sequences_finished_total", 'reason="abort"')
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 4 x 2000 tokens are ready
        httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers(), timeout=1.0)
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("qwen15_kv_blocks_used") > 0:
        time.sleep(0.05)
    assert server.metric("qwen15_kv_blocks_used") == 0
    assert server.metric("qwen15_sequences_finished_total", 'reason="abort"') == aborted + 4
    assert server.metric("qwen15_requests_total", 'endpoint="/v1/completions",status="499"') >= 1
    # and the server goes on answering
    r = httpx.post(server.base_url + "/v1/completions", headers=server.headers(),
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200


def test_metrics_exposition(server, client):
    client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("qwen15_requests_total", "qwen15_generation_tokens_total", "qwen15_queue_depth",
                 "qwen15_batch_size", "qwen15_kv_blocks_used", "qwen15_kv_blocks_free", "qwen15_engine_step_seconds",
                 "qwen15_time_to_first_token_seconds_bucket", "qwen15_request_latency_seconds_count"):
        assert name in text
    assert server.metric("qwen15_requests_total", 'endpoint="/v1/completions",status="200"') >= 1


def test_json_mode_output_is_a_json_prefix_and_parses_when_finished(client):
    from qwen15.serve.json_mode import JSONScanner

    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and JSONScanner().feed(text)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_tool_call_history_renders_through_the_template(client, llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=3, temperature=0)
    # The server renders what transformers' template would: arguments as an object, then the tool response.
    from qwen15.serve.tools import prepare_messages

    expected = llm.tokenizer.apply_chat_template(prepare_messages(messages), tools=tools)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in expected and "<tool_response>" in expected
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(expected))


def test_echo_with_generation_scores_prompt_and_new_tokens(client, llm):
    prompt = "Paris is the capital of"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=0, temperature=0)
    ids = llm.encode_prompt(prompt)
    gen = llm.generate(prompt, max_tokens=3)
    ref = full_logprobs(llm, ids + gen.token_ids)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + gen.text
    assert len(lp.tokens) == len(ids) + len(gen.token_ids) and lp.token_logprobs[0] is None
    for i, token in enumerate(ids + gen.token_ids):
        if i:
            assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, token]), abs=1e-4)
