"""The C kernels for block-int8 weights: built with gcc on first use, loaded with ctypes.

Two ways to multiply (kernels.c says how): activations="f32" keeps float activations (exact up to
summation order); activations="q8" rounds them to int8 per block of 32 first, as llama.cpp does, which
turns the inner loop into integer dot products and makes decode memory-bound. Both are checked against
PyTorch references here: `matmul_torch` and `matmul_q8_torch`.

The shared library goes to `<cache>/kernels/blockint8-<hash of source and flags>.so` (written under a
temporary name, then renamed, so processes building at once do not see half a file). Without gcc, or
when the build fails, `matmul` falls back to PyTorch (dequantize, then F.linear) and warns once.
QWEN15_NATIVE=0 forces the fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from .blocks import BlockInt8, GGUFBlocks, dequantize

SOURCE = Path(__file__).with_name("kernels.c")
INCLUDED = (SOURCE.with_name("gguf_kernels.c"), SOURCE.with_name("layers.c"))  # #included by kernels.c
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]  # no implicit FMA: C dequantization rounds as PyTorch does

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def library_path() -> Path:
    from ..weights.packaged import cache_dir

    sources = b"".join(p.read_bytes() for p in (SOURCE, *INCLUDED))
    digest = hashlib.sha256(sources + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"blockint8-{digest}.so"


def _build(target: Path) -> None:
    gcc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([gcc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library() -> ctypes.CDLL | None:
    """The kernel library (built if needed), or None (with one warning) when it cannot be had."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("QWEN15_NATIVE", "1") == "0":
                return None
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            P, I = ctypes.c_void_p, ctypes.c_int
            lib.blockint8_matmul.argtypes = [P, P, I, I, P, P, P, I, I, P, I]
            lib.blockint8_matmul.restype = None
            lib.blockint8_matmul_q8.argtypes = [P, P, I, I, P, P, P, I, I, P, I]
            lib.blockint8_matmul_q8.restype = I
            lib.blockint8_quantize_rows.argtypes = [P, I, I, P, P]
            lib.blockint8_quantize_rows.restype = None
            lib.blockint8_dequantize.argtypes = [P, P, P, I, I, I, P, I]
            lib.blockint8_dequantize.restype = None
            lib.qwen_layers_forward.argtypes = [P, I, P, P, P, I, P, P, P, P]
            lib.qwen_layers_forward.restype = I
            lib.gguf_matmul_q8.argtypes = [P, P, I, I, P, I, I, P, I, ctypes.c_long]
            lib.gguf_matmul_q8.restype = I
            lib.gguf_quantize_rows_k.argtypes = [P, I, I, P, P, P]
            lib.gguf_quantize_rows_k.restype = None
            lib.gguf_dequantize.argtypes = [P, I, I, I, P, I]
            lib.gguf_dequantize.restype = None
            lib.blockint8_exact_isa.restype = I
            lib.blockint8_q8_isa.restype = I
            lib.gguf_kquant_vnni.restype = I
            lib.gguf_x8_supported.restype = I
            lib.gguf_interleave_x8.argtypes = [P, I, I, I, P, I, I]
            lib.gguf_interleave_x8.restype = None
            lib.hash_dropout.argtypes = [P, P, ctypes.c_long, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, I]
            lib.hash_dropout.restype = None
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch path
            warnings.warn(f"qwen15: block-int8 C kernel unavailable ({e}); using the slower PyTorch path",
                          RuntimeWarning, stacklevel=2)
        finally:
            _tried = True
        return _lib


ISA_NAMES = {0: "plain C", 1: "AVX2", 2: "AVX-512"}


