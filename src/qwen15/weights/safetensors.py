"""Hugging Face safetensors checkpoints: one `model.safetensors` or shards named by
`model.safetensors.index.json`, read memory-mapped through `safetensors.safe_open`.

Dense names are used as they are. MoE routed experts are stacked into our [E, out, in] tensors from
any of three layouts: the released per-expert one (`mlp.experts.{j}.gate_proj.weight`, which
transformers 5 `save_pretrained` still writes), transformers 5's in-memory fused one
(`mlp.experts.gate_up_proj` [E, 2*Im, H], gate rows first, and `mlp.experts.down_proj` [E, H, Im]),
and ours (`mlp.experts.gate_proj` / `up_proj` / `down_proj`).
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import WeightsError
from .names import check_state_dict, expected_shapes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def _shard_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the index when there is one."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{index}: not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no 'weight_map': expected an object of tensor name -> shard file")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = directory / str(shard)
            if not path.is_file():
                raise WeightsError(f"{index}: names shard '{shard}', which is missing from {directory}")
            files.append(path)
        return files
    single = directory / SINGLE_NAME
    if single.is_file():
        return [single]
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others
    raise WeightsError(f"{directory}: no safetensors weights: expected {SINGLE_NAME} or {INDEX_NAME}")


class _Checkpoint:
    """Every tensor name of a set of safetensors files, mapped to the open file holding it."""

    def __init__(self, files: list[Path], stack: ExitStack):
        from safetensors import safe_open

        self.where: dict[str, tuple[Path, Any]] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError, OSError: one line naming the file
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "not fully covered" in msg:  # the header's offsets run past the end of the file
                    raise WeightsError(f"{path}: truncated: the header describes more tensor data than the "
                                       f"file's {path.stat().st_size} bytes ({msg})") from None
                raise WeightsError(f"{path}: not a safetensors file or corrupt header ({msg})") from None
            for key in keys:
                self.where.setdefault(key, (path, handle))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][1].get_slice(name).get_shape())

    def file(self, name: str) -> Path:
        return self.where[name][0]

    def get(self, name: str) -> torch.Tensor:
        path, handle = self.where[name]
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"{path}: cannot read tensor '{name}' ({msg})") from None
        if not tensor.is_floating_point():
            raise WeightsError(f"{path}: tensor '{name}' has dtype {tensor.dtype}: expected floating point "
                               "(quantized safetensors checkpoints are not supported)")
        return tensor


# A plan for one of our tensors: the checkpoint tensors it is read from (for the missing-tensor and
# shape checks, with the shape each must have) and a function that builds it.
_Plan = tuple[list[tuple[str, tuple[int, ...]]], Callable[[], torch.Tensor]]


def _plan(ckpt: _Checkpoint, name: str, shape: tuple[int, ...],
          dtype: torch.dtype) -> _Plan:
    """How to build our tensor `name`: from the layout the checkpoint has (the per-expert one, for the
    missing-tensor message, when it has none)."""
    def direct(src: str, want: tuple[int, ...]) -> _Plan:
        return [(src, want)], lambda: ckpt.get(src).to(dtype)

    m = _EXPERTS.match(name)
    if m is None or name in ckpt:
        return direct(name, shape)
    prefix, proj = m.groups()
    E = shape[0]
    per_expert = [f"{prefix}.{j}.{proj}.weight" for j in range(E)]
    fused = f"{prefix}.gate_up_proj"
    if proj in ("gate_proj", "up_proj") and fused in ckpt and per_expert[0] not in ckpt:
        Im = shape[1]
        half = slice(0, Im) if proj == "gate_proj" else slice(Im, 2 * Im)
        return [(fused, (E, 2 * Im, shape[2]))], lambda: ckpt.get(fused)[:, half].to(dtype).contiguous()

    def stacked() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for j, src in enumerate(per_expert):
            out[j].copy_(ckpt.get(src))
        return out
    return [(src, shape[1:]) for src in per_expert], stacked


def load_safetensors(directory: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
                     progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (see names.expected_shapes) from an HF checkpoint directory, cast to `dtype`.

    Every tensor the config implies must be there with that shape; this is checked from the headers
    before any data is read. `lm_head.weight` is dropped when the embeddings are tied; tensors the
    config does not use (e.g. old `rotary_emb.inv_freq` buffers) are ignored."""
    from tqdm import tqdm

    directory = Path(directory)
    if directory.is_file() and directory.suffix == ".safetensors":
        files, where = [directory], directory
    elif directory.is_dir():
        files, where = _shard_files(directory), directory
    else:
        raise WeightsError(f"{directory}: not found: expected a checkpoint directory")
    shapes = expected_shapes(config)
    with ExitStack() as stack:
        ckpt = _Checkpoint(files, stack)
        plans: dict[str, Callable[[], torch.Tensor]] = {}
        for name, shape in shapes.items():
            sources, build = _plan(ckpt, name, shape, dtype)
            for src, want in sources:
                if src not in ckpt:
                    raise WeightsError(f"{where}: missing tensor '{src}'")
                got = ckpt.shape(src)
                if got != tuple(want):
                    raise WeightsError(f"{ckpt.file(src)}: tensor '{src}' has shape {got} "
                                       f"but the config implies {tuple(want)}")
            plans[name] = build
        show = _stderr_is_tty() if progress is None else progress
        state = {name: build() for name, build in tqdm(plans.items(), desc=f"loading {directory.name}",
                                                       unit="tensor", disable=not show, leave=False)}
    check_state_dict(state, config, where)
    return state


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
