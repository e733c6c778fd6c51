"""Results as the seeds lay them out (models as rows, benchmarks as columns), and the needle heatmap."""

from __future__ import annotations

import json
from pathlib import Path

# Column order of the seed tables, and the task/metric each column reads.
COLUMNS = [("MMLU", "mmlu"), ("C-Eval", "ceval"), ("GSM8K", "gsm8k"), ("MATH", "math"), ("HumanEval", "humaneval"),
           ("MBPP", "mbpp"), ("BBH", "bbh"), ("CMMLU", "cmmlu"), ("TheoremQA", "theoremqa"), ("GPQA", "gpqa"),
           ("HellaSwag", "hellaswag"), ("ARC-C", "arc_challenge"), ("Needle", "needle"), ("Passkey", "passkey")]

# Published base-model scores: the Qwen1.5-32B and -110B posts (seeds), and SPEC section 6's small models.
PUBLISHED: dict[str, dict[str, float]] = {
    "Qwen1.5-110B (published)": {"mmlu": 80.4, "theoremqa": 34.9, "gpqa": 35.9, "hellaswag": 87.5, "bbh": 74.8,
                                 "arc_challenge": 69.6, "gsm8k": 85.4, "math": 49.6, "humaneval": 52.4, "mbpp": 58.1},
    "Qwen1.5-72B (published)": {"mmlu": 77.5, "ceval": 84.1, "gsm8k": 79.5, "math": 34.1, "humaneval": 41.5,
                                "mbpp": 53.4, "bbh": 65.5, "cmmlu": 83.5, "theoremqa": 29.3, "gpqa": 36.3,
                                "hellaswag": 86.0, "arc_challenge": 65.9},
    "Qwen1.5-32B (published)": {"mmlu": 73.4, "ceval": 83.5, "gsm8k": 77.4, "math": 36.1, "humaneval": 37.2,
                                "mbpp": 49.4, "bbh": 66.8, "cmmlu": 82.3},
    "Qwen1.5-0.5B (published)": {"mmlu": 39.2, "gsm8k": 22.0, "humaneval": 12.2, "mbpp": 6.8},
    "Qwen2.5-0.5B (published)": {"mmlu": 47.5, "gsm8k": 41.6, "humaneval": 30.5},
    "Qwen2.5-0.5B-Instruct (published)": {"gsm8k": 49.6, "humaneval": 35.4, "mbpp": 49.6},
    "Qwen2.5-Coder-1.5B (published)": {"humaneval": 43.9, "mbpp": 69.2},
}


def load_results(out_dir: str | Path | None) -> list[dict]:
    from .runner import default_out_dir

    folder = Path(out_dir) if out_dir else default_out_dir()
    return [json.loads(p.read_text()) for p in sorted(folder.glob("result-*.json"))]


def _cell(result: dict) -> str:
    m = result["metrics"][result["headline"]]
    text = f"{100 * m['mean']:.1f}"
    if result.get("repeats", 1) > 1:
        text += f" ± {100 * m['std']:.1f}"
    return f"{text} (n={result['n']})"  # a 5-document run must not read like a full benchmark


def markdown_table(results: list[dict], published: bool = True) -> str:
    """One row per model (ours, then the published rows), one column per benchmark that has a number."""
    ours: dict[str, dict[str, str]] = {}
    notes = []
    for r in results:  # later results (file order) replace earlier ones for the same model and task
        ours.setdefault(r["model"], {})[r["task"]] = _cell(r)
        notes.append(f"{r['model']} / {r['task']}: {r['headline']}, n={r['n']}, {r['shots']}-shot, "
                     f"template {r['template_hash']}, repeats {r.get('repeats', 1)}")
    rows = {f"{m} (ours)": cells for m, cells in ours.items()}
    if published:
        rows.update({name: {k: f"{v:.1f}" for k, v in scores.items()} for name, scores in PUBLISHED.items()})
    # The benchmarks we ran (all of the published ones when we have none yet).
    used = [(title, task) for title, task in COLUMNS if any(task in cells for cells in (ours or rows).values())]
    lines = ["| Model | " + " | ".join(t for t, _ in used) + " |",
             "| :-- | " + " | ".join(":--:" for _ in used) + " |"]
    for name, cells in rows.items():
        if not any(task in cells for _, task in used):
            continue  # a published row with none of these benchmarks
        lines.append(f"| {name} | " + " | ".join(cells.get(task, "-") for _, task in used) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in dict.fromkeys(notes)]]
    return "\n".join(lines) + "\n"


def needle_heatmap(records: list[dict], path: str | Path, title: str = "Needle in a haystack") -> Path:
    """A red-yellow-green heatmap of mean score by insertion depth (rows) and context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({r["context_tokens"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            scores = [r["score"] for r in records if r["depth"] == d and r["context_tokens"] == n]
            if scores:
                grid[i, j] = float(np.mean(scores))
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1000}K" if n >= 1000 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