def kernel_isa() -> dict[str, str]:
    """Which instruction set each kernel was built for on this machine (for bench output and tests)."""
    lib = load_library()
    if lib is None:
        return {"f32": "pytorch", "q8": "pytorch", "kquant": "pytorch"}
    q8 = ISA_NAMES[lib.blockint8_q8_isa()]
    return {"f32": ISA_NAMES[lib.blockint8_exact_isa()], "q8": q8,
            "kquant": q8 + (" + VNNI" if lib.gguf_kquant_vnni() else "")}


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block sums of activations x [M, K] -> [M, K // block] (for the offset term)."""
    M, K = x.shape
    return x.view(M, K // block, block).sum(-1)


def x8_supported() -> bool:
    """Whether this machine's kernels take the interleaved x8 layout (the AVX2 build)."""
    lib = load_library()
    return lib is not None and bool(lib.gguf_x8_supported())


def can_interleave(w: GGUFBlocks) -> bool:
    O, K = w.shape
    block = 256 if w.qtype in K_QUANT_TYPES else 32
    return (not w.interleaved and w.qtype in X8_TYPES and O % 8 == 0 and K % block == 0
            and w.raw.is_contiguous() and x8_supported())


def interleave_x8(w: GGUFBlocks) -> GGUFBlocks:
    """w's bytes rearranged into the x8 layout (groups of 8 rows side by side, as llama.cpp repacks Q4_K into
    block_q4_Kx8 and Q4_0 into block_q4_0x8): the same size and the same values, read by kernels that reduce
    8 rows in vector lanes.
    A new buffer: a file-mapped source's pages are dropped from this process afterwards."""
    from .blocks import drop_pages

    if not can_interleave(w):
        return w
    out = _rearranged(w, to_x8=True)
    drop_pages(w)
    return out


def file_layout(w: GGUFBlocks) -> GGUFBlocks:
    """w in the file's row layout (a copy when it is interleaved)."""
    return _rearranged(w, to_x8=False) if w.interleaved else w


def _rearranged(w: GGUFBlocks, to_x8: bool) -> GGUFBlocks:
    """A copy of w's bytes in the x8 layout, or back in the file's (the C permutation either way)."""
    O, K = w.shape
    out = torch.empty_like(w.raw, memory_format=torch.contiguous_format)
    load_library().gguf_interleave_x8(w.raw.data_ptr(), w.qtype, O, K, out.data_ptr(), int(not to_x8),
                                      torch.get_num_threads())
    return GGUFBlocks(out, w.qtype, w.in_features, interleaved=to_x8)


def interleave_state(state: dict, skip: tuple[str, ...] = ("embed_tokens.weight",)) -> dict:
    """Every K-quant matrix of a state dict that the x8 kernels take, interleaved in place (embedding
    tables are looked up by row, so they keep the file's layout). Returns state."""
    for name, value in state.items():
        if isinstance(value, GGUFBlocks) and not name.endswith(skip):
            state[name] = interleave_x8(value)
    return state


def dequantize_any(w: BlockInt8 | GGUFBlocks) -> torch.Tensor:
    """float32 [O, K] of either form (for GGUF blocks: the C dequantizer, else gguf's numpy one)."""
    if isinstance(w, BlockInt8):
        return dequantize(w)
    lib = load_library()
    O, K = w.shape
    if lib is None:
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(gguf_dequantize(file_layout(w).raw.numpy(), GGMLQuantizationType(w.qtype)).reshape(O, K))
    out = torch.empty(O, K, dtype=torch.float32)
    lib.gguf_dequantize(w.raw.data_ptr(), w.kernel_qtype, O, K, out.data_ptr(), torch.get_num_threads())
    return out


def matmul_torch(x: torch.Tensor, w: BlockInt8 | GGUFBlocks) -> torch.Tensor:
    """x [M, K] float32 @ W.T via a dequantized copy of W (the fallback, and the path for large M)."""
    return F.linear(x, dequantize_any(w))


def matmul_native(x: torch.Tensor, w: BlockInt8, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T with the C kernel (the caller checks the library is there)."""
    return KernelCall(w, "f32", lib or load_library())(x.contiguous())


# Prefill dequantizes W into float32 a panel of rows at a time, into one reused buffer, and BLAS
# multiplies each panel: at most PANEL_BYTES of float weights exist at once (a 7B's gate_up would be
# 0.5 GB), and reusing the buffer spares the page faults of a fresh allocation per matrix per chunk.
# 8 MB: the 0.5B's peak RSS (a 512-token chunk's gate_up) 8 MB lower than with 16, prefill no slower.
PANEL_BYTES = 8 << 20
_panels = threading.local()


def _panel_buffer(numel: int) -> torch.Tensor:
    buf = getattr(_panels, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _panels.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def matmul_panels(x: torch.Tensor, w: BlockInt8 | GGUFBlocks, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T for large M (prefill): the C code dequantizes panels of W's rows in one pass
    each and BLAS multiplies them. The same float ops as matmul_torch, with the float copy of W written
    once per panel instead of in several whole-matrix passes."""
    lib = lib or load_library()
    if x.stride(-1) != 1:  # BLAS takes rows with any stride (the gate half of an MLP's gate_up), not columns
        x = x.contiguous()
    M, K = x.shape
    O = w.shape[0]
    rows = max(1, min(O, PANEL_BYTES // (4 * K)))
    if isinstance(w, GGUFBlocks) and w.interleaved:
        rows = max(8, rows // 8 * 8)  # whole x8 groups
    panel = _panel_buffer(rows * K).view(rows, K)
    threads = torch.get_num_threads()
    if isinstance(w, GGUFBlocks):
        raw, row_bytes = w.raw.data_ptr(), w.raw.shape[1]

        def dequantize_rows(o0: int, n: int) -> torch.Tensor:
            lib.gguf_dequantize(raw + o0 * row_bytes, w.kernel_qtype, n, K, panel.data_ptr(), threads)
            return panel[:n]
    else:
        nb = K // w.block
        q, scale = w.q.data_ptr(), w.scale.data_ptr()
        offset = w.offset.data_ptr() if w.offset is not None else None

        def dequantize_rows(o0: int, n: int) -> torch.Tensor:
            lib.blockint8_dequantize(q + o0 * K, scale + 4 * o0 * nb, offset + 4 * o0 * nb if offset else None,
                                     w.block, n, K, panel.data_ptr(), threads)
            return panel[:n]

    if rows == O:
        return torch.mm(x, dequantize_rows(0, O).t())
    y = torch.empty(M, O, dtype=torch.float32)
    for o0 in range(0, O, rows):
        n = min(rows, O - o0)
        torch.mm(x, dequantize_rows(o0, n).t(), out=y[:, o0:o0 + n])
    return y


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (xq int8 [M, K], dx float32 [M, K // 32]) with the q8 kernel's rounding:
    dx = max|x| / 127 per block of 32, xq = round(x * (127 / max|x|)), ties to even."""
    M, K = x.shape
    blocks = x.reshape(M, K // 32, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv[..., None]).to(torch.int8)
    return xq.reshape(M, K), amax / 127.0


K_QUANT_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)  # the file's blocks these get Q8_K activations
# Types the x8 kernels take (gguf_kernels.c): the K-quants, and the 32-weight types, whose x8 kernels sum each
# block's products exactly in int32 before one fma (the file-layout kernels keep float partial sums per lane).
X8_TYPES = K_QUANT_TYPES + (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_0)


def quantize_activations_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (xq int8 [M, K], dk float32 [M, K // 256]): the K-quant kernels' activations
    (llama.cpp's Q8_K), dk = max|x| / 127 per super-block of 256, xq = round(x * (127 / max|x|)), ties to even."""
    M, K = x.shape
    blocks = x.reshape(M, K // 256, 256)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv[..., None]).to(torch.int8)
    return xq.reshape(M, K), amax / 127.0


def matmul_kquant_reference(x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """What the Q4_K / Q6_K kernels compute, in float64: Q8_K-rounded activations times the weights as the
    `gguf` package dequantizes them. The kernels differ from it only by float32 rounding of the per
    super-block factors and their sum (a few ulp of the result)."""
    from gguf.quants import dequantize as gguf_dequantize

    M, K = x.shape
    xq, dk = quantize_activations_k(x)
    xr = (xq.view(M, K // 256, 256).double() * dk.double()[..., None]).view(M, K)
    wd = torch.from_numpy(gguf_dequantize(file_layout(w).raw.numpy(), GGMLQuantizationType(w.qtype)).reshape(w.shape)).double()
    return xr @ wd.T


def matmul_q8_torch(x: torch.Tensor, w: BlockInt8) -> torch.Tensor:
    """The q8 kernel's result computed with PyTorch: int8-rounded activations times the exact weights,
    the offset term from the float activations."""
    M, K = x.shape
    xq, dx = quantize_activations(x)
    xr = (xq.view(M, K // 32, 32).float() * dx[..., None]).view(M, K)
    y = F.linear(xr, dequantize(BlockInt8(w.q, w.scale, None, w.block)))
    if w.offset is not None:
        y = y + block_sums(x, w.block) @ w.offset.T
    return y


def q8_supported(w: BlockInt8 | GGUFBlocks) -> bool:
    if isinstance(w, GGUFBlocks):
        return True  # packed_from_gguf only makes shapes the kernels take
    return w.q.shape[1] % 32 == 0 and w.block in (16, 32)


def matmul_q8_native(x: torch.Tensor, w: BlockInt8, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T with the q8 C kernel (K % 32 == 0, block 16 or 32; the caller checks)."""
    return KernelCall(w, "q8", lib or load_library())(x.contiguous())


ACTIVATIONS = ("q8", "f32")


# Rows up to which a C kernel beats dequantize + BLAS. Measured with the 0.5B on this 2-core AVX2 machine
# (quiet): a 512-token prompt prefills at 67 tok/s through the q8 kernel and 93-97 through BLAS, while
# batches of up to 64 rows (decode batches, speculative verification) are faster in the kernel, which
# reads each weight once for up to 8 rows and skips dequantizing the whole matrix.
NATIVE_MAX_ROWS = {"q8": 64, "f32": 32}
# Q4_K / Q6_K blocks take the int8 kernel at any row count: with Q8_K activations it multiplied a prompt
# of 128-512 rows as fast as dequantize + BLAS or faster (gate 8960x1536, 128 rows: 43 vs 60 ms of CPU time
# on one thread here), and a row's result then does not depend on how many rows came with it. So do the
# x8 (interleaved) Q8_0 / Q5_0 / Q4_0 matrices: the 0.5B prefilled 512 tokens at 208 tok/s through them
# against 140 through dequantize + BLAS (benchmarks/results/compare_0.5b_llamacpp.md).
KQUANT_MAX_ROWS = 1 << 30


class KernelCall:
    """One weight's C matmul with its arguments bound. Decode calls about a hundred of these a token, and
    the generic `matmul` path's checks and pointer lookups cost as much as a small matrix's kernel."""

    def __init__(self, w: BlockInt8 | GGUFBlocks, activations: str, lib: ctypes.CDLL):
        self.activations = activations  # the module rebuilds this when it changes
        self.O, self.K = w.shape
        if isinstance(w, GGUFBlocks):  # int8 activations only: "f32" (exact) goes through dequantize + BLAS
            rows = KQUANT_MAX_ROWS if w.qtype in K_QUANT_TYPES or w.interleaved else NATIVE_MAX_ROWS["q8"]
            self.q, self.block, self.max_rows = w.raw, 32, rows if activations == "q8" else 0
            self.fn, self.sums = lib.gguf_matmul_q8, False  # Q4_K's mins use the int8 sums (Q8_K, in C)
            self.row_stride = True  # takes x's rows at any stride
            self._keep = (w.raw,)
            self.args = (w.raw.data_ptr(), w.kernel_qtype, self.O)
            return
        self.q, self.row_stride = w.q, False
        if activations == "q8" and not q8_supported(w):
            activations = "f32"
        self.max_rows = NATIVE_MAX_ROWS[activations]
        self.fn = lib.blockint8_matmul_q8 if activations == "q8" else lib.blockint8_matmul
        self.block, self.sums = w.block, w.offset is not None
        self._keep = (w.q, w.scale, w.offset)  # the pointers below stay valid while these live
        self.args = (w.q.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr() if w.offset is not None else None,
                     w.block, self.O)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 on the CPU, M <= max_rows. The GGUF kernels read rows at any stride; the
        block-int8 ones take x contiguous."""
        M = x.shape[0]
        if x.stride(-1) != 1 or not (self.row_stride or x.is_contiguous()):
            x = x.contiguous()
        y = torch.empty(M, self.O, dtype=torch.float32)
        xsum = block_sums(x, self.block).contiguous() if self.sums else None
        status = self.fn(x.data_ptr(), xsum.data_ptr() if xsum is not None else None, M, self.K, *self.args,
                         y.data_ptr(), torch.get_num_threads(), *((x.stride(0),) if self.row_stride else ()))
        if status:  # only the q8 kernels return a status
            raise MemoryError(f"q8 kernel: cannot allocate activation buffers for {M} x {self.K}")
        return y


def kernel_call(w: BlockInt8 | GGUFBlocks, activations: str = "q8") -> KernelCall | None:
    """The bound C matmul for w, or None where there is none (no library, not on the CPU)."""
    lib = load_library()
    if lib is None:
        return None
    tensors = (w.raw,) if isinstance(w, GGUFBlocks) else (w.q, w.scale)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return KernelCall(w, activations, lib)


def matmul(x: torch.Tensor, w: BlockInt8 | GGUFBlocks, native_max_rows: int | None = None,
           activations: str = "q8") -> torch.Tensor:
    """x [M, K] @ W.T: a C kernel for M <= native_max_rows (decode, batches, prefill chunks), else
    dequantize + BLAS. activations: "q8" (int8 dot products, the default) or "f32" (exact); "q8" falls
    back to "f32" for shapes it does not take, and GGUF blocks take "f32" through dequantize + BLAS."""
    if activations == "q8" and not q8_supported(w):
        activations = "f32"
    packed = isinstance(w, GGUFBlocks)
    if native_max_rows is not None:
        limit = native_max_rows
    elif packed:
        limit = 0 if activations == "f32" else KQUANT_MAX_ROWS if w.qtype in K_QUANT_TYPES or w.interleaved \
            else NATIVE_MAX_ROWS["q8"]
    else:
        limit = NATIVE_MAX_ROWS[activations]
    lib = load_library() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if lib is not None and x.shape[0] <= limit:
        return KernelCall(w, activations, lib)(x.contiguous())
    if lib is not None and (packed and w.raw.is_contiguous() or not packed and w.q.is_contiguous()):
        return matmul_panels(x, w, lib)
    return matmul_torch(x.to(torch.float32), w).to(x.dtype)
