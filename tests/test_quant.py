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
from qwen15.quant.blocks import CONVERTIBLE, PACKED, BlockInt8, concat_packed, dequantize, from_gguf, packed_from_gguf
from qwen15.quant.modules import QuantEmbedding, QuantLinear, concat_rows, is_quantized, set_activations

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


@pytest.mark.parametrize("offset", [False, True], ids=["scale", "scale+offset"])
@pytest.mark.parametrize("panel_rows", [7, 40, 1000], ids=["ragged-panels", "one-panel", "more-than-O"])
def test_prefill_panels_match_float64(lib, monkeypatch, panel_rows, offset):
    """Large-M matmuls dequantize W a panel of rows at a time (C) and multiply each with BLAS."""
    K = 256
    monkeypatch.setattr(native, "PANEL_BYTES", panel_rows * 4 * K)
    w = _random_blocks(40, K, 16, offset, seed=panel_rows)
    x = torch.randn(100, K)
    ref = x.double() @ dequantize(w).double().T
    y = native.matmul_panels(x, w)
    assert y.shape == (100, 40) and y.is_contiguous()
    assert _rel_err(y, ref) < 1e-5
    # the C dequantizer gives the same float weights as the PyTorch one (gguf's numbers, tested above)
    out = torch.empty(40, K)
    lib.blockint8_dequantize(w.q.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr() if offset else None,
                             16, 40, K, out.data_ptr(), 2)
    assert torch.equal(out, dequantize(w))
    assert native.matmul(x, w).equal(y)  # M > NATIVE_MAX_ROWS goes this way


def _q8_reference(x: torch.Tensor, w: BlockInt8) -> torch.Tensor:
    """The q8 kernel's math in float64: activations rounded to int8 per block of 32 (the rounding comes
    from native.quantize_activations, itself checked against the C rounding below)."""
    M, K = x.shape
    xq, dx = native.quantize_activations(x)
    xr = xq.double().view(M, K // 32, 32) * dx.double()[..., None]
    y = xr.view(M, K) @ dequantize(BlockInt8(w.q, w.scale, None, w.block)).double().T
    if w.offset is not None:
        y = y + native.block_sums(x.double(), w.block) @ w.offset.double().T
    return y


@pytest.mark.parametrize("offset", [False, True], ids=["scale", "scale+offset"])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("K", [96, 256, 896])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_q8_kernel_matches_its_float64_reference(lib, M, K, block, offset):
    w = _random_blocks(40, K, block, offset, seed=M * K + block + 7)
    x = torch.randn(M, K) * torch.rand(M, 1) * 3
    ref = _q8_reference(x, w)
    assert _rel_err(native.matmul_q8_native(x, w), ref) < 1e-5
    assert _rel_err(native.matmul_q8_torch(x, w), ref) < 1e-5
    # and rounding activations to int8 per 32 costs well under 2% against the exact product
    assert _rel_err(native.matmul_q8_native(x, w), x.double() @ dequantize(w).double().T) < 2e-2


def test_q8_activation_rounding_matches_the_c_code(lib):
    import ctypes

    x = torch.randn(5, 256) * 4
    x[1, :32] = 0  # an all-zero block: dx = 0, xq = 0
    x[2, 40] = 1e-30  # tiny values round to zero, not to NaN
    xq_c = torch.empty(5, 256, dtype=torch.int8)
    dx_c = torch.empty(5, 8)
    lib.blockint8_quantize_rows(x.data_ptr(), 5, 256, xq_c.data_ptr(), dx_c.data_ptr())
    xq, dx = native.quantize_activations(x)
    assert torch.equal(dx, dx_c) and int((xq.int() - xq_c.int()).abs().max()) <= 1
    assert int((xq != xq_c).sum()) <= 2  # only exact .5 ties may round differently
    assert int(xq.abs().max()) == 127 and torch.all(xq[1, :32] == 0)
    assert ctypes.c_int(lib.blockint8_q8_isa()).value in (0, 1)


def test_concat_rows_is_lossless_across_block_sizes_and_offsets():
    a = _random_blocks(8, 64, 32, False, seed=1)
    b = _random_blocks(4, 64, 16, True, seed=2)
    c = _random_blocks(2, 64, 32, True, seed=3)
    fused = concat_rows([a, b, c])
    assert fused.block == 16 and fused.offset is not None and fused.q.shape == (14, 64)
    assert torch.equal(dequantize(fused), torch.cat([dequantize(a), dequantize(b), dequantize(c)]))


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
    assert lin.activations == "q8"
    x = torch.randn(2, 5, 64)
    ref8 = _q8_reference(x.reshape(10, 64), w).view(2, 5, 48) + bias.double()
    assert _rel_err(lin(x), ref8) < 1e-5  # 10 rows, default: the q8 kernel
    set_activations(lin, "f32")
    ref = torch.nn.functional.linear(x.double(), dequantize(w).double(), bias.double())
    assert _rel_err(lin(x), ref) < 1e-5  # 10 rows: native kernel
    x = torch.randn(3, 50, 64)
    ref = torch.nn.functional.linear(x.double(), dequantize(w).double(), bias.double())
    assert _rel_err(lin(x), ref) < 1e-5  # 150 rows: dequantize + BLAS
    set_activations(lin, "q8")
    assert _rel_err(lin(x), ref) < 1e-5  # 150 rows in q8 mode: a prefill chunk goes through BLAS, exact
    x = torch.randn(2, 20, 64)
    ref8 = _q8_reference(x.reshape(40, 64), w).view(2, 20, 48) + bias.double()
    assert _rel_err(lin(x), ref8) < 1e-5  # 40 rows (a decode batch): the q8 kernel
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
    attn, mlp = compact.model.layers[0].self_attn, compact.model.layers[0].mlp
    # q/k/v and gate/up are fused into one block-int8 matrix each, the biases with them
    assert isinstance(attn.qkv_proj, QuantLinear) and not hasattr(attn, "q_proj")
    assert attn.qkv_proj.bias is not None and attn.qkv_proj.out_features == (4 + 2 + 2) * config.head_dim
    assert isinstance(mlp.gate_up_proj, QuantLinear) and not hasattr(mlp, "up_proj")
    assert (compact.lm_head is None) == tied
    ids = torch.randint(0, config.vocab_size, (1, 7))
    with torch.inference_mode():
        b8 = compact(ids[:, :1])  # decode through the q8 kernel
        set_activations(compact, "f32")
        for sl in (ids, ids[:, :1]):  # a prefill chunk and a decode step
            a, b = dense(sl), compact(sl)
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5
        # int8 activations: close to exact on random weights (quality on a real model: the perplexity test)
        assert float((a - b8).abs().max()) > 0
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b8.flatten(), dim=0)) > 0.995


