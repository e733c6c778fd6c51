"""Backends against independent references: the model's own full-forward log_softmax, and an
OpenAI-style server (echo + logprobs) built here on the same model."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from qwen15.config import ModelConfig
from qwen15.eval.backends import BackendError, EndpointBackend, EngineBackend, GenParams
from qwen15.model import build_model

pytestmark = pytest.mark.real_model  # the real tokenizer, with a tiny random model behind it


@pytest.fixture(scope="module")
def llm(real_gguf_path):
    from qwen15 import LLM

    real = LLM.load(real_gguf_path)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=real.config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LLM(build_model(cfg), real.tokenizer, name="tiny-random")


def reference_logprobs(llm, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward over the whole sequence, no cache."""
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0], -1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " a city on the Seine."),
         ("The capital of Germany is", " Berlin"), ("def add(a, b):\n", "    return a + b\n"),
         ("The capital of France is", " Paris")]


def test_loglikelihood_equals_full_forward(llm):
    backend = EngineBackend(llm)
    got = backend.loglikelihood(PAIRS)  # in this order the cache prefix is reused, cut short, and rebuilt
    for (ctx, cont), value in zip(PAIRS, got):
        c, t = llm.tokenizer.encode(ctx), llm.tokenizer.encode(cont)
        expected = sum(reference_logprobs(llm, c + t)[len(c) - 1:])
        assert value == pytest.approx(expected, abs=1e-3)
    assert got[0] == pytest.approx(got[-1], abs=1e-4)


def test_letter_logprobs_equal_softmax_over_letter_tokens(llm):
    backend = EngineBackend(llm)
    ctx = "Question: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    got = backend.letter_logprobs(ctx, list("ABCD"))
    ids = llm.tokenizer.encode(ctx)
    with torch.no_grad():
        last = llm.model(torch.tensor([ids])).float()[0, -1]
    letters = [llm.tokenizer.encode(f" {x}")[0] for x in "ABCD"]
    expected = torch.log_softmax(last[letters].double(), 0).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    assert sum(torch.tensor(got).exp().tolist()) == pytest.approx(1.0)


