"""Runs: resume after a crash, the results cache, keys, repeats; the report table and the needle heatmap."""

import json

import pytest

from qwen15.eval.backends import Backend, GenParams
from qwen15.eval.runner import run_task, select_docs
from qwen15.eval.tasks.base import Task
from qwen15.eval.tasks.needle import insert_at_depth


class CountingBackend(Backend):
    """Answers 'The answer is <question number>' for even questions, a wrong number otherwise."""

    fingerprint = "fake@1"

    def __init__(self, crash_after=None):
        self.calls, self.crash_after = 0, crash_after

    def generate(self, prompt, params):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        n = int(prompt.split("#")[1].split()[0])
        return f"The answer is {n if n % 2 == 0 else n + 1}"


class Numbers(Task):
    name = "numbers"

    def docs(self):
        return [{"id": str(i), "n": i} for i in range(20)]

    def gen_params(self):
        return GenParams(max_tokens=8)

    def run_one(self, backend, doc, gen):
        prompt = f"Question #{doc['n']} ?"
        out = backend.generate(prompt, gen)
        got = out.split()[-1]
        return {"prompt": prompt, "output": out, "extracted": got, "correct": got == str(doc["n"])}


def test_seeded_subset_is_fixed_and_in_dataset_order():
    docs = [{"id": str(i)} for i in range(100)]
    a, b = select_docs(docs, 10, seed=1), select_docs(docs, 10, seed=1)
    assert a == b and len(a) == 10 and [int(d["id"]) for d in a] == sorted(int(d["id"]) for d in a)
    assert select_docs(docs, 10, seed=2) != a


def test_resume_after_crash_and_cache_hit(tmp_path):
    task = Numbers()
    with pytest.raises(KeyboardInterrupt):
        run_task(task, CountingBackend(crash_after=7), out_dir=tmp_path, progress=False)
    logs = list(tmp_path.glob("numbers-*.jsonl"))
    assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 7
    with open(logs[0], "a") as f:
        f.write('{"id": "7", "prom')  # a torn last line, as a kill mid-write leaves it
    backend = CountingBackend()
    result = run_task(task, backend, out_dir=tmp_path, progress=False)
    assert backend.calls == 13  # only the 13 not finished before the crash
    assert result["metrics"]["accuracy"]["mean"] == pytest.approx(0.5) and result["n"] == 20
    again = CountingBackend()
    assert run_task(task, again, out_dir=tmp_path, progress=False)["metrics"] == result["metrics"]
    assert again.calls == 0  # cache hit
    records = [json.loads(l) for l in logs[0].read_text().splitlines() if l.endswith("}")]
    rec = next(r for r in records if r["id"] == "3")
    assert rec["prompt"] == "Question #3 ?" and rec["extracted"] == "4" and rec["correct"] is False
    summary = json.loads(next(tmp_path.glob("numbers-*.json")).read_text())
    assert summary["template_hash"] == task.template_hash() and summary["fingerprint"] == "fake@1"


def test_key_changes_with_shots_seed_and_model(tmp_path):
    base = run_task(Numbers(), CountingBackend(), out_dir=tmp_path, progress=False, limit=4)
    other_seed = run_task(Numbers(), CountingBackend(), out_dir=tmp_path, progress=False, limit=4, seed=7)
    other_shots = run_task(Numbers(shots=3), CountingBackend(), out_dir=tmp_path, progress=False, limit=4)
    b = CountingBackend()
    b.fingerprint = "fake@2"
    other_model = run_task(Numbers(), b, out_dir=tmp_path, progress=False, limit=4)
    keys = {r["runs"][0] for r in (base, other_seed, other_shots, other_model)}
    assert len(keys) == 4 and b.calls == 4


def test_repeats_report_mean_and_std(tmp_path):
    class Alternating(CountingBackend):
        def generate(self, prompt, params):  # right on every question when the seed is even, else wrong
            n = int(prompt.split("#")[1].split()[0])
            return f"The answer is {n if params.seed % 2 == 0 else n + 1}"

    result = run_task(Numbers(), Alternating(), out_dir=tmp_path, progress=False, repeats=2, seed=10)
    assert result["metrics"]["accuracy"]["mean"] == pytest.approx(0.5)
    assert result["metrics"]["accuracy"]["std"] == pytest.approx(0.5 ** 0.5)  # sample std of [1, 0]


def test_report_table_models_as_rows(tmp_path):
    from qwen15.eval.report import load_results, markdown_table

    run_task(Numbers(), CountingBackend(), out_dir=tmp_path, progress=False, model_name="tiny")
    results = load_results(tmp_path)
    for r in results:
        r["task"] = "gsm8k"  # show as the GSM8K column
    table = markdown_table(results)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "Model" and header[1:] == ["GSM8K"]  # only the benchmarks that were run
    col = header.index("GSM8K")
    ours = next(l for l in lines if l.startswith("| tiny (ours)"))
    # our cell carries its document count: a small run is not mistaken for a full one beside published numbers
    assert [c.strip() for c in ours.strip("|").split("|")][col] == f"50.0 (n={results[0]['n']})"
    published = next(l for l in lines if l.startswith("| Qwen1.5-0.5B (published)"))
    assert [c.strip() for c in published.strip("|").split("|")][col] == "22.0"


def test_needle_insertion_at_sentence_end():
    hay = "One two. Three four. Five six."
    assert insert_at_depth(hay, "N.", 50) == "One two. N. Three four. Five six."
    assert insert_at_depth(hay, "N.", 0) == "N. One two. Three four. Five six."
    assert insert_at_depth(hay, "N.", 100) == "One two. Three four. Five six. N."


def test_needle_heatmap_colours(tmp_path):
    import matplotlib
    import matplotlib.image

    from qwen15.eval.report import needle_heatmap

    records = [{"context_tokens": n, "depth": d, "score": 1.0 if n == 1024 else 0.0}
               for n in (1024, 2048) for d in (0, 50, 100)]
    png = needle_heatmap(records, tmp_path / "h.png")
    img = matplotlib.image.imread(png)
    h, w = img.shape[:2]
    row = img[int(h * 0.5), :, :3]
    cmap = matplotlib.colormaps["RdYlGn"]

    def share(rgba):  # fraction of the middle row painted in this colour
        return float((abs(row - rgba[:3]).max(axis=1) < 0.03).mean())

    assert share(cmap(1.0)) > 0.1 and share(cmap(0.0)) > 0.1  # a green column (1024) and a red one (2048)


def test_heatmap_command_from_a_partial_log(tmp_path):
    import argparse

    from qwen15.eval.cli import cmd_heatmap

    log = tmp_path / "needle-x.jsonl"
    log.write_text("".join(json.dumps({"id": f"{n}/{d}", "context_tokens": n, "depth": d, "score": 1.0}) + "\n"
                           for n, d in ((1024, 0), (1024, 50), (2048, 0))) + '{"id": "torn')
    cmd_heatmap(argparse.Namespace(samples=str(log), output=None, title=None))
    assert (tmp_path / "needle-x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