@pytest.mark.parametrize("qtype,heads,kv_heads", [(Q.Q8_0, 4, 2), (Q.Q4_K, 4, 2), (Q.Q8_0, 2, 1)],
                         ids=["Q8_0-d64", "Q4_K-d64", "Q8_0-d128"])
def test_native_layers_match_the_pytorch_layers(tmp_path, monkeypatch, lib, qtype, heads, kv_heads):
    """All layers in one C call (decode, short forwards) compute what the PyTorch layers do, and rows of
    one forward equal one-token steps bit for bit (speculative verification relies on it). Head sizes 64
    and 128; 4 threads on one kv group split its heads between them (the same bits)."""
    from qwen15.engine.kv_cache import KVCache
    from qwen15.model import build_model
    from qwen15.quant import native_layers
    from qwen15.weights.gguf import load_gguf

    config = tiny_config(hidden_size=256, intermediate_size=256, num_attention_heads=heads, num_key_value_heads=kv_heads)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, random_state_dict(config), qtype)
    model = build_model(config, load_gguf(path, keep_quantized=True)[1])
    assert native_layers.supported(model) and not native_layers.supported(build_model(config, load_gguf(path)[1]))
    ids = torch.randint(0, config.vocab_size, (1, 12))

    def run(native: bool, activations: str, split: int = 5):
        monkeypatch.setenv("QWEN15_NATIVE_LAYERS", "1" if native else "0")
        model._native = None
        set_activations(model, activations)
        cache = KVCache(config, 32)
        with torch.inference_mode():
            first = model(ids[:, :split], cache=cache, start_pos=0)
            steps = [model(ids[:, i:i + 1], cache=cache, start_pos=i) for i in range(split, 12)]
        assert bool(model._native) == native
        return torch.cat([first, *steps], dim=1), cache

    ref, ref_cache = run(False, "f32")
    got, got_cache = run(True, "f32")
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert float((got_cache.k - ref_cache.k).abs().max() / ref_cache.k.abs().max()) < 1e-5
    assert torch.equal(got_cache.k[:, :, :, 12:], ref_cache.k[:, :, :, 12:])  # nothing written past the end
    together, _ = run(True, "q8", split=12)
    one_by_one, _ = run(True, "q8", split=1)
    assert torch.equal(together[:, 1:], one_by_one[:, 1:])
    # One team of threads shares each phase (layers.c): any thread count, more threads than cores
    # included, and a caller that is not the main thread (the server's engine) give the same bits.
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 4):
            torch.set_num_threads(n)
            assert torch.equal(run(True, "q8", split=12)[0], together)
            assert torch.equal(run(True, "q8", split=1)[0][:, 1:], together[:, 1:])  # one row: groups split by heads
    finally:
        torch.set_num_threads(threads)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert torch.equal(pool.submit(run, True, "q8", 12).result()[0], together)
    with pytest.raises(ValueError, match="KV cache holds 32 positions"):
        with torch.inference_mode():
            model(ids[:, :3], cache=KVCache(config, 32), start_pos=30)


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


