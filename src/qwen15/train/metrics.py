"""What a run shows and leaves behind: a progress bar, metrics.jsonl (one line a step), a loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    """Progress bar (loss, lr, tokens/s; tqdm adds the ETA) and metrics.jsonl. Only the main rank writes."""

    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, progress: bool | None = None):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.bar = None
        self.tokens = 0
        self.started = time.perf_counter()
        if not enabled:
            return
        if start_step and self.path.is_file():  # resuming: keep the lines up to the checkpoint's step
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not show, dynamic_ncols=True)

    def step(self, record: dict, tokens: int) -> None:
        if not self.enabled:
            return
        self.tokens += tokens
        elapsed = time.perf_counter() - self.started
        record["tokens_per_s"] = round(self.tokens / elapsed, 1) if elapsed > 0 else 0.0
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                     "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "eval_loss" in record:
                shown["eval"] = f"{record['eval_loss']:.4f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.enabled:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(out: Path, log=print) -> Path | None:
    """loss.png from metrics.jsonl (train loss per step, eval loss where measured); None without matplotlib."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("loss curve not drawn: matplotlib is not installed (pip install 'qwen15[eval]')")
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out / "loss.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
