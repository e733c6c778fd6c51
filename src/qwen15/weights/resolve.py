"""`--model` to a local path: a packaged name, a hub name, a model directory or a .gguf file."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import WeightsError
from .packaged import DEFAULT_MODEL, PACKAGED_MODELS, pull

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | Path | None) -> Path:
    """A local .gguf file or HF-layout directory for spec; fetches packaged and hub models on demand."""
    if spec is None:
        return pull(DEFAULT_MODEL)
    text = str(spec)
    if text.lower() in PACKAGED_MODELS:
        return pull(text.lower())
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: expected a .gguf file or a model directory with config.json")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise WeightsError(f"{path}: holds {len(ggufs)} .gguf files; pass one of them: "
                               + ", ".join(g.name for g in ggufs))
        raise WeightsError(f"{path}: not a model directory (expected config.json with *.safetensors, or a .gguf)")
    if text.endswith(".gguf") or text.startswith((".", "/", "~")):
        raise WeightsError(f"{path}: file not found")
    if _HUB_NAME.match(text):
        from .hub import download_from_hub

        return download_from_hub(text)
    raise WeightsError(
        f"model {text!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), a local .gguf file or model "
        f"directory, or a hub name like Qwen/Qwen1.5-0.5B-Chat")
