"""GPQA (Rein et al. 2023): 5-shot letter MC over four shuffled options, from --data-dir (not on PyPI).

Public format (huggingface.co/datasets/Idavidrein/gpqa, gated): `gpqa_main.csv` (or gpqa_diamond.csv) with
columns Question, Correct Answer, Incorrect Answer 1..3. The options are shuffled with a seed per question
(the file lists the right answer first); the first `shots` rows serve as exemplars and are not scored.
"""

from __future__ import annotations

import csv
import random

from ...errors import EvalError
from .base import MultipleChoiceLetters

SOURCE = "GPQA gpqa_main.csv / gpqa_diamond.csv, https://huggingface.co/datasets/Idavidrein/gpqa"
LETTERS = "ABCD"


def item(question: str, choices: list[str], answer: int | None = None) -> str:
    text = "Question: " + question.strip()
    for letter, choice in zip(LETTERS, choices):
        text += f"\n{letter}. {choice.strip()}"
    return text + (f"\nAnswer: {LETTERS[answer]}\n\n" if answer is not None else "\nAnswer:")


class GPQA(MultipleChoiceLetters):
    name = "gpqa"
    default_shots = 5

    def _rows(self) -> list[dict]:
        from ..data import data_dir_file

        path = data_dir_file(self.data_dir, "gpqa_*.csv", "GPQA", SOURCE)[0]
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
        if not rows or any(c not in rows[0] for c in cols):
            raise EvalError(f"{path}: expected columns {', '.join(cols)} ({SOURCE})")
        out = []
        for i, r in enumerate(rows):
            options = [r[c] for c in cols[1:]]
            order = list(range(4))
            random.Random(f"gpqa/{i}").shuffle(order)
            out.append({"id": str(i), "question": r["Question"], "choices": [options[j] for j in order],
                        "gold": order.index(0)})
        return out

    def docs(self):
        rows = self._rows()
        self._shots = rows[:self.shots]
        return rows[self.shots:]

    def prompt(self, doc):
        return (f"The following are multiple choice questions (with answers).\n\n"
                + "".join(item(s["question"], s["choices"], s["gold"]) for s in self._shots)
                + item(doc["question"], doc["choices"]))
