"""The block-int8 form of a GGUF's tensors, cached beside the models so that a second load skips decoding.

Converting a GGUF's blocks (bit unpacking in numpy) is most of a cold load; reading the converted arrays
back from one safetensors file is a copy from the page cache. The file is named by the GGUF's path, size
and modification time and by this layout's version, written under a temporary name and renamed when
whole; a file that cannot be read is deleted and rebuilt. QWEN15_REPACK_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .blocks import BlockInt8, GGUFBlocks

LAYOUT_VERSION = 3  # bump when BlockInt8, GGUFBlocks, the conversion or the fusing changes


def enabled() -> bool:
    return os.environ.get("QWEN15_REPACK_CACHE", "1") != "0"


def cache_path(gguf: Path, layout: str = "int8") -> Path:
    """layout: "int8" (everything block int8) or "packed" (the file's blocks, fused)."""
    from ..weights.packaged import cache_dir

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{LAYOUT_VERSION}|{layout}"
    return cache_dir() / "repacked" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def save(gguf: Path, state: dict[str, torch.Tensor | BlockInt8 | GGUFBlocks], layout: str = "int8") -> Path | None:
    """Write state (dense tensors, BlockInt8 and GGUFBlocks) for this GGUF; None when the cache cannot be
    written. GGUF blocks are stored too: the fused q/k/v and gate/up are copies, and reading them back
    is faster than stacking them again."""
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    blocks: dict[str, int] = {}
    packed: dict[str, list[int]] = {}
    for name, value in state.items():
        if isinstance(value, GGUFBlocks):
            packed[name] = [value.qtype, value.in_features]
            flat[f"{name}::raw"] = value.raw.contiguous()
        elif isinstance(value, BlockInt8):
            blocks[name] = value.block
            flat[f"{name}::q"], flat[f"{name}::scale"] = value.q.contiguous(), value.scale.contiguous()
            if value.offset is not None:
                flat[f"{name}::offset"] = value.offset.contiguous()
        else:
            flat[name] = value.contiguous()
    target = cache_path(gguf, layout)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".partial", dir=target.parent)
        os.close(fd)
        try:
            save_file(flat, tmp, metadata={"blocks": json.dumps(blocks), "packed": json.dumps(packed),
                                           "layout": str(LAYOUT_VERSION)})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return None  # a read-only or full cache only costs the next load its conversion
    return target


def load(gguf: Path, layout: str = "int8") -> dict[str, torch.Tensor | BlockInt8 | GGUFBlocks] | None:
    """The cached state for this GGUF, or None (absent, or unreadable: then it is deleted)."""
    from safetensors import safe_open

    path = cache_path(gguf, layout)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("layout") != str(LAYOUT_VERSION):
                raise ValueError("layout version")
            blocks = json.loads(meta["blocks"])
            packed = json.loads(meta.get("packed", "{}"))
            flat = {k: f.get_tensor(k) for k in f.keys()}
        state: dict[str, torch.Tensor | BlockInt8 | GGUFBlocks] = {k: v for k, v in flat.items() if "::" not in k}
        for name, (qtype, in_features) in packed.items():
            state[name] = GGUFBlocks(flat[f"{name}::raw"], int(qtype), int(in_features))
        for name, block in blocks.items():
            state[name] = BlockInt8(q=flat[f"{name}::q"], scale=flat[f"{name}::scale"],
                                    offset=flat.get(f"{name}::offset"), block=int(block))
    except Exception:  # noqa: BLE001 - any damage means: rebuild it
        path.unlink(missing_ok=True)
        return None
    return state
