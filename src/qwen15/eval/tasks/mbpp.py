"""MBPP (Austin et al. 2021), test split of 500: 3-shot with task ids 2, 3, 4 (SPEC section 6), pass@1."""

from __future__ import annotations

import re

from ..backends import GenParams
from ..sandbox import run_program
from .base import Task

# The prompt split's task ids 2, 3 and 4 (public MBPP data), the exemplars of the original paper and Qwen.
EXEMPLARS = [
    ("Write a function to find the similar elements from the given two tuple lists.",
     ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) "),
    ("Write a python function to identify non-prime numbers.",
     ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"],
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result"),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums"),
]


def question(text: str, tests: list[str]) -> str:
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def program(problem: dict, completion: str) -> str:
    tests = "\n".join(problem["test_list"])
    return f"{problem.get('test_setup_code') or ''}\n{completion}\n\n{tests}\n"


def clean(completion: str) -> str:
    """The code of a completion: up to [DONE], without a markdown fence."""
    code = completion.split("[DONE]")[0]
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", code, re.S)
    return (fenced.group(1) if fenced else code).strip("\n")


class MBPP(Task):
    name = "mbpp"
    metric = "pass@1"
    default_shots = 3

    def docs(self):
        from .. import data

        return [{**p, "id": str(p["task_id"])} for p in data.mbpp()]

    def gen_params(self):
        return GenParams(max_tokens=512, stop=["[DONE]", "\n[BEGIN]"])

    def prompt(self, doc):
        shots = "".join(question(t, tests) + code + "\n[DONE]\n\n" for t, tests, code in EXEMPLARS[:self.shots])
        return shots + question(doc["text"], doc["test_list"])

    def run_one(self, backend, doc, gen):
        from .base import ask

        prompt = self.prompt(doc)
        output = ask(backend, prompt, gen, self.chat)
        code = clean(output)
        result = run_program(program(doc, code))
        return {"prompt": prompt, "output": output, "extracted": code, "correct": result.passed,
                "status": result.status, "detail": result.detail}
