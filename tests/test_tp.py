"""Tensor parallelism on gloo (CPU): the sharded model against the same model in one process.

The real 0.5B (14 query / 2 kv heads, fp32) is loaded once; its TP copies are sharded from it in this
process (rank 0) with the followers spawned beside it, so each degree costs one spawn, not one load.
"""

import copy

import pytest
import torch

from qwen15.engine.engine import LLM, shard_model
from qwen15.engine.kv_cache import KVCache
from qwen15.parallel import tp as tp_plan

NEW_TOKENS = 32
PROMPTS = {
    "raw": "def fibonacci(n):",
    "english": [{"role": "user", "content": "Write a haiku about the sea."}],
    "chinese": [{"role": "user", "content": "用一句话介绍一下北京。"}],
}


@pytest.fixture(scope="module")
def single(real_gguf_path):
    llm = LLM.load(real_gguf_path, quant="none")
    expected = {name: llm.generate(p, max_tokens=NEW_TOKENS, temperature=0.0).token_ids for name, p in PROMPTS.items()}
    return llm, expected


def last_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        cache = KVCache(llm.config, len(ids))
        return llm.model(torch.tensor([ids]), cache=cache, start_pos=0, last_only=True)[0, -1]


@pytest.mark.real_model
@pytest.mark.parametrize("world", [2, 4])
def test_real_model_tp_matches_single_process(single, world):
    llm, expected = single
    net = shard_model(copy.deepcopy(llm.model), world, "cpu", torch.float32)
    tp = LLM(net, llm.tokenizer, name="tp")
    try:
        shard = tp_plan.plan(llm.config, world)[0]
        # rank 0's own shard: its heads and kv heads only (kv replicated when world exceeds the 2 kv heads)
        assert tp.config.num_key_value_heads == shard.kv_heads[1] - shard.kv_heads[0] == (1 if world >= 2 else 2)
        assert tp.config.num_attention_heads == {2: 7, 4: 3}[world]  # 7 heads per kv head: 3 + 4 at N = 4
        ids = llm.encode_prompt(PROMPTS["raw"])
        torch.testing.assert_close(last_logits(tp, ids), last_logits(llm, ids), rtol=0, atol=1e-4)
        for name, prompt in PROMPTS.items():
            got = tp.generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0).token_ids
            assert len(got) == len(expected[name]) > 0
            assert got == expected[name], name
    finally:
        net.tp.close()


# ---- the command line, on the tiny random model (tests/serve_fixtures.py) -------------------------------