@pytest.fixture(scope="module")
def real_exact(real_pair, real_gguf_path):
    """The compact model with float activations (quant="gguf-f32"): exact up to summation order."""
    from qwen15 import LLM

    return LLM.load(real_gguf_path, quant="gguf-f32"), real_pair[1]


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
def test_real_compact_model_logits_and_greedy_match(real_exact):
    compact, dense = real_exact
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


def _fixed_text() -> str:
    """About 1,900 tokens of prose, code and docs that ship with this Python: enough tokens that the
    perplexity difference measures the weights, not the luck of a few hundred predictions."""
    import argparse
    import codecs
    import json
    import this  # noqa: F401 - prints the Zen once; its text is this.s, rot13-encoded

    return "\n".join([_TEXT, codecs.decode(this.s, "rot13"), argparse.__doc__, json.__doc__])


@pytest.mark.real_model
@pytest.mark.parametrize("mode", ["gguf", "gguf-f32"])
def test_real_compact_perplexity_within_half_percent(real_pair, real_exact, mode):
    compact = real_pair[0] if mode == "gguf" else real_exact[0]
    dense = real_pair[1]
    ids = compact.tokenizer.encode(_fixed_text())
    assert len(ids) > 1500
    ref = _perplexity(dense, ids, chunk=512)
    # 16-token chunks, as decode batches and speculative verification feed the kernels.
    got = _perplexity(compact, ids, chunk=16)
    assert 1.0 < ref < 20.0
    assert abs(got - ref) / ref < 0.005, (got, ref)
    if mode == "gguf-f32":
        assert abs(got - ref) / ref < 1e-4  # exact up to summation order


@pytest.mark.real_model
def test_real_q8_default_keeps_greedy_tokens(real_pair):
    """The default (int8 activations in decode) gives the same 32 greedy tokens as the dense model on
    the prompt SPEC §7 uses to compare transformers and llama.cpp."""
    compact, dense = real_pair
    assert all(m.activations == "q8" for m in compact.model.modules() if hasattr(m, "activations"))
    ga = dense.generate("def fibonacci(n):", max_tokens=32, temperature=0.0, ignore_eos=True).token_ids
    gb = compact.generate("def fibonacci(n):", max_tokens=32, temperature=0.0, ignore_eos=True).token_ids
    assert gb == ga


# ---- the repack cache -----------------------------------------------------------------------------

_TOKENIZER = {"tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(26)] + ["ab"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1] * 27}

def test_repack_cache_second_load_reads_the_cache_and_matches(tmp_path, monkeypatch):
    from qwen15.engine.engine import LLM
    from qwen15.quant import repack_cache

    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "cache"))
    config = tiny_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, random_state_dict(config), Q.Q4_K, metadata=_TOKENIZER)
    first = LLM.load(path, quant="gguf-int8")
    cached = repack_cache.cache_path(path)
    assert cached.is_file() and cached.parent == tmp_path / "cache" / "repacked"
    calls = []
    import qwen15.weights.gguf as gguf_module
    monkeypatch.setattr(gguf_module, "load_gguf", lambda *a, **k: calls.append(a) or pytest.fail("decoded again"))
    second = LLM.load(path, quant="gguf-int8")
    assert not calls
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(first.model(ids), second.model(ids))
    assert isinstance(second.model.model.layers[0].self_attn.qkv_proj, QuantLinear)


