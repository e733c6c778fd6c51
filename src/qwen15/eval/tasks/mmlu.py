"""MMLU (Hendrycks et al. 2021), test 14,042 over 57 subjects: Qwen's 5-shot letter protocol (SPEC section 6)."""

from __future__ import annotations

from ...errors import EvalError
from .base import MultipleChoiceLetters

LETTERS = "ABCD"


def item(question: str, choices: list[str], answer: int | None = None) -> str:
    text = "Question: " + question.strip()
    for letter, choice in zip(LETTERS, choices):
        text += f"\n{letter}. {choice}"
    return text + (f"\nAnswer: {LETTERS[answer]}\n\n" if answer is not None else "\nAnswer:")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


class MMLU(MultipleChoiceLetters):
    name = "mmlu"
    default_shots = 5

    def docs(self):
        from .. import data

        self._dev = data.mmlu("dev")
        return [{"id": f"{subject}/{i}", "subject": subject, "question": row["question"], "choices": row["choices"],
                 "gold": int(row["answer"])}
                for subject, rows in data.mmlu("test").items() for i, row in enumerate(rows)]

    def prompt(self, doc):
        dev = getattr(self, "_dev", None)
        if dev is None:
            from .. import data

            dev = self._dev = data.mmlu("dev")
        shots = dev[doc["subject"]][:self.shots]
        if len(shots) < self.shots:
            raise EvalError(f"mmlu dev has {len(shots)} exemplars for {doc['subject']}: expected --shots <= 5")
        return (header(doc["subject"]) + "".join(item(s["question"], s["choices"], int(s["answer"])) for s in shots)
                + item(doc["question"], doc["choices"]))
