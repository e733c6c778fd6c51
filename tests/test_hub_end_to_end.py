"""The hub path end to end, offline: `--model Qwen/Qwen1.5-0.5B-Chat` resolves through huggingface_hub to a
local cache laid out exactly like a hub snapshot, loads safetensors + tokenizer.json, and generates the
same greedy tokens as transformers on the same files."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

REPO = "Qwen/Qwen1.5-0.5B-Chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, real_gguf_path):
    """A HF hub cache holding a tiny random Qwen2 under Qwen/Qwen1.5-0.5B-Chat, with the real tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf_cache")
    snapshot = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=151645, bos_token_id=151643)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.1)
    model.save_pretrained(snapshot, max_shard_size="20MB")  # sharded, with an index
    AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name).save_pretrained(snapshot)
    return root, snapshot, model


def test_hub_name_loads_and_matches_transformers(hub_cache, monkeypatch):
    from qwen15 import LLM

    root, snapshot, model = hub_cache
    assert (snapshot / "model.safetensors.index.json").is_file()
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads these variables when first imported (transformers already did): set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    llm = LLM.load(REPO)
    prompt = [{"role": "user", "content": "Hello there"}]
    ids = llm.encode_prompt(prompt)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  eos_token_id=[151645, 151643], pad_token_id=151643)[0, len(ids):].tolist()
    got = llm.generate(prompt, max_tokens=12, temperature=0.0)
    assert got.token_ids == [t for t in expected if t not in (151645, 151643)]


def test_cli_generate_from_hub_name(hub_cache):
    root, _, _ = hub_cache
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "generate", "--model", REPO, "--prompt", "Hi",
                          "--max-tokens", "4", "--temperature", "0", "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]) <= 4


def test_hub_name_missing_offline_is_one_line_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "generate", "--model", "Qwen/Qwen1.5-7B-Chat",
                          "--prompt", "Hi"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Qwen/Qwen1.5-7B-Chat" in lines[0] and "local directory" in lines[0]


def test_int8_on_load_is_compact_and_close_to_transformers(hub_cache):
    """--quant int8 on an HF checkpoint: every matrix becomes group-wise int8 (the kernels' layout) and
    the logits stay close to transformers' on the dense weights."""
    from qwen15 import LLM
    from qwen15.quant.modules import QuantEmbedding, QuantLinear

    _, snapshot, model = hub_cache
    llm = LLM.load(snapshot, quant="int8")
    assert isinstance(llm.model.model.embed_tokens, QuantEmbedding)
    assert isinstance(llm.model.model.layers[0].self_attn.qkv_proj, QuantLinear)
    ids = torch.tensor([[9707, 1879, 11, 1246, 525, 498, 30]])
    with torch.no_grad():
        ref = model(ids).logits
        dense = LLM.load(snapshot, quant="none").model(ids)
        got = llm.model(ids)
    assert float((dense - ref).abs().max()) < 1e-3  # the dense path is transformers' to fp32 rounding
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert float((got - ref).abs().max()) > 0 and float(cos) > 0.999
    with pytest.raises(Exception, match="int8 runs on the CPU"):
        LLM.load(snapshot, quant="int8", dtype=torch.bfloat16)