def test_repack_cache_damaged_file_is_rebuilt_and_can_be_turned_off(tmp_path, monkeypatch):
    from qwen15.engine.engine import LLM
    from qwen15.quant import repack_cache

    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "cache"))
    config = tiny_config(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, random_state_dict(config), Q.Q8_0, metadata=_TOKENIZER)
    reference = LLM.load(path, quant="gguf-int8")
    cached = repack_cache.cache_path(path)
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    assert repack_cache.load(path) is None and not cached.exists()
    rebuilt = LLM.load(path, quant="gguf-int8")
    assert cached.is_file()
    ids = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        assert torch.equal(reference.model(ids), rebuilt.model(ids))
    cached.unlink()
    monkeypatch.setenv("QWEN15_REPACK_CACHE", "0")
    LLM.load(path, quant="gguf-int8")
    assert not cached.exists() and not list(cached.parent.glob("*.partial"))
    LLM.load(path)  # the default (the file's blocks) has a cache of its own, also turned off
    assert not cached.exists() and not repack_cache.cache_path(path, "packed").exists()


# ---- GGUF blocks read as the file stores them (gguf_kernels.c) --------------------------------------

@pytest.mark.parametrize("qtype", [t for t in PACKED if t not in native.K_QUANT_TYPES], ids=lambda t: t.name)
def test_packed_kernels_equal_the_block_int8_kernels_bit_for_bit(lib, qtype):
    """The packed kernels of the 32-weight types unpack each block into exactly the BlockInt8 form:
    dequantization equals gguf's, and the q8 matmul (decode rows, a batch, a prefill through panels) equals
    the block-int8 one. (Q4_K and Q6_K round activations per 256 instead: tests/test_kquant.py.)"""
    rng = np.random.default_rng(int(qtype) + 7)
    O, K = 40, 768
    raw = np.ascontiguousarray(_raw(qtype, O, K, rng))
    packed, converted = packed_from_gguf(raw, qtype, (O, K)), from_gguf(raw, qtype, (O, K))
    assert packed.nbytes == raw.nbytes
    got = native.dequantize_any(packed).numpy()
    np.testing.assert_array_equal(got.view(np.int32), gguf_dequantize(raw, qtype).reshape(O, K).view(np.int32))
    for M in (1, 3, 9, 70):
        x = torch.randn(M, K)
        assert torch.equal(native.matmul(x, packed), native.matmul(x, converted)), M


B32_X8 = (Q.Q8_0, Q.Q5_0, Q.Q4_0)


