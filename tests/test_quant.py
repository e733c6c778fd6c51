"""Block-int8 weights (qwen15.quant): lossless conversion from GGUF types, the C kernel, the compact model.

The reference is the `gguf` package (llama.cpp's own numpy dequantizers) and float64 matmuls."""

import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from gguf_fixtures import K_QUANTS, _random_k_blocks, random_state_dict, tiny_config, write_tiny_gguf
from qwen15.quant import native
from qwen15.quant.blocks import CONVERTIBLE, BlockInt8, dequantize, from_gguf
from qwen15.quant.modules import QuantEmbedding, QuantLinear, is_quantized

SIMPLE = (Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q5_1, Q.Q4_1)


def _raw(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_QUANTS:
        block, _ = GGML_QUANT_SIZES[qtype]
        return _random_k_blocks(rows * cols // block, qtype, rng).reshape(rows, -1)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, size=(rows, 1))).astype(np.float32)
    return gguf_quantize(x, qtype)


@pytest.mark.parametrize("qtype", CONVERTIBLE, ids=lambda t: t.name)
def test_conversion_is_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = _raw(qtype, 24, 512, rng)
    w = from_gguf(raw, qtype, (24, 512))
    assert w is not None and w.q.dtype == torch.int8 and w.scale.dtype == torch.float32
    assert w.q.shape == (24, 512) and w.scale.shape == (24, 512 // w.block)
    assert (w.offset is not None) == (qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K))
    ref = gguf_dequantize(raw, qtype)
    got = dequantize(w).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))  # bit for bit, signed zeros too


@pytest.mark.parametrize("qtype", CONVERTIBLE, ids=lambda t: t.name)
def test_integer_ranges(qtype):
    """The int8 values stay in the type's range: the layout is int8 + scale, not a rounding of floats."""
    w = from_gguf(_raw(qtype, 8, 256, np.random.default_rng(1)), qtype, (8, 256))
    lo, hi = {Q.Q8_0: (-128, 127), Q.Q5_0: (-16, 15), Q.Q4_0: (-8, 7), Q.Q5_1: (0, 31), Q.Q4_1: (0, 15),
              Q.Q4_K: (0, 15), Q.Q5_K: (0, 31), Q.Q6_K: (-32, 31)}[qtype]
    assert int(w.q.min()) >= lo and int(w.q.max()) <= hi


def test_unconverted_types_return_none():
    rng = np.random.default_rng(0)
    assert from_gguf(np.zeros((4, 64), np.float32), Q.F32, (4, 64)) is None
    assert from_gguf(_random_k_blocks(4, Q.Q3_K, rng), Q.Q3_K, (4, 256)) is None
    assert from_gguf(_raw(Q.Q8_0, 2 * 4, 64, rng), Q.Q8_0, (2, 4, 64)) is None  # 3-D (stacked experts)


