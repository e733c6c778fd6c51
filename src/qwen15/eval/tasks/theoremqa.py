"""TheoremQA (Chen et al. 2023), 800 questions: chain of thought, answer after 'The answer is', from --data-dir.

Public format (github.com/wenhuchen/TheoremQA): `theoremqa_test.json`, a list of {Question, Answer,
Answer_type, Picture}. Questions with pictures are skipped (text-only models). The first `shots` text
questions are the exemplars (question and answer only: the set has no worked solutions) and are not scored.
Answers compare as numbers within 1% (lists element-wise), booleans, or by MATH equivalence.
"""

from __future__ import annotations

import json
import re

from ...errors import EvalError
from ..backends import GenParams
from ..scoring import math_equivalent
from .base import Task, ask

SOURCE = "TheoremQA theoremqa_test.json, https://github.com/wenhuchen/TheoremQA"


def extract(output: str) -> str:
    m = re.findall(r"answer is[:\s]*\$?(.+?)\$?(?:\.\s*$|\.\n|\n|$)", output, re.I)
    return (m[-1] if m else output.strip().split("\n")[-1]).strip().rstrip(".")


def _numbers(text: str) -> list[float] | None:
    found = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text.replace(",", ""))
    return [float(x) for x in found] if found else None


def equivalent(pred: str, gold, answer_type: str) -> bool:
    if answer_type == "bool":
        truth = str(gold).strip().lower() in ("true", "yes")
        p = pred.strip().lower()
        return (p.startswith(("true", "yes")) and truth) or (p.startswith(("false", "no")) and not truth)
    if answer_type in ("integer", "float", "list of integer", "list of float"):
        want = gold if isinstance(gold, list) else [gold]
        got = _numbers(pred)
        return got is not None and len(got) == len(want) and all(
            abs(g - float(w)) <= max(1e-6, 0.01 * abs(float(w))) for g, w in zip(got, want))
    return math_equivalent(pred, str(gold))


class TheoremQA(Task):
    name = "theoremqa"
    default_shots = 5

    def docs(self):
        from ..data import data_dir_file

        path = data_dir_file(self.data_dir, "theoremqa_test.json", "TheoremQA", SOURCE)[0]
        try:
            rows = [r for r in json.loads(path.read_text(encoding="utf-8")) if not r.get("Picture")]
            rows = [{"id": str(i), "question": r["Question"], "answer": r["Answer"], "type": r["Answer_type"]}
                    for i, r in enumerate(rows)]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(f"{path}: expected a JSON list of {{Question, Answer, Answer_type}} ({SOURCE})") from None
        self._shots = rows[:self.shots]
        return rows[self.shots:]

    def gen_params(self):
        return GenParams(max_tokens=512, stop=["\n\nQuestion:", "Question:"])

    def prompt(self, doc):
        shots = "".join(f"Question: {s['question']}\nThe answer is {s['answer']}.\n\n" for s in self._shots)
        return shots + f"Question: {doc['question']}\nLet's think step by step."

    def run_one(self, backend, doc, gen):
        prompt = self.prompt(doc)
        output = ask(backend, prompt, gen, self.chat)
        pred = extract(output)
        return {"prompt": prompt, "output": output, "extracted": pred, "gold": doc["answer"],
                "correct": equivalent(pred, doc["answer"], doc["type"])}
