"""The batching engine: batched, chunked, paged and prefix-cached output equals plain single-sequence generation."""

import threading

import pytest
import torch

from qwen15 import LLM
from qwen15.engine.sampling import SamplingParams
from qwen15.serve.batch_engine import BatchEngine, Sequence

PROMPTS = ["def fibonacci(n):", "Hello there, how are you doing today? " * 6,
           [{"role": "user", "content": "用一句话介绍一下北京。"}], "x", "import numpy as np\n" * 3]


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def llm(request, tiny_chat_gguf, tmp_path_factory, real_gguf_path):
    """The tiny model with float weights (the PyTorch layers over a padded batch), and with Q8_0 weights
    (compact: steps of up to 64 tokens run through the C layers over the paged pool). The compact one takes
    exact float activations, so that a prompt prefilled in small chunks (the C layers) and in one chunk of
    more than 64 tokens (LLM.generate: dequantize + BLAS) agree up to summation order; the int8-activation
    kernel's rows are checked bit for bit in test_quant.py."""
    if request.param == "f32":
        return LLM.load(tiny_chat_gguf)
    from gguf.constants import GGMLQuantizationType as Q
    from serve_fixtures import write_tiny_chat_gguf

    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("tiny-q8") / "tiny-q8.gguf", real_gguf_path, qtype=Q.Q8_0)
    llm = LLM.load(path, quant="gguf-f32")
    assert BatchEngine(llm.model, llm.tokenizer, context_length=64, kv_tokens=64).native is not None
    return llm


def make_engine(llm, **kw):
    args = dict(context_length=llm.context_length, max_batch=4, token_budget=32, kv_tokens=4096, block_size=16)
    engine = BatchEngine(llm.model, llm.tokenizer, **{**args, **kw})
    engine.start()
    return engine


def run_all(engine, llm, prompts, max_tokens=24, **seq_kw):
    """Submit every prompt at once; return (token ids, text, finish reason, outputs) per prompt."""
    results = [None] * len(prompts)
    events = [threading.Event() for _ in prompts]
    outputs = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        def emit(out, i=i):
            outputs[i].append(out)
            if out.finish_reason:
                events[i].set()
        engine.submit(Sequence(llm.encode_prompt(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, emit,
                               **seq_kw))
    for i, ev in enumerate(events):
        assert ev.wait(120), f"prompt {i} did not finish"
        outs = outputs[i]
        results[i] = ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason, outs)
    return results


@pytest.mark.parametrize("budget,block_size", [(32, 16), (7, 4)], ids=["budget32-block16", "budget7-block4"])
def test_batched_greedy_equals_single_sequence(llm, budget, block_size):
    engine = make_engine(llm, token_budget=budget, block_size=block_size)
    try:
        got = run_all(engine, llm, PROMPTS)
        assert engine.steps < sum(len(r[0]) for r in got)  # rows really shared steps
        assert engine.cache.blocks.used == 0  # every block released when its sequence finished
    finally:
        engine.stop()
    for prompt, (ids, text, reason, _) in zip(PROMPTS, got):
        ref = llm.generate(prompt, max_tokens=24)
        assert ids == ref.token_ids
        assert text == ref.text and reason == ref.finish_reason


def test_prefix_cache_hits_give_identical_output(llm):
    engine = make_engine(llm)
    try:
        system = [{"role": "system", "content": "You are a careful assistant. " * 8}]
        first = run_all(engine, llm, [system + [{"role": "user", "content": "One"}]])
        hits_before = engine.cache.blocks.hits
        second = run_all(engine, llm, [system + [{"role": "user", "content": "Two"}]])
        one, two = (llm.encode_prompt(system + [{"role": "user", "content": c}]) for c in ("One", "Two"))
        shared = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
        assert shared >= 48
        # Every full block of the shared system prompt was reused.
        assert engine.cache.blocks.hits - hits_before == shared // 16
        again = run_all(engine, llm, [system + [{"role": "user", "content": "One"}]])
    finally:
        engine.stop()
    assert again[0][0] == first[0][0]
    ref = llm.generate(system + [{"role": "user", "content": "Two"}], max_tokens=24)
    assert second[0][0] == ref.token_ids


