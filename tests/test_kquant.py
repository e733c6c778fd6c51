"""The Q4_K / Q6_K kernels (gguf_kernels.c) against Q8_K activations: int8 per super-block of 256.

References: the `gguf` package's dequantization (llama.cpp's own numpy code) for the weights, a float64
matmul of the PyTorch-rounded activations for the products, and the kernel itself for row invariance
(a row alone, in a batch of any size, on any number of threads: the same bits)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from gguf_fixtures import _random_k_blocks
from qwen15.quant import native
from qwen15.quant.blocks import packed_from_gguf

KQ = (Q.Q4_K, Q.Q6_K)


@pytest.fixture(scope="module")
def lib():
    lib = native.load_library()
    if lib is None:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    return lib


def _packed(qtype: Q, O: int, K: int, seed: int):
    rng = np.random.default_rng(seed)
    raw = np.ascontiguousarray(_random_k_blocks(O * K // 256, qtype, rng).reshape(O, -1))
    return packed_from_gguf(raw, qtype, (O, K)), raw


def test_q8k_activation_rounding_matches_torch(lib):
    M, K = 4, 512
    x = torch.randn(M, K) * 3
    x[1, :256] = 0  # an all-zero super-block: dk = 0, xq = 0, sums 0
    x[2, 7] = 1e-30
    x[3, 300] = 50.0  # one outlier sets the block's scale
    xq = torch.empty(M, K, dtype=torch.int8)
    dk = torch.empty(M, K // 256)
    bsum = torch.empty(M, K // 16, dtype=torch.int16)
    lib.gguf_quantize_rows_k(x.data_ptr(), M, K, xq.data_ptr(), dk.data_ptr(), bsum.data_ptr())
    ref_q, ref_d = native.quantize_activations_k(x)
    assert torch.equal(dk, ref_d)
    assert int((xq != ref_q).sum()) <= 2  # only exact .5 ties may round differently
    assert torch.equal(bsum, xq.view(M, K // 16, 16).sum(-1, dtype=torch.int32).to(torch.int16))
    assert int(xq.abs().max()) == 127 and torch.all(xq[1, :256] == 0) and float(dk[1, 0]) == 0.0


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
@pytest.mark.parametrize("O,K", [(40, 768), (9, 256), (17, 2304)])
def test_kquant_kernel_matches_gguf_dequantization(lib, qtype, O, K):
    """Weights exactly as gguf dequantizes them; products as float64 over the Q8_K activations up to float32
    rounding of the per-super-block factors; 1, 3 and 64+ rows (several tiles of 8, a partial last one)."""
    w, raw = _packed(qtype, O, K, seed=int(qtype) * 100 + K)
    got = native.dequantize_any(w).numpy()
    np.testing.assert_array_equal(got.view(np.int32), gguf_dequantize(raw, qtype).reshape(O, K).view(np.int32))
    g = torch.Generator().manual_seed(K)
    for M in (1, 3, 70):
        x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
        y = native.matmul(x, w, native_max_rows=M)
        ref = native.matmul_kquant_reference(x, w)
        err = (y.double() - ref).abs() / ref.abs().max(dim=1, keepdim=True).values
        assert float(err.max()) < 1e-5, (M, float(err.max()))
        # and the Q8_K rounding itself stays within ~2% of the exact product
        exact = x.double() @ torch.from_numpy(got).double().T
        assert float((y.double() - exact).abs().max() / exact.abs().max()) < 3e-2


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
def test_kquant_rows_are_batch_invariant(lib, qtype):
    """A row's result does not depend on the rows beside it, on the tile it falls in, or on threads."""
    w, _ = _packed(qtype, 24, 512, seed=int(qtype))
    x = torch.randn(67, 512)
    x[5] = 0  # a zero row among them
    torch.set_num_threads(2)
    try:
        batch = native.matmul(x, w)  # 67 rows: the default routing keeps K-quants in the kernel
        alone = torch.cat([native.matmul(x[i:i + 1], w) for i in range(67)])
        assert torch.equal(batch, alone)
        for n in (3, 8, 9, 16):
            assert torch.equal(native.matmul(x[10:10 + n], w, native_max_rows=n), batch[10:10 + n]), n
        torch.set_num_threads(1)
        assert torch.equal(native.matmul(x, w, native_max_rows=67), batch)
        assert torch.all(batch[5] == 0)
    finally:
        torch.set_num_threads(2)


