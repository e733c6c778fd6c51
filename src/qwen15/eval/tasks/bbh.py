"""BIG-Bench Hard, 27 tasks: 3-shot chain of thought, answer after 'the answer is', exact match. --data-dir.

Public format (github.com/suzgunmirac/BIG-Bench-Hard): `bbh/<task>.json` holding {"examples": [{"input",
"target"}]} and `cot-prompts/<task>.txt` holding the task's three worked exemplars (a canary header ending in
a '-----' line is skipped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import EvalError
from ..backends import GenParams
from .base import Task, ask

SOURCE = "BIG-Bench-Hard, https://github.com/suzgunmirac/BIG-Bench-Hard (bbh/*.json, cot-prompts/*.txt)"


def extract(output: str) -> str:
    """The answer after the last 'the answer is', without a final period or parentheses around a letter."""
    m = re.findall(r"the answer is\s*(.+?)(?:\.\s*$|\.\n|\n|$)", output, re.I)
    answer = (m[-1] if m else output.strip().split("\n")[-1]).strip().rstrip(".")
    return answer


def normalize(answer: str) -> str:
    return answer.strip().strip("()").lower() if re.fullmatch(r"\(?[A-R]\)?", answer.strip()) else answer.strip().lower()


class BBH(Task):
    name = "bbh"
    default_shots = 3

    def docs(self):
        from ..data import data_dir_file

        out, self._prompts = [], {}
        for path in data_dir_file(self.data_dir, "bbh/*.json", "BBH", SOURCE):
            task = path.stem
            prompt_file = Path(self.data_dir) / "cot-prompts" / f"{task}.txt"
            if not prompt_file.exists():
                raise EvalError(f"BBH {task}: expected {prompt_file} ({SOURCE})")
            text = prompt_file.read_text(encoding="utf-8")
            if "-----" in text:
                text = text.split("-----", 1)[1]
            self._prompts[task] = text.strip()
            try:
                examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{path}: expected JSON with an 'examples' list of {{input, target}}") from None
            out += [{"id": f"{task}/{i}", "task": task, "input": e["input"], "target": e["target"]}
                    for i, e in enumerate(examples)]
        return out

    def gen_params(self):
        return GenParams(max_tokens=512, stop=["\n\nQ:", "Q:"])

    def prompt(self, doc):
        exemplars = self._prompts[doc["task"]].split("\n\nQ: ")
        head, shots = exemplars[0], exemplars[1:1 + self.shots]
        kept = "\n\nQ: ".join([head, *shots]) if self.shots else head.split("\n\nQ:")[0]
        return f"{kept}\n\nQ: {doc['input']}\nA: Let's think step by step."

    def run_one(self, backend, doc, gen):
        prompt = self.prompt(doc)
        output = ask(backend, prompt, gen, self.chat)
        pred = extract(output)
        return {"prompt": prompt, "output": output, "extracted": pred, "gold": doc["target"],
                "correct": normalize(pred) == normalize(doc["target"])}