def test_sequences_arriving_together_compute_a_shared_prefix_once(llm):
    # Three choices of one prompt (as `n`: 3 makes) plus an unrelated prompt, all submitted at once: the
    # unrelated one is not held up, and the other two choices reuse the first one's prompt blocks.
    engine = make_engine(llm, token_budget=16)  # the prompt takes several steps: the others must wait
    prompt = [{"role": "user", "content": "Tell me about the sea and the mountains. " * 6}]
    ids = llm.encode_prompt(prompt)
    full_blocks = (len(ids) - 1) // 16
    assert full_blocks >= 3
    try:
        got = run_all(engine, llm, [prompt, prompt, "def f(x):", prompt], max_tokens=8)
        assert engine.cache.blocks.hits == 2 * full_blocks
        assert engine.cache.blocks.used == 0
    finally:
        engine.stop()
    ref = llm.generate(prompt, max_tokens=8).token_ids
    assert got[0][0] == got[1][0] == got[3][0] == ref
    assert got[2][0] == llm.generate("def f(x):", max_tokens=8).token_ids


def test_small_pool_preempts_and_still_matches(llm):
    # 10 blocks of 8 tokens: four sequences of ~60 tokens cannot all fit, so some are preempted and recomputed.
    engine = make_engine(llm, kv_tokens=80, block_size=8, token_budget=16)
    prompts = ["Hello there, how are you doing today? " * 3] * 2 + ["def f(x):\n    return x * 2\n" * 2] * 2
    try:
        got = run_all(engine, llm, prompts, max_tokens=16)
        assert engine.cache.blocks.used == 0
    finally:
        engine.stop()
    for prompt, (ids, *_rest) in zip(prompts, got):
        assert ids == llm.generate(prompt, max_tokens=16).token_ids


def test_echo_prompt_logprobs_match_a_full_forward(llm):
    engine = make_engine(llm, token_budget=8)  # the prompt is scored over several chunks
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = llm.encode_prompt(prompt)
    try:
        (_, _, reason, outs), = run_all(engine, llm, [prompt], max_tokens=0, prompt_logprobs=2)
    finally:
        engine.stop()
    assert reason == "length"
    lp = outs[-1].prompt_logprobs
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0], dim=-1)
    assert lp[0] is None and len(lp) == len(ids)
    for i in range(1, len(ids)):
        assert lp[i].token == ids[i]
        # float32 over two summation orders (the C layers' attention, PyTorch's SDPA): relative to the size
        assert lp[i].logprob == pytest.approx(float(ref[i - 1, ids[i]]), rel=1e-5, abs=1e-4)
        assert [t for t, _ in lp[i].top] == ref[i - 1].topk(2).indices.tolist()


def test_abort_frees_blocks_at_once(llm):
    engine = make_engine(llm)
    try:
        started, finished = threading.Event(), threading.Event()
        reasons = []

        def emit(out):
            started.set()
            if out.finish_reason:
                reasons.append(out.finish_reason)
                finished.set()

        seq_id = engine.submit(Sequence(llm.encode_prompt("Count to a thousand:"),
                                        SamplingParams(max_tokens=1000, ignore_eos=True), 1000, emit))
        assert started.wait(60)
        assert engine.cache.blocks.used > 0
        engine.abort(seq_id)
        assert finished.wait(30)
        assert reasons == ["abort"] and engine.cache.blocks.used == 0
    finally:
        engine.stop()


def test_block_manager_reuses_cached_blocks_then_evicts_least_recently_freed():
    from qwen15.serve.paged_cache import BlockManager, OutOfBlocks, block_hashes

    m = BlockManager(num_blocks=3, block_size=2)
    a_hashes = block_hashes([1, 2, 3, 4], 2)
    a = [m.allocate(), m.allocate()]
    for block, h in zip(a, a_hashes):
        m.register(block, h)
    m.release(a)
    assert m.used == 0 and m.available == 3
    assert m.match_prefix(block_hashes([1, 2, 3, 4, 5, 6], 2)) == a  # both cached blocks, same order
    assert m.match_prefix(block_hashes([9, 9], 2)) == []
    m.release(a)
    # Free blocks go first, then the least recently freed cached one (a[0]); its hash is forgotten.
    taken = [m.allocate(), m.allocate()]
    assert a[0] in taken and a[1] not in taken
    assert m.match_prefix(a_hashes) == []  # the chain starts at the evicted block
    assert m.match_prefix(a_hashes[1:]) == [a[1]]
    with pytest.raises(OutOfBlocks):
        m.allocate()
