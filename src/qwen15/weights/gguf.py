"""GGUF files (llama.cpp): metadata, config and tensors.

The header is parsed here, straight from an mmap: `gguf.GGUFReader` builds numpy views for every
metadata item and takes ~8 s on a file with a 152k-token vocabulary, this parser ~0.1 s. Tensor data
stays in the mmap until it is dequantized, one tensor at a time, with `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import mmap
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import WeightsError

ARCHITECTURES = ("qwen2", "qwen2moe")
SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one scalar.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

# Tensor types with a plain numpy dtype (not block-quantized).
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file. `shape` is GGUF order (ne[0], the row length, first), like
    `gguf.ReaderTensor.shape`; `torch_shape` is the reverse, outermost first."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in bytes from the start of the file
    _buffer: Any = field(default=None, repr=False, compare=False)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def data(self) -> np.ndarray:
        """A read-only numpy view into the mmap, shaped like `gguf.ReaderTensor.data`: the element
        dtype for plain types, uint8 rows of blocks ([..., row_bytes]) for quantized ones."""
        raw = np.frombuffer(self._buffer, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset)
        dims = self.torch_shape or (1,)
        plain = _PLAIN_DTYPES.get(self.tensor_type)
        if plain is not None:
            return raw.view(plain).reshape(dims)
        block, type_size = GGML_QUANT_SIZES[self.tensor_type]
        return raw.reshape(*dims[:-1], dims[-1] // block * type_size)


class GGUFFile:
    """A parsed GGUF file: `metadata` (plain Python values), `tensors` (in file order) and
    `tensor_map` (by name). Tensor data is read lazily from a read-only mmap."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], tensors: list[GGUFTensor],
                 alignment: int, data_start: int, size: int):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.tensor_map = {t.name: t for t in tensors}
        self.alignment = alignment
        self.data_start = data_start
        self.size = size

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.metadata)} metadata keys)"