def test_kquant_saturation_bounds(lib):
    """Extreme blocks (all weights at the ends of their range, the largest scales, activations at +-127):
    no int16 or int32 overflow in the kernels."""
    K = 512
    for qtype in KQ:
        w, raw = _packed(qtype, 8, K, seed=5)
        raw = raw.copy()
        if qtype == Q.Q6_K:  # ql/qh all ones: u = 63 (w = 31); scales -128
            raw.reshape(-1, 210)[:, :192] = 0xFF
            raw.reshape(-1, 210)[:, 192:208] = 0x80
        else:  # nibbles 15, scales and mins 63
            raw.reshape(-1, 144)[:, 4:] = 0xFF
        w = packed_from_gguf(np.ascontiguousarray(raw), qtype, (8, K))
        for sign in (1.0, -1.0):
            x = torch.full((2, K), sign)
            y = native.matmul(x, w)
            ref = native.matmul_kquant_reference(x, w)
            assert float(((y.double() - ref).abs() / ref.abs().max()).max()) < 1e-5


@pytest.fixture(scope="module")
def x8(lib):
    if not native.x8_supported():
        pytest.skip("the x8 kernels are built only with AVX2")


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
@pytest.mark.parametrize("O,K", [(40, 768), (16, 2304)])
def test_x8_layout_is_lossless_and_gives_the_same_bits(x8, qtype, O, K):
    """The interleaved layout holds the same bytes (back to the file's exactly; dequantized as gguf does),
    and its kernels give the file-layout kernels' bits at 1, 3, 5 and 70 rows, on 1 and 2 threads."""
    w, raw = _packed(qtype, O, K, seed=int(qtype) * 7 + K)
    v = native.interleave_x8(w)
    assert v.interleaved and v.raw.shape == w.raw.shape and not torch.equal(v.raw, w.raw)
    assert torch.equal(native.file_layout(v).raw, w.raw)
    want = gguf_dequantize(raw, qtype).reshape(O, K).view(np.int32)
    np.testing.assert_array_equal(native.dequantize_any(v).numpy().view(np.int32), want)
    g = torch.Generator().manual_seed(O + K)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for M in (1, 3, 5, 70):
                x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
                assert torch.equal(native.matmul(x, v, native_max_rows=M), native.matmul(x, w, native_max_rows=M)), (threads, M)
            x = torch.randn(100, K, generator=g)  # past the kernel's row limit: dequantize + BLAS, by whole groups
            assert torch.equal(native.matmul_panels(x, v), native.matmul_panels(x, w))
    finally:
        torch.set_num_threads(2)


def test_x8_saturation_bounds(x8):
    """The x8 kernels sum int16 products of several chunks before a madd: at the extremes of every range
    (nibbles 15 and scales 63; u = 63 and scales -128; activations +-127) they still equal the file kernels."""
    K = 512
    for qtype in KQ:
        _, raw = _packed(qtype, 8, K, seed=9)
        raw = raw.copy()
        if qtype == Q.Q6_K:
            raw.reshape(-1, 210)[:, :192] = 0xFF
            raw.reshape(-1, 210)[:, 192:208] = 0x80
        else:
            raw.reshape(-1, 144)[:, 4:] = 0xFF
        w = packed_from_gguf(np.ascontiguousarray(raw), qtype, (8, K))
        v = native.interleave_x8(w)
        for sign in (1.0, -1.0):
            x = torch.full((3, K), sign)
            assert torch.equal(native.matmul(x, v), native.matmul(x, w))
