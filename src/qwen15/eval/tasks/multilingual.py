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
