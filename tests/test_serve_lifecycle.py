"""Server limits and shutdown: a full queue answers 429; SIGTERM lets in-flight streams finish, then exits 0."""

import json
import signal
import time

import httpx
import pytest

from serve_fixtures import ServerProcess


@pytest.fixture(scope="module")
def one_slot_server(tiny_chat_gguf):  # shared: the SIGTERM test, last, ends it
    # One running sequence, one waiting: the third concurrent request has no room.
    srv = ServerProcess(tiny_chat_gguf, "--max-batch", "1", "--max-queue", "1", api_key=None)
    yield srv
    srv.stop()


def long_stream(srv, tokens=400):
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    return httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120)


def wait_for(predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_answers_429_and_others_are_served(one_slot_server):
    srv = one_slot_server
    health = lambda: httpx.get(srv.base_url + "/health").json()  # noqa: E731
    with long_stream(srv) as running:
        lines = running.iter_lines()
        next(lines)
        assert health()["running"] == 1
        with long_stream(srv, tokens=5) as queued:
            assert wait_for(lambda: health()["waiting"] == 1)
            r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
            queued_lines = [line for line in queued.iter_lines() if line]
        assert queued_lines[-1] == "data: [DONE]"  # the waiting request got its turn
        assert sum(1 for line in lines if line) > 0
    assert srv.metric("qwen15_requests_total", 'endpoint="/v1/completions",status="429"') == 1


def test_sigterm_drains_in_flight_streams_then_exits(one_slot_server):
    srv = one_slot_server
    with long_stream(srv, tokens=300) as r:
        lines = r.iter_lines()
        first = next(lines)
        srv.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    events = [json.loads(line[6:]) for line in [first] + rest[:-1]]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # all 300 tokens, not cut off
    assert srv.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base_url + "/health", timeout=2)
