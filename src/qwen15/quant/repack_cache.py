"""The block-int8 form of a GGUF's tensors, cached beside the models so that a second load skips decoding.

Converting a GGUF's blocks (bit unpacking in numpy) is most of a cold load; reading the converted arrays
back from one safetensors file is a copy from the page cache. An entry is written under a temporary name
and renamed when whole; a file that cannot be read is deleted and rebuilt. QWEN15_REPACK_CACHE=0 turns
the cache off.

Entries are named by the GGUF's content, not its path: the same file at two paths (or copied, or pulled
again) shares one entry. Hashing a whole 20 GB file would cost more than the cache saves, so the identity
is the size, the first MiB (the GGUF header: metadata, every tensor's name, type, shape and offset) and 16
chunks of 64 KiB spread over the tensor data (a fine-tune of the same shape differs in them); about 2 MB
read. Beside each entry a JSON file records its sources (path, size, mtime): an entry whose sources are all
gone, or one of which changed in place since (its mtime moved), is stale and dropped. The cache is held
under QWEN15_REPACK_CACHE_MAX bytes (default 16G; suffixes K, M, G) by dropping the least recently used
entries after each write. `qwen15 cache ls | prune | rm` shows and cleans it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are handled: `qwen15 cache` does without it
    import torch

    from .blocks import BlockInt8, GGUFBlocks

LAYOUT_VERSION = 5  # bump when BlockInt8, GGUFBlocks, the conversion, the fusing or the x8 types change


def enabled() -> bool:
    return os.environ.get("QWEN15_REPACK_CACHE", "1") != "0"


DEFAULT_MAX = "16G"
_HEAD, _CHUNK, _CHUNKS = 1 << 20, 64 << 10, 16


def cache_root() -> Path:
    from ..weights.packaged import cache_dir

    return cache_dir() / "repacked"


def content_key(gguf: Path) -> str:
    """A cheap identity of the file's bytes (see the module docstring for what it reads and why)."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        h.update(f.read(_HEAD))
        if size > _HEAD:
            for i in range(_CHUNKS):
                f.seek(_HEAD + (size - _HEAD - _CHUNK) * i // max(_CHUNKS - 1, 1) if size > _HEAD + _CHUNK else _HEAD)
                h.update(f.read(_CHUNK))
    return h.hexdigest()[:20]


def cache_path(gguf: Path, layout: str = "int8") -> Path:
    """layout: "int8" (everything block int8) or "packed" (the file's blocks, fused)."""
    return cache_root() / f"{content_key(gguf)}-v{LAYOUT_VERSION}-{layout}.safetensors"


def _sources_path(entry: Path) -> Path:
    return entry.with_suffix(".json")


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def _record_source(entry: Path, gguf: Path) -> None:
    """Add gguf to the entry's sources and mark the entry used now (its JSON's mtime: the LRU order)."""
    meta = _sources_path(entry)
    try:
        data = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        data = {}
    sources = data.get("sources", {})
    sources[str(gguf.resolve())] = _stamp(gguf.stat())
    try:
        meta.write_text(json.dumps({"sources": sources}))
    except OSError:
        pass


def _changed_in_place(entry: Path, gguf: Path) -> bool:
    try:
        sources = json.loads(_sources_path(entry).read_text()).get("sources", {})
    except (OSError, ValueError):
        return False
    seen = sources.get(str(gguf.resolve()))
    return seen is not None and seen != _stamp(gguf.stat())


def max_bytes() -> int:
    text = os.environ.get("QWEN15_REPACK_CACHE_MAX", DEFAULT_MAX).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    try:
        return int(float(text.rstrip("KMGT")) * scale)
    except ValueError:
        from ..errors import ConfigError

        raise ConfigError(f"QWEN15_REPACK_CACHE_MAX={os.environ['QWEN15_REPACK_CACHE_MAX']!r}: expected a size "
                          f"such as 8G, 500M or a number of bytes") from None


@dataclass
class Entry:
    path: Path
    size: int
    used: float  # last load or write (seconds since the epoch)
    sources: dict[str, list[int]]  # resolved path -> [size, mtime_ns] when last seen
    legacy: bool = False  # written by an older qwen15 (named by path, no sources recorded)

    @property
    def layout(self) -> str:
        return "?" if self.legacy else self.path.stem.rsplit("-", 1)[-1]

    def stale_reason(self) -> str | None:
        """Why the entry can go: no source left, or a source changed since; None while it is current."""
        if self.legacy:
            return "made by an older qwen15 (keyed by path): never read now"
        if not self.sources:
            return "no source recorded"
        alive = 0
        for src, stamp in self.sources.items():
            try:
                st = os.stat(src)
            except OSError:
                continue
            if _stamp(st) != stamp:
                return f"{src} changed since it was cached"
            alive += 1
        return None if alive else "its source is gone"


def entries() -> list[Entry]:
    """Every cache entry, the least recently used first."""
    root = cache_root()
    out = []
    for path in root.glob("*.safetensors") if root.is_dir() else []:
        meta = _sources_path(path)
        try:
            sources = json.loads(meta.read_text()).get("sources", {}) if meta.is_file() else {}
            used = max(path.stat().st_mtime, meta.stat().st_mtime if meta.is_file() else 0)
            legacy = not meta.is_file() and f"-v{LAYOUT_VERSION}-" not in path.name
            out.append(Entry(path, path.stat().st_size, used, sources, legacy))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda e: e.used)


