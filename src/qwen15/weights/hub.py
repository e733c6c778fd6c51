"""Checkpoints from the Hugging Face hub (e.g. Qwen/Qwen1.5-0.5B-Chat) through `huggingface_hub`.

Only what running a model needs is fetched (config, tokenizer, safetensors). Offline (HF_HUB_OFFLINE=1,
read when called, not only when huggingface_hub was imported) the local HF cache is used; when neither the
hub nor a cached snapshot is available the error says so in one line and points to a local directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PullError

# What running a model needs from a repository; skips other weight formats and README images.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "*.safetensors", "model.safetensors.index.json",
]

_LOCAL_HINT = ("to run without the hub, download the repository elsewhere and pass its local directory "
               "(config.json, tokenizer.json, *.safetensors) or a .gguf file as the model")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them once, at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def download_from_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                      filename: str | None = None, local_files_only: bool = False) -> Path:
    """Download (or find in the HF cache) a snapshot of repo_id and return its local directory.

    With `filename` (e.g. one .gguf of a GGUF repository) only that file is fetched and its path returned.
    `cache_dir` defaults to huggingface_hub's (HF_HUB_CACHE / HF_HOME). Offline mode (HF_HUB_OFFLINE=1 or
    local_files_only) returns the cached snapshot without any network call. Raises PullError (one line)
    when the hub cannot be reached and nothing is cached, the repository or revision does not exist, or the
    snapshot lacks config.json / *.safetensors.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PullError(f"{repo_id!r}: fetching from the hub needs the huggingface_hub package "
                        f"(pip install huggingface_hub); {_LOCAL_HINT}") from None
    E = _hub_errors()

    offline = local_files_only or hub_offline()
    where = repr(repo_id) + (f" (revision {revision!r})" if revision else "") + (f" file {filename!r}" if filename else "")
    try:
        # snapshot_download even for one file: its repo look-up fails fast when the hub is unreachable
        # (hf_hub_download retries with back-off for half a minute) and then falls back to the cache.
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=[filename] if filename else HUB_PATTERNS,
                                        local_files_only=offline))
    except E("HFValidationError") as e:
        raise PullError(f"{repo_id!r} is not a valid hub repository id: {_first_line(e)}") from None
    except E("GatedRepoError"):
        raise PullError(f"{where} is a gated repository: accept its license on huggingface.co and log in "
                        f"(`hf auth login` or HF_TOKEN); or {_LOCAL_HINT}") from None
    except E("RevisionNotFoundError"):
        raise PullError(f"{where}: no such revision on the Hugging Face hub") from None
    except E("RepositoryNotFoundError"):
        raise PullError(f"{where}: no such repository on the Hugging Face hub (or it is private: log in "
                        f"with `hf auth login` or HF_TOKEN)") from None
    except E("IncompleteSnapshotError"):
        raise PullError(f"{where}: the cached snapshot is incomplete and the Hugging Face hub could not be "
                        f"reached to finish it; {_LOCAL_HINT}") from None
    except E("LocalEntryNotFoundError") as e:  # offline, or no connection, and nothing cached
        raise PullError(_unreachable(where, offline, cache_dir, e.__cause__)) from None
    except E("EntryNotFoundError") as e:  # the repository exists but not the file
        raise PullError(f"{where}: no such file in the repository ({_first_line(e)})") from None
    except (OSError, ConnectionError) as e:  # connection refused, DNS, timeouts, proxy errors, HTTP 5xx
        raise PullError(_unreachable(where, offline, cache_dir, e)) from None
    except Exception as e:  # httpx errors that are not OSError, anything else the client raises
        if type(e).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}:
            raise PullError(_unreachable(where, offline, cache_dir, e)) from None
        raise PullError(f"{where}: the Hugging Face hub download failed ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    if filename:
        if not (folder / filename).is_file():
            why = ("offline mode (HF_HUB_OFFLINE=1) cannot fetch it" if offline
                   else "no such file in the repository, or the hub could not be reached to fetch it")
            raise PullError(f"{where}: not in the snapshot {folder}: {why}")
        return folder / filename
    if not (folder / "config.json").is_file():
        raise PullError(f"{where}: the snapshot {folder} holds no config.json (a GGUF-only repository? "
                        f"name one file: {repo_id}:<file>.gguf)")
    if not any(folder.glob("*.safetensors")):
        raise PullError(f"{where}: the snapshot {folder} holds no *.safetensors weights (only safetensors "
                        f"checkpoints are supported; convert .bin weights, or use a GGUF)")
    return folder


def _hub_errors():
    """E(name): huggingface_hub's exception class of that name, or () (matches nothing) in older releases."""
    try:
        from huggingface_hub import errors as mod
    except ImportError:  # huggingface_hub < 0.24 keeps them in utils
        from huggingface_hub import utils as mod
    return lambda name: getattr(mod, name, ())


def _unreachable(where: str, offline: bool, cache_dir, error: BaseException | None) -> str:
    if cache_dir is None:
        try:
            from huggingface_hub import constants

            cache_dir = constants.HF_HUB_CACHE
        except ImportError:
            cache_dir = "the Hugging Face cache"
    cache = cache_dir
    if offline:
        why = "offline mode: HF_HUB_OFFLINE=1"
    elif error is not None:
        why = f"{type(error).__name__}: {_first_line(error)[:120]}"
    else:
        why = "no connection"
    return (f"could not get {where}: the Hugging Face hub could not be reached ({why}) and no cached snapshot "
            f"is in {cache}; {_LOCAL_HINT}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."