def run_cli(*args: str, launcher: tuple[str, ...] = (), env: dict | None = None, **kw):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import qwen15

    src = str(Path(qwen15.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, *(launcher or ("-m",)), "qwen15", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_expected(tiny_chat_gguf):
    llm = LLM.load(tiny_chat_gguf, quant="none")
    return llm.generate("The sea", max_tokens=12, temperature=0.0).token_ids


@pytest.mark.parametrize("launcher", ["--tp", "torchrun"])
def test_cli_tp_prints_once_and_matches_single_process(tiny_chat_gguf, tiny_expected, launcher):
    import json

    args = ["generate", "--model", str(tiny_chat_gguf), "--quant", "none", "--prompt", "The sea",
            "--max-tokens", "12", "--json"]
    if launcher == "--tp":
        p = run_cli(*args, "--tp", "2")
    else:  # torchrun's own launcher: every rank runs `python -m qwen15 ...`, rank 0 drives
        p = run_cli(*args, launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"),
                    env={"OMP_NUM_THREADS": "1"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # ranks other than 0 print nothing
    assert json.loads(lines[0])["token_ids"] == tiny_expected


def test_cli_tp_bad_degree_names_the_valid_ones(tiny_chat_gguf):
    p = run_cli("generate", "--model", str(tiny_chat_gguf), "--quant", "none", "--prompt", "x", "--tp", "3")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err.strip() == "qwen15: error: --tp 3 does not split 4 query / 2 kv heads: expected one of 1, 2, 4"
    p = run_cli("generate", "--model", str(tiny_chat_gguf), "--prompt", "x", "--tp", "2")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err.strip() == "qwen15: error: --tp 2 shards dense weights: add --quant none (got --quant gguf)"


def _children(pid: int) -> list[int]:
    import os

    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d))
    return kids


@pytest.mark.parametrize("how", ["killed", "stopped", "ctrl-c"])
def test_a_dead_rank_ends_all_ranks_with_one_message(tiny_chat_gguf, how):
    """Rank 1 killed mid-generation (its rank 0 sees it go), or stopped (alive, silent: the collective
    timeout ends it), or Ctrl-C at the terminal (SIGINT to every process of the foreground group): every
    rank ends, with one line on stderr, never a hang."""
    import os
    import signal
    import time

    # Ctrl-C as at a terminal: SIGINT at its default in rank 0. A suite started in the background by a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and so would rank 0 (which then, rightly,
    # keeps running: this test hung there twice before the reset).
    p = run_cli("generate", "--model", str(tiny_chat_gguf), "--quant", "none", "--prompt", "hello",
                "--max-tokens", "2000", "--tp", "2", env={"QWEN15_TP_TIMEOUT": "3"}, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.read(8), p.stderr.read()  # generating (2047 tokens to go)
        followers = _children(p.pid)
        assert len(followers) == 1
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(followers[0], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        out, err = p.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        p.kill()
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1, err
    if how == "killed":
        assert p.returncode == 1
        assert errors[0] == "qwen15: error: tensor-parallel rank 1 died (killed by SIGKILL): stopped all 2 ranks"
        assert took < 3
    elif how == "ctrl-c":
        assert p.returncode == 130
        assert errors[0] == "qwen15: interrupted: stopped all 2 ranks"
    else:
        assert p.returncode == 2
        assert errors[0].startswith("qwen15: error: tensor parallelism: a collective failed on rank 0 (")
        assert errors[0].endswith("a rank died or did not answer within 3s; stopped all 2 ranks")
        assert took < 3 + 10
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{followers[0]}") or open(f"/proc/{followers[0]}/stat").read().split()[2] == "Z"


# ---- the server: rank 0 schedules, every step's batch goes to rank 1 ----------------------------------

def test_serve_tp_matches_the_single_process_server(tiny_chat_gguf):
    from concurrent.futures import ThreadPoolExecutor

    from serve_fixtures import ServerProcess

    args = ("--quant", "none", "--max-batch", "8", "--token-budget", "64", "--kv-tokens", "4096")
    tp, single = ServerProcess(tiny_chat_gguf, *args, "--tp", "2"), ServerProcess(tiny_chat_gguf, *args)
    try:
        a, b = tp.client(), single.client()
        chat = [{"role": "user", "content": "Write a haiku about the sea."}]
        r = a.chat.completions.create(model="tiny", messages=chat, max_tokens=16, temperature=0)
        ref = b.chat.completions.create(model="tiny", messages=chat, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == ref.choices[0].message.content
        assert r.usage.completion_tokens == ref.usage.completion_tokens > 0
        chunks = list(a.chat.completions.create(model="tiny", messages=chat, max_tokens=16, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.choices[0].message.content
        r = a.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0)
        ref = b.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0)
        assert r.choices[0].text == ref.choices[0].text

        prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

        def batch(client):  # 8 concurrent greedy requests: they share steps of the batched engine
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda p: client.completions.create(
                    model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text, prompts))

        assert batch(a) == batch(b)
        assert tp.output().count(" on http://") == 1  # one banner: the follower prints nothing
    finally:
        assert tp.stop() == 0  # SIGTERM: rank 0 drains, then stops its follower cleanly
        single.stop()


# ---- qwen15 plan --tp -----------------------------------------------------------------------------------

def test_plan_per_rank_bytes_equal_an_allocated_shard(tmp_path):
    import json

    from qwen15.config import ModelConfig
    from qwen15.model import build_model
    from qwen15.plan import GiB, _activation_bytes, make_plan

    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    p = make_plan(str(tmp_path), quant="bf16", context=100, device="cpu", tp=4)
    state = build_model(config, dtype=torch.bfloat16).state_dict()
    ranks = []
    for shard in tp_plan.plan(config, 4):  # query heads 1, 2, 1, 2 (each kv head on two ranks)
        local = tp_plan.local_config(config, shard)
        weights = sum(t.nbytes for t in tp_plan.shard_state(state, config, shard).values())
        cache = KVCache(local, max_len=100, dtype=torch.float32)
        ranks.append(weights + cache.k.nbytes + cache.v.nbytes + _activation_bytes(local, 100, 1, 4) + p.overhead_bytes)
    assert max(ranks) == p.per_rank_bytes and min(ranks) < max(ranks)
    assert p.tp == p.devices_needed == 4
    auto = make_plan("qwen1.5-110b", context=32768, gpu_mem_gb=80, tp="auto")
    assert (auto.tp, auto.quant) == (4, "bf16")  # 2 ranks would need ~110 GiB each; 3 does not split 8 kv heads
    assert auto.per_rank_bytes <= 80 * GiB * 0.92 < make_plan("qwen1.5-110b", context=32768, tp=2).per_rank_bytes


def test_random_weights_build_a_preset_at_its_real_shape():
    """`qwen15 bench --model qwen1.5-32b --random-weights` builds this; on the meta device it costs nothing here."""
    from qwen15.config import get_preset
    from qwen15.engine.bench import random_model

    model = random_model("qwen1.5-32b", "meta", torch.bfloat16)
    config = get_preset("qwen1.5-32b")
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    attn = model.model.layers[0].self_attn
    assert (len(model.model.layers), attn.heads, attn.kv_heads) == (64, 40, 8)
