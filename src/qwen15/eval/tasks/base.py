"""A benchmark: its documents, the prompt for each, how the model is asked, and how answers are scored."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from ...errors import EvalError
from ..backends import Backend, GenParams


class Task:
    name = ""
    default_shots = 0
    metric = "accuracy"  # the headline metric aggregate() returns first
    published_column = ""  # column name in the report table

    def __init__(self, shots: int | None = None, data_dir: str | Path | None = None, chat: bool | None = None):
        self.shots = self.default_shots if shots is None else shots
        if self.shots < 0:
            raise EvalError(f"--shots must be >= 0, got {self.shots}")
        self.data_dir = data_dir
        self.chat = bool(chat)

    # ---- data ---------------------------------------------------------------------------------
    def docs(self) -> list[dict]:
        """Every evaluation document, each with a unique string 'id'."""
        raise NotImplementedError

    # ---- asking -------------------------------------------------------------------------------
    def gen_params(self) -> GenParams:
        return GenParams()

    def run_one(self, backend: Backend, doc: dict, gen: GenParams) -> dict:
        """Ask the model about doc; a record with prompt, output, extracted, correct (+ task fields)."""
        raise NotImplementedError

    # ---- scoring ------------------------------------------------------------------------------
    def aggregate(self, records: list[dict]) -> dict[str, float]:
        n = len(records)
        return {self.metric: sum(float(r["correct"]) for r in records) / n if n else 0.0}

    def template_hash(self) -> str:
        """Hash of the prompt template: the task module's source (prompts, exemplars), shots and chat mode."""
        module = inspect.getmodule(type(self))
        source = inspect.getsource(module) if module is not None else type(self).__qualname__
        return hashlib.sha256(f"{source}\nshots={self.shots}\nchat={self.chat}".encode()).hexdigest()[:12]


class MultipleChoiceLetters(Task):
    """Qwen's MC protocol: a header, k solved items, the question ending 'Answer:'; softmax over letters."""

    letters = "ABCD"
    letter_prefix = " "  # 'Answer: A': the letter token carries the space

    def run_one(self, backend, doc, gen):
        prompt = self.prompt(doc)
        logprobs = backend.letter_logprobs(prompt, list(self.letters[:len(doc["choices"])]), self.letter_prefix)
        pred = max(range(len(logprobs)), key=logprobs.__getitem__)
        return {"prompt": prompt, "output": {self.letters[i]: round(v, 5) for i, v in enumerate(logprobs)},
                "extracted": self.letters[pred], "gold": self.letters[doc["gold"]], "correct": pred == doc["gold"]}

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError


class MultipleChoiceContinuations(Task):
    """lm-eval's protocol: loglikelihood of each choice as a continuation; acc and acc_norm (per byte)."""

    metric = "acc_norm"

    def run_one(self, backend, doc, gen):
        from ..scoring import acc_and_acc_norm

        prompt = self.prompt(doc)
        conts = [" " + c for c in doc["choices"]]
        lls = backend.loglikelihood([(prompt, c) for c in conts])
        scores = acc_and_acc_norm(lls, conts, doc["gold"])
        return {"prompt": prompt, "output": [round(x, 5) for x in lls], "extracted": max(range(len(lls)),
                key=lambda i: lls[i] / len(conts[i].encode())), "gold": doc["gold"],
                "correct": bool(scores["acc_norm"]), "acc": scores["acc"], "acc_norm": scores["acc_norm"]}

    def aggregate(self, records):
        n = max(1, len(records))
        return {"acc_norm": sum(r["acc_norm"] for r in records) / n, "acc": sum(r["acc"] for r in records) / n}

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError


def ask(backend: Backend, prompt: str, gen: GenParams, chat: bool):
    """Generate for prompt, as one user turn of a chat when chat is set."""
    return backend.generate([{"role": "user", "content": prompt}] if chat else prompt, gen)
