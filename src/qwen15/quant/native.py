"""The C kernel for block-int8 weights: built with gcc on first use, loaded with ctypes.

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

from .blocks import BlockInt8, dequantize

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def library_path() -> Path:
    from ..weights.packaged import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
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
            lib.blockint8_has_avx512.restype = I
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch path
            warnings.warn(f"qwen15: block-int8 C kernel unavailable ({e}); using the slower PyTorch path",
                          RuntimeWarning, stacklevel=2)
        finally:
            _tried = True
        return _lib


def has_avx512() -> bool:
    lib = load_library()
    return bool(lib is not None and lib.blockint8_has_avx512())


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block sums of activations x [M, K] -> [M, K // block] (for the offset term)."""
    M, K = x.shape
    return x.view(M, K // block, block).sum(-1)


def matmul_torch(x: torch.Tensor, w: BlockInt8) -> torch.Tensor:
    """x [M, K] float32 @ W.T via a dequantized copy of W (the fallback, and the path for large M)."""
    return F.linear(x, dequantize(w))


def matmul_native(x: torch.Tensor, w: BlockInt8, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T with the C kernel (the caller checks the library is there)."""
    lib = lib or load_library()
    x = x.contiguous()
    M, K = x.shape
    O = w.q.shape[0]
    y = torch.empty(M, O, dtype=torch.float32)
    xsum = block_sums(x, w.block).contiguous() if w.offset is not None else None
    lib.blockint8_matmul(
        x.data_ptr(), xsum.data_ptr() if xsum is not None else None, M, K,
        w.q.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr() if w.offset is not None else None,
        w.block, O, y.data_ptr(), torch.get_num_threads())
    return y


def matmul(x: torch.Tensor, w: BlockInt8, native_max_rows: int = 16) -> torch.Tensor:
    """x [M, K] @ W.T: the C kernel for M <= native_max_rows (decode), else dequantize + BLAS (prefill)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= native_max_rows:
        lib = load_library()
        if lib is not None:
            return matmul_native(x, w, lib)
    return matmul_torch(x.to(torch.float32), w).to(x.dtype)
