"""Task registry: name -> Task class (one module per benchmark)."""

from __future__ import annotations

from ...errors import EvalError
from .arc_challenge import ARCChallenge
from .base import Task
from .bbh import BBH
from .chinese_mc import CEval, CMMLU
from .gpqa import GPQA
from .gsm8k import GSM8K
from .hellaswag import HellaSwag
from .hendrycks_math import MATH
from .humaneval import HumanEval
from .judged import AlpacaEval, MTBench
from .mbpp import MBPP
from .mmlu import MMLU
from .multilingual import M3Exam, MGSM, MMMLU, PAWSX, XCOPA, Belebele, Flores, XStoryCloze, XWinograd
from .needle import Needle, Passkey
from .theoremqa import TheoremQA

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMLU, CEval, CMMLU, GSM8K, MATH, HumanEval, MBPP,
                                                  BBH, ARCChallenge, HellaSwag, Needle, Passkey,
                                                  MTBench, AlpacaEval, GPQA, TheoremQA, MGSM, Flores,
                                                  Belebele, XCOPA, XStoryCloze, XWinograd, PAWSX, M3Exam,
                                                  MMMLU)}


def get_task(name: str, **kwargs) -> Task:
    cls = TASKS.get(name)
    if cls is None:
        raise EvalError(f"unknown task {name!r}: expected one of {', '.join(sorted(TASKS))}")
    return cls(**kwargs)