def _b32_reference(x: torch.Tensor, w) -> torch.Tensor:
    """What the int8 kernels of the 32-weight types compute, in float64: activations rounded per 32 as the
    kernels round them, times the weights as the `gguf` package dequantizes them."""
    M, K = x.shape
    xq, dx = native.quantize_activations(x)
    xr = (xq.view(M, K // 32, 32).double() * dx.double()[..., None]).view(M, K)
    return xr @ native.dequantize_any(native.file_layout(w)).double().T


@pytest.mark.parametrize("qtype", B32_X8, ids=lambda t: t.name)
@pytest.mark.parametrize("O,K", [(40, 896), (8, 32), (24, 4864)])
def test_b32_x8_layout_is_lossless_and_batch_invariant(lib, qtype, O, K):
    """Q8_0 / Q5_0 / Q4_0 interleaved by 8 rows: the same bytes (back to the file's exactly, dequantized as gguf
    does), products within float32 rounding of the float64 reference at 1, 3 and 64+ rows, and a row's result
    the same bits alone, in a batch of any size, on 1 or 2 threads (each block's products are one exact int32,
    then one fma a block, in block order)."""
    if not native.x8_supported():
        pytest.skip("the x8 kernels are built only with AVX2")
    rng = np.random.default_rng(int(qtype) * 13 + K)
    raw = np.ascontiguousarray(_raw(qtype, O, K, rng))
    w = packed_from_gguf(raw, qtype, (O, K))
    v = native.interleave_x8(w)
    assert v.interleaved and v.raw.shape == w.raw.shape and torch.equal(native.file_layout(v).raw, w.raw)
    assert O == 8 and K == 32 or not torch.equal(v.raw, w.raw)
    np.testing.assert_array_equal(native.dequantize_any(v).numpy().view(np.int32),
                                  gguf_dequantize(raw, qtype).reshape(O, K).view(np.int32))
    g = torch.Generator().manual_seed(O + K)
    x = torch.randn(70, K, generator=g) * torch.rand(70, 1, generator=g) * 4
    x[4] = 0  # a zero row among them
    try:
        torch.set_num_threads(2)
        batch = native.matmul(x, v, native_max_rows=70)
        ref = _b32_reference(x, v)
        err = (batch.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values.clamp_min(1e-30)
        assert float(err.max()) < 1e-5 and torch.all(batch[4] == 0)
        assert torch.equal(torch.cat([native.matmul(x[i:i + 1], v) for i in range(70)]), batch)
        for n in (3, 5, 9, 16):
            assert torch.equal(native.matmul(x[10:10 + n], v, native_max_rows=n), batch[10:10 + n]), n
        torch.set_num_threads(1)
        assert torch.equal(native.matmul(x, v, native_max_rows=70), batch)
        y = torch.randn(100, K, generator=g)  # past the kernel's row limit: dequantize + BLAS, by whole groups
        assert torch.equal(native.matmul_panels(y, v), native.matmul_panels(y, w))
    finally:
        torch.set_num_threads(2)


def test_b32_x8_saturation_bounds(lib):
    """At the ends of every range (Q5_0's u = 31 and 0, Q4_0's nibbles 15, Q8_0's -128 and 127; activations
    +-127) the int16 sums of the x8 kernels do not overflow: they equal the float64 reference."""
    if not native.x8_supported():
        pytest.skip("the x8 kernels are built only with AVX2")
    K = 256
    for qtype in B32_X8:
        raw = _raw(qtype, 8, K, np.random.default_rng(2)).copy()
        blocks = raw.reshape(-1, {Q.Q8_0: 34, Q.Q5_0: 22, Q.Q4_0: 18}[qtype])
        for fill in (0xFF, 0x00, 0x80):
            blocks[:, 2:] = fill
            w = packed_from_gguf(np.ascontiguousarray(raw), qtype, (8, K))
            v = native.interleave_x8(w)
            for sign in (1.0, -1.0):
                x = torch.full((3, K), sign)
                ref = _b32_reference(x, w)
                y = native.matmul(x, v)
                assert float(((y.double() - ref).abs() / ref.abs().max().clamp_min(1e-30)).max()) < 1e-5, (qtype, fill)


def test_packed_types_and_shapes():
    rng = np.random.default_rng(3)
    assert packed_from_gguf(_raw(Q.Q5_1, 4, 64, rng), Q.Q5_1, (4, 64)) is None  # converts to BlockInt8 instead
    assert packed_from_gguf(_raw(Q.Q8_0, 2 * 4, 64, rng), Q.Q8_0, (2, 4, 64)) is None
    q5, q8 = (packed_from_gguf(_raw(t, 8, 64, rng), t, (8, 64)) for t in (Q.Q5_0, Q.Q8_0))
    mixed = concat_packed([q5, q8])  # Q5_0 becomes Q8_0 with the same scale: the same weights
    assert mixed.qtype == Q.Q8_0 and mixed.shape == (16, 64)
    assert torch.equal(native.dequantize_any(mixed), torch.cat([native.dequantize_any(q5), native.dequantize_any(q8)]))
    q4k = packed_from_gguf(_raw(Q.Q4_K, 8, 256, rng), Q.Q4_K, (8, 256))
    q6k = packed_from_gguf(_raw(Q.Q6_K, 8, 256, rng), Q.Q6_K, (8, 256))
    assert concat_packed([q4k, q6k]) is None and concat_packed([q4k, q4k]).qtype == Q.Q4_K


def test_packed_model_equals_the_block_int8_model(tmp_path, monkeypatch, lib):
    """quant="gguf" (the file's blocks, mixed types as a Q4_K_M file has them) gives the same logits bit for
    bit from the repack cache, through the C layers and through PyTorch; quant="gguf-int8" (everything
    converted) the same up to Q4_K/Q6_K's activation rounding (per 256 there, per 32 in block int8)."""
    from qwen15.engine.engine import LLM
    from qwen15.engine.kv_cache import KVCache

    monkeypatch.setenv("QWEN15_CACHE", str(tmp_path / "cache"))
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "mixed.gguf"
    types = {"blk.0.attn_v.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q4_K,
             "output.weight": Q.Q8_0}
    write_tiny_gguf(path, config, random_state_dict(config), Q.Q5_0, qtypes=types, metadata=_TOKENIZER)
    packed, converted = LLM.load(path), LLM.load(path, quant="gguf-int8")
    from qwen15.quant import repack_cache

    assert repack_cache.cache_path(path, "packed").is_file()
    again = LLM.load(path)
    layer = packed.model.model.layers[0]
    assert layer.self_attn.qkv_proj.packed and layer.self_attn.qkv_proj.qtype == Q.Q8_0  # Q5_0 + Q8_0 stacked
    assert layer.mlp.gate_up_proj.qtype == Q.Q5_0 and layer.mlp.down_proj.qtype == Q.Q6_K
    assert packed.model.model.embed_tokens.packed and not converted.model.model.layers[0].mlp.down_proj.packed
    packed_bytes = sum(m.nbytes for m in packed.model.modules() if isinstance(m, QuantLinear))
    assert packed_bytes < 0.75 * sum(m.nbytes for m in converted.model.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(0, 27, (1, 9))
    outs = []
    for native_layers in ("1", "0"):
        monkeypatch.setenv("QWEN15_NATIVE_LAYERS", native_layers)
        for llm in (packed, converted, again):
            llm.model._native = None
            cache = KVCache(config, 16)
            with torch.inference_mode():
                first = llm.model(ids[:, :6], cache=cache, start_pos=0)
                steps = [llm.model(ids[:, i:i + 1], cache=cache, start_pos=i) for i in range(6, 9)]
            assert bool(llm.model._native) == (native_layers == "1")
            outs.append(torch.cat([first, *steps], dim=1))
    p1, c1, a1, p0, c0, a0 = outs
    assert torch.equal(p1, a1) and torch.equal(p0, a0)
    assert float((p1 - c1).abs().max() / c1.abs().max()) < 2e-2 and float((p0 - c0).abs().max() / c0.abs().max()) < 2e-2


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_row_strided_activations_give_the_same_bits(lib, qtype):
    """An MLP hands down_proj the gate half of gate_up as it is (rows 2I apart, no copy): the GGUF kernels
    (file layout and x8) and the prefill panels read it at that stride and give the contiguous input's bits."""
    rng = np.random.default_rng(int(qtype) + 11)
    O, K = 40, 768
    w = packed_from_gguf(np.ascontiguousarray(_raw(qtype, O, K, rng)), qtype, (O, K))
    weights = [w] + ([native.interleave_x8(w)] if qtype in native.K_QUANT_TYPES and native.x8_supported() else [])
    for v in weights:
        lin = QuantLinear(v)
        for M in (1, 3, 70, 300):  # decode, a batch, past the q8 row limit, a prefill chunk
            both = torch.randn(M, 2 * K)
            x = both[:, :K]
            assert x.stride(0) == 2 * K
            assert torch.equal(lin(x), lin(x.contiguous())), (v.interleaved, M)
            assert torch.equal(native.matmul_panels(x, v), native.matmul_panels(x.contiguous(), v)), M


def test_inference_mlp_in_place_equals_the_autograd_path():
    """Without grad the MLP computes silu(gate) * up in place in gate_up's memory: the same bits as the
    path training takes, whose gradients still flow."""
    from qwen15.model import MLP

    torch.manual_seed(0)
    mlp = MLP(64, 160)
    mlp.gate_up_proj = torch.nn.Linear(64, 320, bias=False)
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = mlp(x)
    y.sum().backward()
    assert x.grad is not None and mlp.gate_up_proj.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(mlp(x), y)
