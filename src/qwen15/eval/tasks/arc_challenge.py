"""ARC-Challenge test, 1,172 questions: 25-shot (the 110B post), continuation loglikelihood, acc_norm."""

from __future__ import annotations

from .base import MultipleChoiceContinuations


class ARCChallenge(MultipleChoiceContinuations):
    name = "arc_challenge"
    default_shots = 25

    def docs(self):
        from .. import data

        seen, out = set(), []
        for d in data.arc_challenge():  # the shipped requests repeat each question per choice
            if d["id"] not in seen:
                seen.add(d["id"])
                out.append({"id": d["id"], "query": d["query"], "choices": d["choices"], "gold": int(d["gold"])})
        return out

    def prompt(self, doc):
        # Exemplars: the shipped validation split (ARC's train split does not ship), in its own order.
        if not hasattr(self, "_shots"):
            from .. import data

            self._shots = [r for r in data.arc_challenge_train() if r["answerKey"] in r["choices"]["label"]]
        shots = ""
        for r in self._shots[:self.shots]:
            answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
            shots += f"Question: {r['question']}\nAnswer: {answer}\n\n"
        return shots + doc["query"]