def remove(entry: Entry | Path) -> None:
    path = entry.path if isinstance(entry, Entry) else entry
    path.unlink(missing_ok=True)
    _sources_path(path).unlink(missing_ok=True)


def prune(limit: int | None = None, keep: Path | None = None, legacy: bool = True) -> list[tuple[Entry, str]]:
    """Drop stale entries, then the least recently used until the cache is under limit (default
    max_bytes()); keep is never dropped for size. The dropped entries with why.

    legacy=False leaves an older qwen15's entries alone (still in use where that version runs): the
    automatic prune after a write passes it, `qwen15 cache prune` does not."""
    limit = max_bytes() if limit is None else limit
    dropped, live = [], []
    for e in entries():
        why = e.stale_reason()
        if e.legacy and not legacy:
            continue
        if why:
            remove(e)
            dropped.append((e, why))
        else:
            live.append(e)
    total = sum(e.size for e in live)
    for e in live:
        if total <= limit:
            break
        if keep is not None and e.path == keep:
            continue
        remove(e)
        total -= e.size
        dropped.append((e, f"the cache is over {limit / (1 << 30):.1f} GiB (QWEN15_REPACK_CACHE_MAX); least recently used"))
    for p in root.glob("*.partial") if (root := cache_root()).is_dir() else []:  # a killed write's leftovers
        if time.time() - p.stat().st_mtime > 3600:
            p.unlink(missing_ok=True)
    return dropped


def save(gguf: Path, state: dict[str, torch.Tensor | BlockInt8 | GGUFBlocks], layout: str = "int8") -> Path | None:
    """Write state (dense tensors, BlockInt8 and GGUFBlocks) for this GGUF; None when the cache cannot be
    written. GGUF blocks are stored too: the fused q/k/v and gate/up are copies, and reading them back
    is faster than stacking them again."""
    from safetensors.torch import save_file

    from .blocks import BlockInt8, GGUFBlocks

    flat: dict[str, torch.Tensor] = {}
    blocks: dict[str, int] = {}
    packed: dict[str, list[int]] = {}
    for name, value in state.items():
        if isinstance(value, GGUFBlocks):
            packed[name] = [value.qtype, value.in_features, int(value.interleaved)]
            flat[f"{name}::raw"] = value.raw.contiguous()
        elif isinstance(value, BlockInt8):
            blocks[name] = value.block
            flat[f"{name}::q"], flat[f"{name}::scale"] = value.q.contiguous(), value.scale.contiguous()
            if value.offset is not None:
                flat[f"{name}::offset"] = value.offset.contiguous()
        else:
            flat[name] = value.contiguous()
    target = cache_path(gguf, layout)
    limit = max_bytes()
    if sum(t.numel() * t.element_size() for t in flat.values()) > limit:
        return None  # larger than the whole cache: keep the cap rather than this entry
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
        _sources_path(target).unlink(missing_ok=True)  # a rebuilt entry starts its record afresh
        _record_source(target, gguf)
        prune(limit, keep=target, legacy=False)
    except OSError:
        return None  # a read-only or full cache only costs the next load its conversion
    return target


def load(gguf: Path, layout: str = "int8") -> dict[str, torch.Tensor | BlockInt8 | GGUFBlocks] | None:
    """The cached state for this GGUF, or None (absent, or unreadable: then it is deleted)."""
    from safetensors import safe_open

    from .blocks import BlockInt8, GGUFBlocks

    path = cache_path(gguf, layout)
    if not path.is_file():
        return None
    if _changed_in_place(path, gguf):  # rewritten where it was since: these bytes may not be its own
        remove(path)
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
        if any(v[2] for v in packed.values()):
            from .native import x8_supported

            if not x8_supported():  # kept by a build with the x8 kernels: this one reads the file instead
                return None
        for name, (qtype, in_features, interleaved) in packed.items():
            state[name] = GGUFBlocks(flat[f"{name}::raw"], int(qtype), int(in_features), interleaved=bool(interleaved))
        for name, block in blocks.items():
            state[name] = BlockInt8(q=flat[f"{name}::q"], scale=flat[f"{name}::scale"],
                                    offset=flat.get(f"{name}::offset"), block=int(block))
    except Exception:  # noqa: BLE001 - any damage means: rebuild it
        remove(path)
        return None
    _record_source(path, gguf)
    return state
