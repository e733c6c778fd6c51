"""The multilingual group, from --data-dir in the public formats: MGSM (math) and FLORES-200 (translation,
BLEU via sacrebleu). Each task runs over every language file it finds; results are per language and averaged.

MGSM (huggingface.co/datasets/juletxara/mgsm): `mgsm/mgsm_<lang>.tsv`, question<TAB>answer_number, no header.
FLORES-200 (github.com/facebookresearch/flores): `flores200/devtest/<code>.devtest`, one sentence per line,
line-aligned across languages; English (eng_Latn) is translated into every other file present.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from ..backends import GenParams
from ..scoring import gsm8k_extract
from .base import Task, ask
from .gsm8k import EXEMPLARS, item

MGSM_SOURCE = "MGSM mgsm/mgsm_<lang>.tsv, https://huggingface.co/datasets/juletxara/mgsm"
FLORES_SOURCE = "FLORES-200 flores200/devtest/<code>.devtest, https://github.com/facebookresearch/flores"
LANGUAGE_NAMES = {"ara_Arab": "Arabic", "ben_Beng": "Bengali", "deu_Latn": "German", "fra_Latn": "French",
                  "spa_Latn": "Spanish", "ind_Latn": "Indonesian", "ita_Latn": "Italian", "jpn_Jpan": "Japanese",
                  "kor_Hang": "Korean", "por_Latn": "Portuguese", "rus_Cyrl": "Russian", "tha_Thai": "Thai",
                  "vie_Latn": "Vietnamese", "zho_Hans": "Chinese", "swh_Latn": "Swahili", "tel_Telu": "Telugu"}


class MGSM(Task):
    name = "mgsm"
    metric = "accuracy"
    default_shots = 8  # GSM8K's English chain-of-thought exemplars before the native-language question

    def docs(self):
        from ..data import data_dir_file

        out = []
        for path in data_dir_file(self.data_dir, "mgsm/mgsm_*.tsv", "MGSM", MGSM_SOURCE):
            lang = path.stem.removeprefix("mgsm_")
            with open(path, encoding="utf-8", newline="") as f:
                for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
                    if len(row) >= 2:
                        out.append({"id": f"{lang}/{i}", "lang": lang, "question": row[0], "answer": row[1].strip()})
        return out

    def gen_params(self):
        return GenParams(max_tokens=512, stop=["\n\n", "Question:"])

    def run_one(self, backend, doc, gen):
        prompt = "".join(item(*ex) for ex in EXEMPLARS[:self.shots]) + item(doc["question"])
        output = ask(backend, prompt, gen, self.chat)
        got = gsm8k_extract(output)["flexible"]
        gold = gsm8k_extract(doc["answer"])["flexible"]
        return {"prompt": prompt, "output": output, "extracted": got, "gold": gold, "correct": got == gold,
                "lang": doc["lang"]}

    def aggregate(self, records):
        by_lang = defaultdict(list)
        for r in records:
            by_lang[r["lang"]].append(r["correct"])
        per = {f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_lang.items())}
        return {"accuracy": sum(per.values()) / max(1, len(per)), **per}


class Flores(Task):
    name = "flores"
    metric = "bleu"
    default_shots = 0

    def docs(self):
        from ..data import data_dir_file
        from ...errors import EvalError

        files = data_dir_file(self.data_dir, "flores200/devtest/*.devtest", "FLORES-200", FLORES_SOURCE)
        english = next((p for p in files if p.stem == "eng_Latn"), None)
        if english is None:
            raise EvalError(f"FLORES-200: expected {Path(self.data_dir) / 'flores200/devtest/eng_Latn.devtest'} "
                            f"({FLORES_SOURCE})")
        src = english.read_text(encoding="utf-8").splitlines()
        out = []
        for path in files:
            if path == english:
                continue
            refs = path.read_text(encoding="utf-8").splitlines()
            out += [{"id": f"{path.stem}/{i}", "lang": path.stem, "source": s, "reference": r}
                    for i, (s, r) in enumerate(zip(src, refs))]
        return out

    def gen_params(self):
        return GenParams(max_tokens=256, stop=["\n"])

    def run_one(self, backend, doc, gen):
        lang = LANGUAGE_NAMES.get(doc["lang"], doc["lang"])
        prompt = f"Translate the following sentence from English to {lang}.\nEnglish: {doc['source']}\n{lang}:"
        output = ask(backend, prompt, gen, self.chat).strip()
        return {"prompt": prompt, "output": output, "extracted": output, "reference": doc["reference"],
                "lang": doc["lang"], "correct": output == doc["reference"]}

    def aggregate(self, records):
        import sacrebleu

        by_lang = defaultdict(list)
        for r in records:
            by_lang[r["lang"]].append(r)
        per = {}
        for lang, recs in sorted(by_lang.items()):
            # sacrebleu's own tokenizers that need no download (flores200's spm model is fetched at run time).
            tokenize = "zh" if lang.startswith("zho") else "char" if lang[:3] in ("jpn", "tha", "kor") else "13a"
            bleu = sacrebleu.corpus_bleu([r["output"] for r in recs], [[r["reference"] for r in recs]],
                                         tokenize=tokenize)
            per[f"bleu_{lang}"] = bleu.score / 100  # stored as a fraction like the other metrics
        return {"bleu": sum(per.values()) / max(1, len(per)), **per}


# ---- understanding: multiple choice by loglikelihood -------------------------------------------------------
def _jsonl_files(data_dir, pattern: str, what: str, source: str):
    from ..data import data_dir_file, read_jsonl

    return [(p, read_jsonl(p)) for p in data_dir_file(data_dir, pattern, what, source)]


def _per_language(records, key="correct") -> dict[str, float]:
    by_lang = defaultdict(list)
    for r in records:
        by_lang[r["lang"]].append(float(r[key]))
    per = {f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_lang.items())}
    return {"accuracy": sum(per.values()) / max(1, len(per)), **per}


class Belebele(Task):
    """Belebele (huggingface.co/datasets/facebook/belebele): `belebele/<lang>.jsonl` with flores_passage,
    question, mc_answer1..4, correct_answer_num; 0-shot letter MC after the passage."""

    name = "belebele"
    source = "Belebele belebele/<lang>.jsonl, https://huggingface.co/datasets/facebook/belebele"

    def docs(self):
        out = []
        for path, rows in _jsonl_files(self.data_dir, "belebele/*.jsonl", "Belebele", self.source):
            out += [{"id": f"{path.stem}/{i}", "lang": path.stem, "passage": r["flores_passage"],
                     "question": r["question"], "choices": [r[f"mc_answer{k}"] for k in range(1, 5)],
                     "gold": int(r["correct_answer_num"]) - 1} for i, r in enumerate(rows)]
        return out

    def run_one(self, backend, doc, gen):
        prompt = f"P: {doc['passage']}\nQ: {doc['question']}\n" + "".join(
            f"{x}. {c}\n" for x, c in zip("ABCD", doc["choices"])) + "Answer:"
        logprobs = backend.letter_logprobs(prompt, list("ABCD"))
        pred = max(range(4), key=logprobs.__getitem__)
        return {"prompt": prompt, "output": logprobs, "extracted": "ABCD"[pred], "gold": "ABCD"[doc["gold"]],
                "correct": pred == doc["gold"], "lang": doc["lang"]}

    def aggregate(self, records):
        return _per_language(records)


# lm-eval's XCOPA connectors: (cause, effect) per language.
XCOPA_CONNECTORS = {"en": ("because", "therefore"), "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"),
                    "it": ("perché", "quindi"), "id": ("karena", "maka"), "qu": ("imataq", "chaymi"),
                    "sw": ("kwa sababu", "kwa hiyo"), "zh": ("因为", "所以"), "ta": ("காரணமாக", "எனவே"),
                    "th": ("เพราะ", "ดังนั้น"), "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy")}


class _ContinuationByLanguage(Task):
    def run_one(self, backend, doc, gen):
        requests = [(ctx, cont) for ctx, cont in doc["requests"]]
        lls = backend.loglikelihood(requests)
        pred = max(range(len(lls)), key=lls.__getitem__)
        return {"prompt": requests[0][0], "output": lls, "extracted": pred, "gold": doc["gold"],
                "correct": pred == doc["gold"], "lang": doc["lang"]}

    def aggregate(self, records):
        return _per_language(records)


class XCOPA(_ContinuationByLanguage):
    """XCOPA (github.com/cambridgeltl/xcopa): `xcopa/test.<lang>.jsonl` with premise, choice1, choice2,
    question (cause|effect), label; lm-eval's protocol (premise + connector, lower-cased choice)."""

    name = "xcopa"
    source = "XCOPA xcopa/test.<lang>.jsonl, https://github.com/cambridgeltl/xcopa"

    def docs(self):
        out = []
        for path, rows in _jsonl_files(self.data_dir, "xcopa/*.jsonl", "XCOPA", self.source):
            lang = path.stem.split(".")[-1]
            cause, effect = XCOPA_CONNECTORS.get(lang, XCOPA_CONNECTORS["en"])
            for i, r in enumerate(rows):
                ctx = r["premise"].strip()[:-1] + " " + (cause if r["question"] == "cause" else effect)
                conts = [" " + c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
                out.append({"id": f"{lang}/{i}", "lang": lang, "requests": [(ctx, c) for c in conts],
                            "gold": int(r["label"])})
        return out


class XStoryCloze(_ContinuationByLanguage):
    """XStoryCloze (huggingface.co/datasets/juletxara/xstory_cloze): `xstorycloze/<lang>.jsonl` with
    input_sentence_1..4, sentence_quiz1, sentence_quiz2, answer_right_ending (1|2)."""

    name = "xstorycloze"
    source = "XStoryCloze xstorycloze/<lang>.jsonl, https://huggingface.co/datasets/juletxara/xstory_cloze"

    def docs(self):
        out = []
        for path, rows in _jsonl_files(self.data_dir, "xstorycloze/*.jsonl", "XStoryCloze", self.source):
            for i, r in enumerate(rows):
                ctx = " ".join(r[f"input_sentence_{k}"] for k in range(1, 5))
                out.append({"id": f"{path.stem}/{i}", "lang": path.stem, "gold": int(r["answer_right_ending"]) - 1,
                            "requests": [(ctx, " " + r["sentence_quiz1"]), (ctx, " " + r["sentence_quiz2"])]})
        return out


class XWinograd(_ContinuationByLanguage):
    """XWinograd (huggingface.co/datasets/Muennighoff/xwinograd): `xwinograd/<lang>.jsonl` with sentence
    (a '_' blank), option1, option2, answer (1|2); lm-eval's partial scoring: the text after the blank,
    given the sentence up to the blank filled with each option."""

    name = "xwinograd"
    source = "XWinograd xwinograd/<lang>.jsonl, https://huggingface.co/datasets/Muennighoff/xwinograd"

    def docs(self):
        out = []
        for path, rows in _jsonl_files(self.data_dir, "xwinograd/*.jsonl", "XWinograd", self.source):
            for i, r in enumerate(rows):
                head, tail = r["sentence"].split("_", 1)
                cont = " " + tail.strip() if tail.startswith(" ") else tail
                out.append({"id": f"{path.stem}/{i}", "lang": path.stem, "gold": int(r["answer"]) - 1,
                            "requests": [(head + r["option1"], cont), (head + r["option2"], cont)]})
        return out
