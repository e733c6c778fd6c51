"""Metrics and answer extraction: pass@k, GSM8K numbers, MATH answers (normalisation + sympy), choices."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


# ---- pass@k ------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1 samples and 0 <= c <= n correct, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over tasks given (n, c) per task; only the k that every task has enough samples for."""
    out = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return out


# ---- GSM8K -------------------------------------------------------------------------------------
_NUMBER = r"-?[$0-9.,]{0,}[0-9]+(?:\.[0-9]+)?"  # lm-eval's flexible pattern, with thousands separators
_STRICT = re.compile(r"The answer is \$?(\-?[0-9\.\,]+)", re.IGNORECASE)


def _clean_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?[0-9]+", text):
        return str(int(text))  # exact at any length: a model's runaway "1111...1" overflowed the float below
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return str(int(value)) if value == int(value) else str(value)


def gsm8k_gold(answer: str) -> str:
    """The gold number from a GSM8K answer field ('... #### 18')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    return _clean_number(answer.split("####")[-1])


def gsm8k_extract(completion: str) -> dict[str, str | None]:
    """strict: the number after 'The answer is'; flexible: the last number anywhere in the completion."""
    strict = _STRICT.findall(completion)
    numbers = re.findall(_NUMBER, completion)
    return {"strict": _clean_number(strict[-1]) if strict else None,
            "flexible": _clean_number(numbers[-1]) if numbers else None}


# ---- MATH --------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    if text.startswith("\\boxed ", i):  # \boxed 5
        return text[i + len("\\boxed "):].split("$")[0].strip()
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for end in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[j + 1:end]
    return None


def math_extract(completion: str) -> str | None:
    """Minerva: 'The final answer is X' if present, else the last \\boxed{}."""
    m = re.findall(r"final answer is\s*\$?(.+?)\$?(?:\.\s*I hope it is correct|\s*$)", completion, re.I | re.S)
    if m:
        return m[-1].strip().strip("$").strip()
    return last_boxed(completion)


_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
            "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
            "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
            "\\dots", "\\%", "%"]


def normalize_math_answer(answer: str) -> str:
    """Minerva's normalisation (Lewkowycz et al. 2022, appendix D) of a final answer string."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = answer.replace("\\left", "").replace("\\right", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def _to_sympy(latex: str):
    """A sympy expression for a simple LaTeX/plain answer, or None (never raises)."""
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    text = latex
    for _ in range(3):  # nested fractions and roots, innermost first
        text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", text)
        text = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", text)
    text = (text.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("{", "(")
            .replace("}", ")").replace("\\", ""))
    if re.search(r"[a-zA-Z]{4,}", text.replace("sqrt", "").replace("pi", "")):
        return None  # words, not maths
    try:
        transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
        return parse_expr(text, transformations=transformations, evaluate=True)
    except Exception:  # sympy raises many kinds on odd input: treat all as "not parseable"
        return None


def math_equivalent(prediction: str | None, gold: str) -> bool:
    """Equal after normalisation, or sympy finds the difference simplifies to zero."""
    if prediction is None:
        return False
    a, b = normalize_math_answer(prediction), normalize_math_answer(gold)
    if a == b:
        return True
    x, y = _to_sympy(a), _to_sympy(b)
    if x is None or y is None:
        return False
    try:
        import sympy

        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # incomparable types (tuples, sets): not equal
        return False


# ---- multiple choice ---------------------------------------------------------------------------
def acc_and_acc_norm(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """lm-eval's acc (argmax loglikelihood) and acc_norm (argmax loglikelihood per byte of the choice)."""
    acc = float(int(np.argmax(logprobs)) == gold)
    per_byte = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logprobs, choices)]
    return {"acc": acc, "acc_norm": float(int(np.argmax(per_byte)) == gold)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