def _random_blocks(O: int, K: int, block: int, offset: bool, seed: int = 0) -> BlockInt8:
    g = torch.Generator().manual_seed(seed)
    return BlockInt8(q=torch.randint(-128, 128, (O, K), dtype=torch.int8, generator=g),
                     scale=torch.rand(O, K // block, generator=g) * 1e-2,
                     offset=torch.randn(O, K // block, generator=g) * 1e-2 if offset else None, block=block)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def lib():
    lib = native.load_library()
    if lib is None:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    return lib


@pytest.mark.parametrize("offset", [False, True], ids=["scale", "scale+offset"])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("K", [96, 256, 896, 1024])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_native_kernel_matches_float64(lib, M, K, block, offset):
    w = _random_blocks(40, K, block, offset, seed=M * K + block)
    x = torch.randn(M, K)
    ref = x.double() @ dequantize(w).double().T
    assert _rel_err(native.matmul_native(x, w), ref) < 1e-5
    assert _rel_err(native.matmul_torch(x, w), ref) < 1e-5  # the PyTorch fallback agrees too


def test_fallback_without_library(monkeypatch):
    """When the kernel cannot be loaded, matmul still works (dequantize + F.linear)."""
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    w = _random_blocks(24, 64, 32, True)
    x = torch.randn(2, 64)
    assert _rel_err(native.matmul(x, w), x.double() @ dequantize(w).double().T) < 1e-5


def test_kernel_build_is_cached_and_named_by_source(lib):
    path = native.library_path()
    assert path.exists() and path.name.startswith("blockint8-") and path.suffix == ".so"
    assert path.parent.name == "kernels"


@torch.inference_mode()
def test_quant_modules_match_dense():
    w = _random_blocks(48, 64, 32, True)
    bias = torch.nn.Parameter(torch.randn(48))
    lin = QuantLinear(w, bias)
    x = torch.randn(2, 5, 64)
    ref = torch.nn.functional.linear(x.double(), dequantize(w).double(), bias.double())
    assert _rel_err(lin(x), ref) < 1e-5  # 10 rows: native kernel
    x = torch.randn(3, 11, 64)
    ref = torch.nn.functional.linear(x.double(), dequantize(w).double(), bias.double())
    assert _rel_err(lin(x), ref) < 1e-5  # 33 rows: dequantize + BLAS
    emb = QuantEmbedding(w)
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(emb(ids), dequantize(w)[ids])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_tiny_gguf_compact_model_matches_dequantized(tmp_path, qtype, tied):
    from qwen15.model import build_model
    from qwen15.weights.gguf import load_gguf

    config = tiny_config(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, random_state_dict(config), qtype)
    _, dense_state, _ = load_gguf(path)
    _, compact_state, _ = load_gguf(path, keep_quantized=True)
    assert any(isinstance(v, BlockInt8) for v in compact_state.values())
    for name, v in compact_state.items():
        if isinstance(v, BlockInt8):
            assert torch.equal(dequantize(v), dense_state[name]), name
    dense, compact = build_model(config, dense_state), build_model(config, compact_state)
    assert is_quantized(compact) and not is_quantized(dense)
    assert isinstance(compact.model.embed_tokens, QuantEmbedding)
    assert isinstance(compact.model.layers[0].self_attn.q_proj, QuantLinear)
    assert compact.model.layers[0].self_attn.q_proj.bias is not None
    assert (compact.lm_head is None) == tied
    ids = torch.randint(0, config.vocab_size, (1, 7))
    with torch.inference_mode():
        for sl in (ids, ids[:, :1]):  # prefill path (dequantize + BLAS) and decode path (kernel)
            a, b = dense(sl), compact(sl)
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5


# ---- the real 0.5B Q4_K_M file -------------------------------------------------------------------

_TEXT = (
    "Python is a high-level, general-purpose programming language. Its design philosophy emphasizes code "
    "readability with the use of significant indentation. Python is dynamically typed and garbage-collected. "
    "It supports multiple programming paradigms, including structured, object-oriented and functional "
    "programming. It is often described as a batteries included language due to its comprehensive standard "
    "library.\n\n"
    "def merge_sort(items):\n"
    "    if len(items) <= 1:\n"
    "        return items\n"
    "    mid = len(items) // 2\n"
    "    left = merge_sort(items[:mid])\n"
    "    right = merge_sort(items[mid:])\n"
    "    merged = []\n"
    "    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            merged.append(left[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            merged.append(right[j])\n"
    "            j += 1\n"
    "    return merged + left[i:] + right[j:]\n\n"
    "Guido van Rossum began working on Python in the late 1980s as a successor to the ABC programming "
    "language and first released it in 1991. Python 2.0 was released in 2000. Python 3.0, released in 2008, "
    "was a major revision not completely backward-compatible with earlier versions.\n"
)


@pytest.fixture(scope="module")
def real_pair(real_gguf_path):
    from qwen15 import LLM

    return LLM.load(real_gguf_path, quant="gguf"), LLM.load(real_gguf_path, quant="none")


@pytest.mark.real_model
def test_real_file_every_tensor_converts_or_is_dense(real_gguf_path):
    from qwen15.weights.gguf import open_gguf

    f = open_gguf(real_gguf_path)
    kinds = {}
    for t in f.tensors:
        if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            kinds[t.name] = "dense"
            continue
        w = from_gguf(t.data, t.tensor_type, t.torch_shape)
        assert w is not None, f"{t.name} ({t.tensor_type.name}) neither converts nor is dense"
        kinds[t.name] = "blocks"
    assert kinds["token_embd.weight"] == "blocks" and kinds["blk.0.ffn_down.weight"] == "blocks"


@pytest.mark.real_model
def test_real_compact_model_logits_and_greedy_match(real_pair):
    compact, dense = real_pair
    assert is_quantized(compact.model) and not is_quantized(dense.model)
    ids = compact.tokenizer.encode("def fibonacci(n):")
    with torch.inference_mode():
        a = dense.model(torch.tensor([ids]))
        b = compact.model(torch.tensor([ids]))
        assert float((a - b).abs().max()) < 1e-3 * float(a.abs().max())
        # and one decode step through the kernel (M = 1)
        a1 = dense.model(torch.tensor([ids[:1]]))
        b1 = compact.model(torch.tensor([ids[:1]]))
        assert float((a1 - b1).abs().max()) < 1e-3 * float(a1.abs().max())
    ga = dense.generate("def fibonacci(n):", max_tokens=32, temperature=0.0, ignore_eos=True).token_ids
    gb = compact.generate("def fibonacci(n):", max_tokens=32, temperature=0.0, ignore_eos=True).token_ids
    assert gb == ga and len(ga) == 32


def _perplexity(llm, ids: list[int], chunk: int) -> float:
    """Next-token perplexity, fed `chunk` tokens per forward through a KV cache."""
    from qwen15.engine.kv_cache import KVCache

    cache = KVCache(llm.config, len(ids), dtype=torch.float32, device="cpu")
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, chunk):
            piece = ids[s:min(s + chunk, len(ids) - 1)]
            logits = llm.model(torch.tensor([piece]), cache=cache, start_pos=s)[0].double()
            target = torch.tensor(ids[s + 1:s + 1 + len(piece)])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += len(piece)
    return math.exp(nll / n)


@pytest.mark.real_model
def test_real_compact_perplexity_within_half_percent(real_pair):
    compact, dense = real_pair
    ids = compact.tokenizer.encode(_TEXT)
    assert len(ids) > 250
    ref = _perplexity(dense, ids, chunk=len(ids))
    # 8-token chunks: every matmul goes through the native kernel (M <= 16), not the BLAS path.
    got = _perplexity(compact, ids, chunk=8)
    assert 1.0 < ref < 20.0
    assert abs(got - ref) / ref < 0.005, (got, ref)