class _Cursor:
    """Little-endian reads from a buffer that raise _Truncated instead of reading past its end."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"needs {n} bytes at offset {self.pos}")

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def raw_string(self) -> bytes:
        n = self.scalar("<Q")
        self.need(n)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def string(self, what: str) -> str:
        raw = self.raw_string()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            return self.scalar(fmt)
        if vtype == _STRING:
            return self.string(f"metadata '{key}'")
        if vtype == _ARRAY:
            itype = self.scalar("<I")
            count = self.scalar("<Q")
            ifmt = _SCALAR_FORMATS.get(itype)
            if ifmt is not None:
                n = struct.calcsize(ifmt) * count
                self.need(n)
                arr = np.frombuffer(self.buf, dtype=np.dtype(ifmt), count=count, offset=self.pos)
                self.pos += n
                return arr.tolist()
            self.need(8 * count if itype == _STRING else count)  # each item takes at least this much
            if itype == _STRING:
                buf, size, pos, out = self.buf, self.size, self.pos, []
                unpack = _U64.unpack_from
                for i in range(count):
                    if pos + 8 > size:
                        raise _Truncated(f"metadata '{key}' item {i} runs past the end")
                    (n,) = unpack(buf, pos)
                    pos += 8
                    if pos + n > size:
                        raise _Truncated(f"metadata '{key}' item {i} runs past the end")
                    out.append(buf[pos:pos + n])
                    pos += n
                self.pos = pos
                try:
                    return [s.decode("utf-8") for s in out]
                except UnicodeDecodeError:
                    raise ValueError(f"metadata '{key}' holds a string that is not valid UTF-8") from None
            return [self.value(itype, key) for _ in range(count)]
        raise ValueError(f"metadata '{key}' has unknown value type {vtype}")


def _parse(path: Path, buf: Any, size: int) -> GGUFFile:
    cur = _Cursor(buf, size)
    cur.need(4)
    cur.pos = 4  # magic, checked by the caller
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise WeightsError(f"{path}: big-endian GGUF files are not supported: expected a little-endian GGUF")
        raise WeightsError(f"{path}: unsupported GGUF version {version}: expected 2 or 3")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    # Each metadata item takes at least 12 bytes and each tensor info at least 24: catches garbage counts.
    if n_kv * 12 + n_tensors * 24 > size:
        raise _Truncated(f"header claims {n_tensors} tensors and {n_kv} metadata items")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.scalar("<I")
        if key in metadata:
            raise ValueError(f"duplicate metadata key '{key}'")
        metadata[key] = cur.value(vtype, key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I")
        if not 0 < n_dims <= _MAX_DIMS:
            raise ValueError(f"tensor '{name}' has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
        raw_type = cur.scalar("<I")
        offset = cur.scalar("<Q")
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor '{name}' has unknown type {raw_type}") from None
        infos.append((name, dims, ttype, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"bad general.alignment {alignment!r}, expected a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    seen = set()
    for name, dims, ttype, offset in infos:
        if name in seen:
            raise ValueError(f"duplicate tensor '{name}'")
        seen.add(name)
        if ttype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor '{name}' has unsupported type {ttype.name}")
        block, type_size = GGML_QUANT_SIZES[ttype]
        if dims[0] % block:
            raise ValueError(f"tensor '{name}' rows of {dims[0]} are not whole {ttype.name} blocks of {block}")
        n_elements = math.prod(dims)
        n_bytes = n_elements // block * type_size
        start = data_start + offset
        if start + n_bytes > size:
            raise WeightsError(
                f"{path}: truncated: tensor '{name}' needs bytes {start}..{start + n_bytes} "
                f"but the file has only {size} bytes (expected at least {start + n_bytes})"
            )
        tensors.append(GGUFTensor(name, ttype, dims, n_elements, n_bytes, start, buf))
    return GGUFFile(path, version, metadata, tensors, alignment, data_start, size)


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and map its data read-only. A missing, non-GGUF, corrupt or
    truncated file raises WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise WeightsError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        size = f.seek(0, 2)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, buf, size)
    except _Truncated as e:
        raise WeightsError(f"{path}: truncated GGUF header ({e}; the file has {size} bytes)") from None
    except (ValueError, OverflowError, struct.error) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path}: corrupt GGUF header: {e}") from None


def read_metadata(reader: GGUFFile | gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata as plain Python values (str, int, float, bool, lists of those).

    Takes a GGUFFile from open_gguf, or a gguf.GGUFReader (the same values, read the slow way)."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    meta: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = fld.contents()
    return meta


def _f32(value: Any) -> float:
    """A float read from a float32 field, as the decimal the converter wrote (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: str | Path = "GGUF"):
    """A ModelConfig from GGUF metadata (`tensor_shapes` in torch order, outermost first).

    Vocab size is the row count of `token_embd`; embeddings are tied when there is no `output.weight`;
    for MoE, layers without `ffn_gate_inp` become `mlp_only_layers`."""
    from ..config import ModelConfig

    arch = meta.get("general.architecture")
    if arch is None:
        raise WeightsError(f"{path}: missing metadata 'general.architecture': expected qwen2 or qwen2moe")
    if arch not in ARCHITECTURES:
        raise WeightsError(f"{path}: unknown architecture {arch!r}: expected qwen2 or qwen2moe")

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        value = meta.get(full, default)
        if value is None:
            raise WeightsError(f"{path}: missing metadata '{full}'")
        if not isinstance(value, (int, float)):
            raise WeightsError(f"{path}: metadata '{full}' is {value!r}: expected a number")
        return value

    if "token_embd.weight" not in tensor_shapes:
        raise WeightsError(f"{path}: missing tensor 'token_embd.weight'")
    embd = tensor_shapes["token_embd.weight"]
    if len(embd) != 2:
        raise WeightsError(f"{path}: tensor 'token_embd.weight' has shape {tuple(embd)}: expected 2 dimensions")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    fields: dict[str, Any] = dict(
        model_type="qwen2_moe" if arch == "qwen2moe" else "qwen2",
        vocab_size=int(embd[0]),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        max_position_embeddings=int(key("context_length", 32768)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if f"{arch}.attention.key_length" in meta:
        fields["head_dim"] = int(key("attention.key_length"))
    if arch == "qwen2moe":
        shared = int(key("expert_shared_feed_forward_length", 0) or key("feed_forward_length", 0))
        fields.update(
            num_experts=int(key("expert_count")),
            num_experts_per_tok=int(key("expert_used_count")),
            moe_intermediate_size=int(key("expert_feed_forward_length")),
            shared_expert_intermediate_size=shared,
            intermediate_size=int(key("feed_forward_length", 0) or shared),
            norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", False)),
            mlp_only_layers=[i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_shapes],
        )
    else:
        fields["intermediate_size"] = int(key("feed_forward_length"))
    try:
        return ModelConfig(**fields)
    except Exception as e:
        raise WeightsError(f"{path}: metadata does not describe a valid model: {e}") from None


def _to_torch(t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one tensor to a fresh torch tensor of `dtype`, shaped like torch (outermost first)."""
    data = t.data
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F64):
        out = torch.from_numpy(np.array(data))  # a copy: the mmap is read-only
    elif t.tensor_type in _PLAIN_DTYPES and t.tensor_type != GGMLQuantizationType.F16:
        raise WeightsError(f"tensor '{t.name}' has integer type {t.tensor_type.name}: expected a float or quantized type")
    elif t.tensor_type == GGMLQuantizationType.F16:
        out = torch.from_numpy(data.astype(np.float32) if dtype == torch.float32 else np.array(data))
    elif t.tensor_type == GGMLQuantizationType.BF16:
        # bfloat16 is the top half of a float32: reinterpret the bits (exact, no numpy round trip).
        out = torch.from_numpy(np.array(data.view(np.int16))).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(_dequantize(data, t.tensor_type))
        except NotImplementedError:
            raise WeightsError(f"tensor '{t.name}' has type {t.tensor_type.name}, which cannot be dequantized") from None
    return out.reshape(t.torch_shape).to(dtype)


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.dequantize` on the same bytes regrouped into long rows of up to 512 blocks.

    The result is the same numbers (dequantization is per block); the gguf function loops over
    groups of 16 rows in Python, so on a [151936, 896] embedding longer rows make it ~2x faster."""
    from gguf.quants import dequantize

    _, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = data.size // type_size
    k = 512
    while n_blocks % k:
        k //= 2
    return dequantize(data.reshape(n_blocks // k, k * type_size), qtype)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool | None = None,
              keep_quantized: bool | str = False) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a qwen2 / qwen2moe GGUF: (config, state dict in our names dequantized to `dtype`, metadata).

    keep_quantized: quantized 2-D tensors whose type converts losslessly to block int8 (Q8_0, Q5_0,
    Q4_0, Q5_1, Q4_1, Q4_K, Q5_K, Q6_K) come back as `qwen15.quant.blocks.BlockInt8` instead.
    keep_quantized="packed": those of them the C kernels read as they are (Q8_0, Q5_0, Q4_0, Q4_K,
    Q6_K) come back as `GGUFBlocks`, views of the file's mmap (nothing copied or decoded); the others
    as BlockInt8.

    Every tensor the config implies must be present with that shape (checked before any is
    dequantized). A progress bar goes to stderr when it is a terminal, or when progress=True."""
    from tqdm import tqdm

    from .names import check_state_dict, expected_shapes, gguf_names

    path = Path(path)
    f = open_gguf(path)
    tensors = f.tensor_map
    config = config_from_gguf(f.metadata, {n: t.torch_shape for n, t in tensors.items()}, path)
    shapes = expected_shapes(config)
    names = gguf_names(config)
    missing = [g for g in names.values() if g not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{path}: missing tensor '{missing[0]}'{more}")
    for ours, g in names.items():
        shape = tensors[g].torch_shape
        if not _same_shape(shape, shapes[ours]):
            raise WeightsError(f"{path}: tensor '{g}' has shape {shape} but the config implies {shapes[ours]}")
    show = _stderr_is_tty() if progress is None else progress

    from ..quant.blocks import from_gguf, packed_from_gguf

    def convert(item: tuple[str, str]) -> torch.Tensor:
        ours, g = item
        t = tensors[g]
        mapped = False
        try:
            if keep_quantized and len(shapes[ours]) == 2 and t.torch_shape == shapes[ours]:
                if keep_quantized == "packed":
                    packed = packed_from_gguf(t.data, t.tensor_type, t.torch_shape, mapped=True)
                    if packed is not None:
                        mapped = True  # the model reads these pages from the mmap: keep them
                        return packed
                blocks = from_gguf(t.data, t.tensor_type, t.torch_shape)
                if blocks is not None:
                    return blocks
            return _to_torch(tensors[g], dtype).reshape(shapes[ours])
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        finally:
            if not mapped:
                _release(t)

    # numpy's dequantizers release the GIL for most of their work: two threads load ~1.6x faster.
    state: dict[str, torch.Tensor] = {}
    workers = max(1, min(4, torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(convert, names.items())
        for ours, tensor in tqdm(zip(names, results), total=len(names), desc=f"loading {path.name}",
                                 unit="tensor", disable=not show, leave=False):
            state[ours] = tensor
    check_state_dict(state, config, path)
    return config, state, dict(f.metadata)


def _release(t: GGUFTensor) -> None:
    """Drop the tensor's mmap pages from this process once it is copied out (they count in its RSS
    otherwise; the file stays in the page cache, and a later read just maps the pages again)."""
    advise = getattr(t._buffer, "madvise", None)
    if advise is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset - t.data_offset % mmap.PAGESIZE
    try:
        advise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
    except (OSError, ValueError):
        pass


def _same_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Equal up to leading 1s: llama.cpp writes the shared-expert gate [1, H] as either [H] or [1, H]."""
    strip = lambda s: tuple(s)[next((i for i, d in enumerate(s) if d != 1), len(s)):]  # noqa: E731
    return tuple(got) == tuple(want) or strip(got) == strip(want) and int(np.prod(got)) == int(np.prod(want))


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
