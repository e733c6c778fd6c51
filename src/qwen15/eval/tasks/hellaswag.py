"""HellaSwag validation, 10,042 items: 10-shot (the 110B post), continuation loglikelihood, acc_norm."""

from __future__ import annotations

import random
import re

from .base import MultipleChoiceContinuations


def preprocess(text: str) -> str:
    """lm-eval's cleaning of WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def query(row: dict) -> str:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return preprocess(row["activity_label"] + ": " + ctx)


class HellaSwag(MultipleChoiceContinuations):
    name = "hellaswag"
    default_shots = 10

    def docs(self):
        from .. import data

        return [{"id": str(i), "query": query(r), "choices": [preprocess(e) for e in r["endings"]],
                 "gold": int(r["label"])} for i, r in enumerate(data.hellaswag())]

    def prompt(self, doc):
        # Exemplars: a fixed seeded draw from the validation split, never the item itself (train does not ship).
        if not hasattr(self, "_pool"):
            self._pool = self.docs()
            random.Random(1234).shuffle(self._pool)
        shots = [d for d in self._pool[:self.shots + 1] if d["id"] != doc["id"]][:self.shots]
        return "".join(f"{d['query']} {d['choices'][d['gold']]}\n\n" for d in shots) + doc["query"]