class FakeOpenAI:
    """/v1/models, /v1/completions (echo + logprobs from the model; or fixed text), /v1/chat/completions."""

    def __init__(self, llm, reply="The answer is 4.\n\nQuestion: next"):
        self.llm, self.reply, self.bodies = llm, reply, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append((self.path, body))
                if self.path.endswith("/chat/completions"):
                    self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": fake.reply}}]})
                elif body.get("echo"):
                    self._send({"choices": [{"index": 0, "text": body["prompt"],
                                             "logprobs": fake.echo(body["prompt"], body.get("logprobs") or 0)}]})
                else:
                    self._send({"choices": [{"index": 0, "text": fake.reply}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def echo(self, prompt, k=0):
        """OpenAI's legacy echo shape; top_logprobs: the k most likely tokens at each position (as text)."""
        tok = self.llm.tokenizer
        ids = tok.encode(prompt)
        offsets = [len(tok.decode(ids[:i])) for i in range(len(ids))]
        top = None
        if k > 1:
            with torch.no_grad():
                logp = torch.log_softmax(self.llm.model(torch.tensor([ids])).float()[0], -1)
            best = [logp[i - 1].topk(k) for i in range(1, len(ids))]
            top = [None] + [{tok.decode([t]): float(v) for t, v in zip(b.indices.tolist(), b.values.tolist())}
                            for b in best]
        return {"tokens": [tok.decode([i]) for i in ids], "token_logprobs": [None] + reference_logprobs(self.llm, ids),
                "text_offset": offsets, "top_logprobs": top}


@pytest.fixture()
def fake(llm):
    server = FakeOpenAI(llm)
    yield server
    server.server.shutdown()


def test_endpoint_multiple_choice_matches_engine(llm, fake):
    engine, endpoint = EngineBackend(llm), EndpointBackend(fake.url)
    assert endpoint.model == "fake-model"
    ctx = "Question: Which is a colour?\nA. dog\nB. red\nC. seven\nD. run\nAnswer:"
    assert endpoint.letter_logprobs(ctx, list("ABCD")) == pytest.approx(engine.letter_logprobs(ctx, list("ABCD")), abs=1e-3)
    assert endpoint.loglikelihood(PAIRS[:2]) == pytest.approx(engine.loglikelihood(PAIRS[:2]), abs=1e-3)
    path, body = fake.bodies[-1]
    assert path == "/v1/completions" and body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 1


def test_endpoint_letters_come_from_one_request_when_they_are_in_the_top_logprobs(llm, fake):
    engine = EngineBackend(llm)
    ctx = "Question: Which is a colour?\nA. dog\nB. red\nC. seven\nD. run\nAnswer:"
    expected = engine.letter_logprobs(ctx, list("ABCD"))
    endpoint = EndpointBackend(fake.url, model="m")
    endpoint.top_logprobs = llm.config.vocab_size  # this fake returns any k: every letter is in the top
    assert endpoint.letter_logprobs(ctx, list("ABCD")) == pytest.approx(expected, abs=1e-3)
    assert len(fake.bodies) == 1 and fake.bodies[0][1]["prompt"] == ctx + " A"
    # letters outside the top k: the long way, one request per letter, same numbers
    fake.bodies.clear()
    endpoint.top_logprobs = 2
    assert endpoint.letter_logprobs(ctx, list("ABCD")) == pytest.approx(expected, abs=1e-3)
    assert len(fake.bodies) == 1 + 4


def test_endpoint_generation_applies_stop_strings(fake):
    endpoint = EndpointBackend(fake.url + "/v1", model="m")
    text = endpoint.generate("Question: 2+2?\n", GenParams(max_tokens=64, stop=["\n\n", "Question:"], seed=3))
    assert text == "The answer is 4."
    path, body = fake.bodies[-1]
    assert path == "/v1/completions" and body["max_tokens"] == 64 and body["temperature"] == 0.0 and body["seed"] == 3
    text = endpoint.generate([{"role": "user", "content": "hi"}], GenParams(stop=["\n\n"]))
    assert text == "The answer is 4." and fake.bodies[-1][0] == "/v1/chat/completions"


def test_endpoint_unreachable_is_one_line_error():
    with pytest.raises(BackendError, match="cannot reach the endpoint") as e:
        EndpointBackend("http://127.0.0.1:9", model="m").generate("x", GenParams())
    assert "\n" not in str(e.value)


def test_greedy_generation_on_shared_cache_equals_engine_generate(llm):
    backend = EngineBackend(llm)
    shots = "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+3?\nAnswer: 5\n\n"
    prompts = [shots + "Question: 4+4?\nAnswer:", shots + "Question: 7+1?\nAnswer:", "def f(x):", shots + "Q"]
    for prompt in prompts:  # consecutive prompts share the exemplars: the cache prefix is reused
        for stop in ([], ["e"]):
            got = backend.generate(prompt, GenParams(max_tokens=12, stop=stop))
            expected = llm.generate(prompt, max_tokens=12, temperature=0.0, stop=stop).text
            assert got == expected


def test_long_requests_are_chunked_like_the_engine(llm, monkeypatch):
    import qwen15.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)  # many chunks even for a short text
    backend = EngineBackend(llm)
    ctx, cont = "The quick brown fox jumps over the lazy dog. " * 3, " And then it sleeps."
    got = backend.loglikelihood([(ctx, cont)])[0]
    c, t = llm.tokenizer.encode(ctx.rstrip(" ")), llm.tokenizer.encode(" " + cont)
    assert got == pytest.approx(sum(reference_logprobs(llm, c + t)[len(c) - 1:]), abs=1e-3)
