"""Block int8: one compact layout that every common GGUF quant type converts to without loss.

A weight [O, K] is held as int8 values `q` [O, K], one float32 `scale` per block of B weights
[O, K // B] and, for types with mins, one float32 `offset` per block: w = q * scale + offset.

    Q8_0  q = int8,            scale = d                       B = 32
    Q5_0  q = 5-bit - 16,      scale = d                       B = 32
    Q4_0  q = 4-bit - 8,       scale = d                       B = 32
    Q5_1  q = 5-bit,           scale = d,      offset = m      B = 32
    Q4_1  q = 4-bit,           scale = d,      offset = m      B = 32
    Q4_K  q = 4-bit,           scale = d*sc,   offset = -dmin*m  B = 32 (sub-blocks of a 256 super-block)
    Q5_K  q = 5-bit,           scale = d*sc,   offset = -dmin*m  B = 32
    Q6_K  q = 6-bit - 32,      scale = d*sc                    B = 16

The fp16 d times a 6- or 8-bit integer sc is exact in float32, so `dequantize` reproduces
`gguf.quants.dequantize` bit for bit. The decoders below follow gguf/quants.py, but keep the integer
values and the per-block scales apart instead of multiplying them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q


@dataclass
class BlockInt8:
    q: torch.Tensor  # int8 [O, K]
    scale: torch.Tensor  # float32 [O, K // block]
    offset: torch.Tensor | None  # float32 [O, K // block] or None
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset) if t is not None)


def dequantize(w: BlockInt8) -> torch.Tensor:
    """float32 [O, K]: q * scale (+ offset), block by block (the same float ops as gguf's numpy)."""
    O, K = w.q.shape
    nb = K // w.block
    out = w.q.view(O, nb, w.block).float() * w.scale.view(O, nb, 1)
    if w.offset is not None:
        out = out + w.offset.view(O, nb, 1)
    return out.view(O, K)


def quantize_int8(w: torch.Tensor, block: int = 32) -> BlockInt8:
    """Weight-only, group-wise int8 of a dense matrix [O, K] (K % block == 0): per block of `block`
    weights, scale = max|w| / 127 and q = round(w / scale). Lossy (about 0.4% of a block's largest
    weight at most): used for checkpoints that ship dense weights (--quant int8)."""
    O, K = w.shape
    blocks = w.detach().float().reshape(O, K // block, block)
    scale = blocks.abs().amax(-1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(blocks * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return BlockInt8(q=q.reshape(O, K), scale=scale.contiguous(), offset=None, block=block)


CONVERTIBLE = (Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q5_1, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes [n, G*group] -> uint8 [n, G*2*group]: each group of bytes gives its low nibbles, then its high."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins (gguf's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(blocks: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """[n_blocks, type_size] bytes -> (q int8 [n, QK], scale [n, QK/B], offset or None, B)."""
    n = blocks.shape[0]
    if qtype == Q.Q8_0:
        return blocks[:, 2:].view(np.int8), _f16(blocks[:, :2])[:, None], None, 32
    if qtype == Q.Q4_0:
        q = _nibbles(blocks[:, 2:], 16).astype(np.int8) - np.int8(8)
        return q, _f16(blocks[:, :2])[:, None], None, 32
    if qtype == Q.Q4_1:
        return (_nibbles(blocks[:, 4:], 16).view(np.int8), _f16(blocks[:, :2])[:, None],
                _f16(blocks[:, 2:4])[:, None], 32)
    if qtype in (Q.Q5_0, Q.Q5_1):
        h = 2 if qtype == Q.Q5_0 else 4  # header bytes before qh
        qh = np.ascontiguousarray(blocks[:, h:h + 4]).view(np.uint32).reshape(n, 1)
        qh = ((qh >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & np.uint32(1)).astype(np.uint8)
        q = (_nibbles(blocks[:, h + 4:], 16) | (qh << np.uint8(4))).view(np.int8)
        d = _f16(blocks[:, :2])[:, None]
        if qtype == Q.Q5_0:
            return q - np.int8(16), d, None, 32
        return q, d, _f16(blocks[:, 2:4])[:, None], 32
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[:, :2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if qtype == Q.Q4_K:
            q = _nibbles(blocks[:, 16:], 32)
        else:
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            q = _nibbles(blocks[:, 48:], 32) | ((qh & np.uint8(1)) << np.uint8(4)).reshape(n, -1)
        return q.view(np.int8), d * sc, -(dmin * mn), 32
    if qtype == Q.Q6_K:
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales, d = blocks[:, 192:208].view(np.int8).astype(np.float32), _f16(blocks[:, 208:210])[:, None]
        lo = _nibbles(ql, 64)
        hi = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        q = (lo | (hi.reshape(n, -1) << np.uint8(4))).view(np.int8) - np.int8(32)
        return q, d * scales, None, 16
    raise NotImplementedError(qtype)


def _matrix_layout(qtype: Q, torch_shape: tuple[int, ...], types: tuple) -> tuple[int, int, int, int] | None:
    """(O, K, weights a block, bytes a block) of a 2-D tensor of one of `types` whose rows are whole blocks."""
    if qtype not in types or len(torch_shape) != 2:
        return None
    O, K = torch_shape
    qk, type_size = GGML_QUANT_SIZES[qtype]
    return None if K % qk else (O, K, qk, type_size)


def from_gguf(raw: np.ndarray, qtype: Q, torch_shape: tuple[int, ...]) -> BlockInt8 | None:
    """A GGUF tensor's bytes as BlockInt8, or None when its type (or rank) does not convert."""
    layout = _matrix_layout(qtype, torch_shape, CONVERTIBLE)
    if layout is None:
        return None
    O, K, qk, type_size = layout
    blocks = np.asarray(raw).reshape(-1, type_size)
    n = blocks.shape[0]
    # Decoded in slices into preallocated outputs: the decoders' temporaries (up to 4 bytes a weight)
    # then stay small, which keeps peak memory near the compact size on a 136M-weight embedding.
    step = _CHUNK_WEIGHTS // qk
    q = scale = offset = None
    for s in range(0, n, step):
        cq, cs, co, B = _decode(blocks[s:s + step], qtype)
        if q is None:
            q = np.empty((n, qk), np.int8)
            scale = np.empty((n, qk // B), np.float32)
            offset = None if co is None else np.empty((n, qk // B), np.float32)
        q[s:s + step], scale[s:s + step] = cq, cs
        if offset is not None:
            offset[s:s + step] = co
    return BlockInt8(
        q=torch.from_numpy(q).reshape(O, K),
        scale=torch.from_numpy(scale).reshape(O, K // B),
        offset=None if offset is None else torch.from_numpy(offset).reshape(O, K // B),
        block=B,
    )


_CHUNK_WEIGHTS = 1 << 22


# ---- GGUF blocks kept as the file stores them ----------------------------------------------------------

# Types the C kernels read as they are (gguf_kernels.c). Everything else converts to BlockInt8.
X8 = 0x100  # flag on a kernel type: the x8 interleaved layout of gguf_kernels.c
PACKED = (Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_K, Q.Q6_K)
_SMALL = (Q.Q8_0, Q.Q5_0, Q.Q4_0)  # 32-weight blocks with one fp16 scale: each converts to Q8_0 losslessly


@dataclass
class GGUFBlocks:
    """A weight [O, K] as GGUF blocks: `raw` uint8 [O, row bytes], often a view of the file's mmap."""

    raw: torch.Tensor
    qtype: int
    in_features: int
    mapped: bool = False  # raw is a view of a read-only file mmap (its pages can be dropped, see drop_pages)
    interleaved: bool = False  # groups of 8 rows in the kernels' x8 layout (native.interleave_x8), not the file's

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.in_features)

    @property
    def kernel_qtype(self) -> int:
        """The type as the C kernels take it: the ggml id, with X8 set for the interleaved layout."""
        return self.qtype | X8 if self.interleaved else self.qtype

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


def packed_from_gguf(raw: np.ndarray, qtype: Q, torch_shape: tuple[int, ...], mapped: bool = False) -> GGUFBlocks | None:
    """A GGUF tensor's bytes, uncopied, as GGUFBlocks; None when the kernels do not take its type or shape.
    mapped: raw is a view of a read-only file mmap (load_gguf's), whose pages drop_pages may release."""
    layout = _matrix_layout(qtype, torch_shape, PACKED)
    if layout is None:
        return None
    O, K, qk, type_size = layout
    rows = np.asarray(raw).reshape(O, K // qk * type_size)
    import warnings

    with warnings.catch_warnings():  # a read-only mmap view: the kernels never write to it
        warnings.simplefilter("ignore", UserWarning)
        return GGUFBlocks(torch.from_numpy(rows), int(qtype), K, mapped=mapped)


def to_blockint8(w: GGUFBlocks) -> BlockInt8:
    if w.interleaved:
        from .native import file_layout

        w = file_layout(w)
    return from_gguf(w.raw.numpy(), Q(w.qtype), w.shape)


def to_q8_0(w: GGUFBlocks) -> GGUFBlocks:
    """Q4_0 / Q5_0 (or Q8_0) blocks as Q8_0 blocks with the same fp16 scale: the same weights, exactly."""
    if w.qtype == Q.Q8_0:
        return w
    b = to_blockint8(w)
    O, K = w.shape
    d = b.scale.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)  # these were fp16: exact
    q = b.q.numpy().view(np.uint8).reshape(-1, 32)
    return GGUFBlocks(torch.from_numpy(np.concatenate([d, q], axis=1).reshape(O, -1)), int(Q.Q8_0), K)


def concat_packed(parts: list[GGUFBlocks]) -> GGUFBlocks | None:
    """Stack along the output dimension without loss: the same type as is, 32-weight types as Q8_0;
    None for other mixes (the caller converts those to BlockInt8)."""
    original = parts
    types = {p.qtype for p in parts}
    if len(types) > 1:
        if not types <= {int(t) for t in _SMALL}:
            return None
        parts = [to_q8_0(p) for p in parts]
    out = GGUFBlocks(torch.cat([p.raw for p in parts]), parts[0].qtype, parts[0].in_features)
    for p in original:
        drop_pages(p)
    return out


def drop_pages(w: GGUFBlocks) -> None:
    """Take a file-mapped weight's pages out of this process's memory once it has been copied (they count
    in RSS until then). Safe on a read-only file mapping: a later read maps them from the file again."""
    if not w.mapped:
        return
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None)
        page = mmap.PAGESIZE
        start = w.raw.data_ptr() // page * page
        end = w.raw.data_ptr() + w.raw.numel()
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):
        pass
