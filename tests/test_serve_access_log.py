"""`qwen15 serve` at its default log level: one access line per request, a line when it stops (issue 16)."""

import re
import time

import pytest

from serve_fixtures import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_chat_gguf):
    srv = ServerProcess(tiny_chat_gguf, "--kv-tokens", "2048")
    yield srv
    srv.stop()


def test_required_tool_choice_without_a_named_tool_is_a_400(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="required"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                tools=[{"type": "function", "function": {}}], tool_choice="required")


def test_access_lines_and_stop_line(server):  # last: it stops the server
    try:
        client = server.client()
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        stream = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=3, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = sum(1 for c in stream if c.choices and c.choices[0].text)
        import openai

        try:
            client.models.retrieve("x")  # a 404 is logged too
        except openai.NotFoundError:
            pass
        deadline = time.time() + 10
        while time.time() < deadline and "POST /v1/completions 200" not in server.output():
            time.sleep(0.1)  # a stream's line is written once its last chunk is sent
    finally:
        status = server.stop()
    out = open(server.log.name).read()  # stop() closed the log: read the whole file, the stop line included
    assert status == 0, out
    chat = re.search(r"qwen15 serve: 127\.0\.0\.1 POST /v1/chat/completions 200 prompt=(\d+) completion=(\d+) "
                     r"(\d+\.\d+)s", out)
    assert chat, out
    assert int(chat.group(1)) == r.usage.prompt_tokens and int(chat.group(2)) == r.usage.completion_tokens == 5
    comp = re.search(r"POST /v1/completions 200 prompt=\d+ completion=(\d+) ", out)
    assert comp and int(comp.group(1)) == 3 and streamed >= 1, out
    assert re.search(r"GET /v1/models/x 404 \d", out), out
    stopped = re.search(r"qwen15 serve: stopped after \d+s, (\d+) requests served", out)
    access = re.findall(r"qwen15 serve: 127\.0\.0\.1 (GET|POST) ", out)  # the readiness polls of /health too
    assert stopped and int(stopped.group(1)) == len(access) >= 3, out
