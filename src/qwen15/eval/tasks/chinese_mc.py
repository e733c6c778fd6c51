"""C-Eval (val split) and CMMLU: 5-shot, Qwen's Chinese letter protocol, from --data-dir (not on PyPI).

Public formats: C-Eval (huggingface.co/datasets/ceval/ceval-exam) `dev/<subject>_dev.csv` and
`val/<subject>_val.csv` with columns id,question,A,B,C,D,answer[,explanation]; CMMLU
(huggingface.co/datasets/haonan-li/cmmlu) `dev/<subject>.csv` and `test/<subject>.csv` with columns
,Question,A,B,C,D,Answer.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import EvalError
from .base import MultipleChoiceLetters

LETTERS = "ABCD"


def item(question: str, choices: list[str], answer: str | None = None) -> str:
    text = "问题：" + question.strip()
    for letter, choice in zip(LETTERS, choices):
        text += f"\n{letter}. {choice}"
    return text + (f"\n答案：{answer}\n\n" if answer is not None else "\n答案：")


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        row = {k.strip().lower() if k else "": v for k, v in row.items()}
        missing = [k for k in ("question", "a", "b", "c", "d", "answer") if k not in row]
        if missing:
            raise EvalError(f"{path}: no column {missing[0]!r}: expected question,A,B,C,D,answer")
        out.append({"question": row["question"], "choices": [row[k] for k in "abcd"],
                    "answer": row["answer"].strip().upper()})
    return out


class _ChineseMC(MultipleChoiceLetters):
    default_shots = 5
    letter_prefix = ""  # after '答案：' the letter follows with no space
    eval_dir = ""
    source = ""

    def _pairs(self) -> list[tuple[str, Path, Path]]:
        from ..data import data_dir_file

        files = data_dir_file(self.data_dir, f"{self.eval_dir}/*.csv", self.name, self.source)
        out = []
        for path in files:
            subject = path.stem.removesuffix(f"_{self.eval_dir}")
            dev = [p for p in (Path(self.data_dir) / "dev" / f"{subject}_dev.csv",
                               Path(self.data_dir) / "dev" / f"{subject}.csv") if p.exists()]
            if not dev:
                raise EvalError(f"{self.name}: no dev file for {subject}: expected {Path(self.data_dir) / 'dev'}/"
                                f"{subject}_dev.csv or {subject}.csv ({self.source})")
            out.append((subject, path, dev[0]))
        return out

    def docs(self):
        self._dev, out = {}, []
        for subject, path, dev in self._pairs():
            self._dev[subject] = read_csv(dev)
            for i, row in enumerate(read_csv(path)):
                if row["answer"] not in LETTERS:
                    continue  # test splits without public answers
                out.append({"id": f"{subject}/{i}", "subject": subject, **row, "gold": LETTERS.index(row["answer"])})
        return out

    def prompt(self, doc):
        shots = self._dev[doc["subject"]][:self.shots]
        return (self.header(doc["subject"]) + "".join(item(s["question"], s["choices"], s["answer"]) for s in shots)
                + item(doc["question"], doc["choices"]))


class CEval(_ChineseMC):
    name = "ceval"
    eval_dir = "val"
    source = "C-Eval ceval-exam, https://huggingface.co/datasets/ceval/ceval-exam"

    def header(self, subject):
        return f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"


class CMMLU(_ChineseMC):
    name = "cmmlu"
    eval_dir = "test"
    source = "CMMLU, https://huggingface.co/datasets/haonan-li/cmmlu"

    def header(self, subject):
        return f"以下是关于{subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"
