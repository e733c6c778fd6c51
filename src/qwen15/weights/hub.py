"""Checkpoints from the Hugging Face hub (e.g. Qwen/Qwen1.5-0.5B-Chat) through `huggingface_hub`."""

from __future__ import annotations

from pathlib import Path

from ..errors import PullError

# What running a model needs from a repository; skips other weight formats and README images.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "*.safetensors", "model.safetensors.index.json",
]


def download_from_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                      filename: str | None = None) -> Path:
    """Download (or find in the HF cache) a snapshot and return its local directory.

    With `filename`, only that file (e.g. one .gguf of a GGUF repository) is fetched, and its path returned.
    Honours HF_HUB_OFFLINE and HF_HOME / HF_HUB_CACHE like every huggingface_hub client.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
    except HFValidationError as e:
        raise PullError(f"{repo_id!r} is not a valid hub repository id: {str(e).splitlines()[0]}") from None
    except Exception as e:  # connection errors, offline mode without a cached snapshot, 404s
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PullError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason[:200]}); "
            f"without hub access, pass a local directory holding config.json, tokenizer.json and *.safetensors"
        ) from None
