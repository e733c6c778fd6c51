"""The multilingual group, from --data-dir in the public formats: MGSM (math), FLORES-200 (translation,
BLEU via sacrebleu), M3Exam and multilingual MMLU (exams), Belebele, XCOPA, XStoryCloze, XWinograd and PAWS-X
(understanding). Each task runs over every language file it finds; results are per language and averaged.

MGSM (huggingface.co/datasets/juletxara/mgsm): `mgsm/mgsm_<lang>.tsv`, question<TAB>answer_number, no header.
FLORES-200 (github.com/facebookresearch/flores): `flores200/devtest/<code>.devtest`, one sentence per line,
line-aligned across languages; English (eng_Latn) is translated into every other file present.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

from ...errors import EvalError
from ..backends import GenParams
from ..scoring import gsm8k_extract
from .base import MultipleChoiceLetters, Task, ask
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


# lm-eval's PAWS-X words per language: (question word, yes, no).
PAWSX_WORDS = {"en": ("right", "Yes", "No"), "de": ("richtig", "Ja", "Nein"), "es": ("verdad", "Sí", "No"),
               "fr": ("n'est-ce pas", "Oui", "Non"), "ja": ("ですね", "はい", "いいえ"), "ko": ("맞죠", "예", "아니요"),
               "zh": ("对吧", "是", "不是")}


def _detokenize(text: str) -> str:
    """lm-eval's general_detokenize, as its PAWS-X process_docs applies it to both sentences."""
    for a, b in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(a, b)
    return re.sub(r" (['.,])", r"\1", text)


class PAWSX(_ContinuationByLanguage):
    """PAWS-X (github.com/google-research-datasets/paws, pawsx/): `pawsx/<lang>/test_2k.tsv` (tab-separated,
    header id, sentence1, sentence2, label; 1 = paraphrase), or `pawsx/<lang>.jsonl` with the same fields
    (the huggingface.co/datasets/google-research-datasets/paws-x export); the TSV wins when both are present.

    lm-eval's protocol (tasks/paws-x): both sentences detokenized and stripped, sentence1's final . , ; dropped,
    sentence2's first letter lower-cased, rows with an empty sentence skipped; the two candidates are
    `sentence1, <right>? <No|Yes>, sentence2` with the language's words (PAWSX_WORDS; French uses 'Non' where
    lm-eval's file has 'No'), gold = label (No, Yes). lm-eval scores each whole candidate from an empty
    context; the shared prefix `sentence1, <right>?` is the context here and ` <Yes|No>, sentence2` (space
    included, so an endpoint's echoed offsets split cleanly) the continuation: the same argmax up to the
    tokenization at the split, and it needs no empty-context request. Unknown languages use the English words."""

    name = "pawsx"
    source = ("PAWS-X pawsx/<lang>/test_2k.tsv or pawsx/<lang>.jsonl, "
              "https://github.com/google-research-datasets/paws/tree/master/pawsx")

    def docs(self):
        from ..data import data_dir_file, read_jsonl

        by_lang: dict[str, list[dict]] = {}
        for path in data_dir_file(self.data_dir, ("pawsx/*/test_2k.tsv", "pawsx/*.jsonl"), "PAWS-X", self.source):
            lang = path.parent.name if path.suffix == ".tsv" else path.stem
            if lang in by_lang:
                continue  # pawsx/<lang>/test_2k.tsv already read
            if path.suffix == ".tsv":
                with open(path, encoding="utf-8", newline="") as f:
                    by_lang[lang] = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            else:
                by_lang[lang] = read_jsonl(path)
        out = []
        for lang, rows in sorted(by_lang.items()):
            right, yes, no = PAWSX_WORDS.get(lang, PAWSX_WORDS["en"])
            for i, r in enumerate(rows):
                s1, s2 = (_detokenize(r.get(k) or "").strip() for k in ("sentence1", "sentence2"))
                if not s1 or not s2:
                    continue
                s1 = s1[:-1] if s1.endswith((".", ",", ";")) else s1
                s2 = s2[0].lower() + s2[1:]
                label = str(r.get("label", "")).strip()
                if label not in ("0", "1"):
                    continue
                ctx = f"{s1}, {right}?"
                out.append({"id": f"{lang}/{i}", "lang": lang, "gold": int(label),
                            "requests": [(ctx, f" {no}, {s2}"), (ctx, f" {yes}, {s2}")]})
        return out


class _LetterMCByLanguage(MultipleChoiceLetters):
    """Qwen's letter protocol (MultipleChoiceLetters) with a 'lang' on each record, scored per language."""

    def run_one(self, backend, doc, gen):
        return {**super().run_one(backend, doc, gen), "lang": doc["lang"]}

    def aggregate(self, records):
        return _per_language(records)


_MARKS = ("123456789", "ABCDEFGHI", "abcdefghi", "กขคงจฉชซฌ")  # option i's label is one of column i
_OPTION_MARK = re.compile(r"\s*(?:[(（]\s*(?P<a>\w)\s*[)）]|(?P<b>\w)\s*(?:[.)\]:](?=\s)|[．、：）]))\s*")


def _strip_option_mark(text: str, i: int) -> str:
    """'(1) Paris' / 'A. Paris' / 'A．巴黎' -> 'Paris' when the label is option i's own ('1.5 kg' stays)."""
    m = _OPTION_MARK.match(text)
    if m and (m["a"] or m["b"]) in [marks[i] for marks in _MARKS if i < len(marks)]:
        return text[m.end():].strip()
    return text.strip()


def _answer_index(answer) -> int | None:
    """M3Exam's answer_text ('2', '(2)', 'B', 'b.') -> 0-based option index, or None."""
    text = str(answer).strip().strip("()（）.． ")
    for marks in _MARKS:
        if len(text) == 1 and text in marks:
            return marks.index(text)
    return None


class M3Exam(_LetterMCByLanguage):
    """M3Exam (github.com/DAMO-NLP-SG/M3Exam), text questions: `m3exam/<language>-questions-test.json` (the
    release's text-question/ files) or `m3exam/<language>/*test*.json`, each a JSON list of question_text,
    options ('(1) ...' or 'A. ...'), answer_text ('1' or 'A'), background_description (list of lines),
    need_image ('yes' questions are skipped), level, subject_category.

    Protocol (Qwen's letter MC, 0-shot by default): the background lines, the question, the options with their
    own labels stripped and re-lettered A-E, then 'Answer:'; log-softmax over the first len(options) letters.
    --shots k puts the first k text-only questions of the same level and subject_category from the matching
    dev file (`<language>-questions-dev.json`, as M3Exam's own few-shot setting) before it, answered with
    their letter. Questions whose answer maps to no option are skipped."""

    name = "m3exam"
    letters = "ABCDEFGHI"
    source = ("M3Exam m3exam/<language>-questions-test.json or m3exam/<language>/*test*.json, "
              "https://github.com/DAMO-NLP-SG/M3Exam")

    @staticmethod
    def _lang(path: Path) -> str:
        return path.name.removesuffix("-questions-test.json") if path.name.endswith("-questions-test.json") \
            else path.parent.name

    def _questions(self, path: Path) -> list[tuple[int, dict]]:
        """(index in the file, doc) for each usable question of one file."""
        out = []
        for i, q in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            if str(q.get("need_image", "no")).strip().lower() == "yes":
                continue
            choices = [_strip_option_mark(str(o), k) for k, o in enumerate(q.get("options") or [])]
            gold = _answer_index(q.get("answer_text", ""))
            if not 2 <= len(choices) <= len(self.letters) or gold is None or gold >= len(choices):
                continue
            background = q.get("background_description") or []
            background = [background] if isinstance(background, str) else background
            out.append((i, {"background": [str(b) for b in background], "question": str(q["question_text"]),
                            "choices": choices, "gold": gold, "level": q.get("level", ""),
                            "subject": q.get("subject_category", "")}))
        return out

    def docs(self):
        from ..data import data_dir_file

        files = data_dir_file(self.data_dir, ("m3exam/*-questions-test.json", "m3exam/*/*test*.json"), "M3Exam",
                              self.source)
        self._dev, out, seen = {}, [], set()
        for path in files:
            lang = self._lang(path)
            if self.shots:
                dev = path.with_name(path.name.replace("test", "dev"))
                if not dev.exists():
                    raise EvalError(f"m3exam --shots {self.shots}: expected the dev file {dev} ({self.source})")
                for _, d in self._questions(dev):
                    self._dev.setdefault((lang, d["level"], d["subject"]), []).append(d)
            for i, doc in self._questions(path):
                doc_id = f"{lang}/{i}" if f"{lang}/{i}" not in seen else f"{lang}/{path.stem}/{i}"
                seen.add(doc_id)
                out.append({"id": doc_id, "lang": lang, **doc})
        return out

    def item(self, doc: dict, answer: bool = False) -> str:
        text = "".join(b + "\n" for b in doc["background"]) + doc["question"].strip() + "\n"
        text += "".join(f"{x}. {c}\n" for x, c in zip(self.letters, doc["choices"]))
        return text + (f"Answer: {self.letters[doc['gold']]}\n\n" if answer else "Answer:")

    def prompt(self, doc):
        shots = []
        if self.shots:
            if not hasattr(self, "_dev"):
                self.docs()
            shots = self._dev.get((doc["lang"], doc["level"], doc["subject"]), [])[:self.shots]
            if len(shots) < self.shots:
                raise EvalError(f"m3exam dev has {len(shots)} exemplars for {doc['lang']} {doc['level']} "
                                f"{doc['subject']}: expected --shots <= {len(shots)}")
        return "".join(self.item(s, answer=True) for s in shots) + self.item(doc)


def _mmmlu_rows(path: Path) -> list[dict]:
    """Rows of an MMMLU CSV: header [index],Question,A,B,C,D,Answer,Subject in any case and order, or no
    header at all (then positional, the index column optional)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    head = [h.strip().lower() for h in rows[0]]
    if "question" in head and "answer" in head:
        missing = [k for k in ("question", "a", "b", "c", "d", "answer") if k not in head]
        if missing:
            raise EvalError(f"{path}: no column {missing[0]!r}: expected [index],Question,A,B,C,D,Answer,Subject")
        col = {k: head.index(k) for k in ("question", "a", "b", "c", "d", "answer", "subject") if k in head}
        body = rows[1:]
    else:
        width = len(rows[0])
        if width not in (7, 8):
            raise EvalError(f"{path}: {width} columns and no header: expected [index,]Question,A,B,C,D,Answer,"
                            f"Subject")
        col = dict(zip(("question", "a", "b", "c", "d", "answer", "subject"), range(width - 7, width)))
        body = rows
    out = []
    for row in body:
        if len(row) <= max(col.values()):
            continue
        out.append({"question": row[col["question"]], "choices": [row[col[k]] for k in "abcd"],
                    "answer": row[col["answer"]].strip().upper(),
                    "subject": row[col["subject"]].strip() if "subject" in col else ""})
    return out


class MMMLU(_LetterMCByLanguage):
    """Multilingual MMLU (OpenAI's MMMLU, huggingface.co/datasets/openai/MMMLU): `mmmlu/mmlu_<LANG>.csv`
    (e.g. mmlu_ZH_CN.csv; the dataset's test/ folder is read too), columns [index],Question,A,B,C,D,Answer,
    Subject (the index column, the header's case or the whole header may be missing).

    Protocol: our English MMLU prompt (mmlu.header(subject) + mmlu.item), English header and 'Answer:' over
    the translated question, log-softmax over ' A'..' D'. 0-shot by default (MMMLU has no dev split);
    --shots k puts the first k other rows of the same subject in the same file before the question."""

    name = "mmmlu"
    default_shots = 0
    source = "MMMLU mmmlu/mmlu_<LANG>.csv, https://huggingface.co/datasets/openai/MMMLU"

    def docs(self):
        from ..data import data_dir_file

        self._by_subject, out, langs = {}, [], set()
        for path in data_dir_file(self.data_dir, ("mmmlu/mmlu_*.csv", "mmmlu/test/mmlu_*.csv"), "MMMLU",
                                  self.source):
            lang = path.stem.removeprefix("mmlu_")
            if lang in langs:
                continue  # mmmlu/mmlu_<LANG>.csv already read
            langs.add(lang)
            rows = _mmmlu_rows(path)
            for i, row in enumerate(rows):
                self._by_subject.setdefault((lang, row["subject"]), []).append((i, row))
            out += [{"id": f"{lang}/{i}", "lang": lang, "row": i, "subject": row["subject"],
                     "question": row["question"], "choices": row["choices"], "gold": "ABCD".index(row["answer"])}
                    for i, row in enumerate(rows) if len(row["answer"]) == 1 and row["answer"] in "ABCD"]
        return out

    def prompt(self, doc):
        from .mmlu import header, item

        if self.shots and not hasattr(self, "_by_subject"):
            self.docs()
        pool = [r for i, r in self._by_subject.get((doc["lang"], doc["subject"]), []) if i != doc["row"]
                and len(r["answer"]) == 1 and r["answer"] in "ABCD"] if self.shots else []
        shots = pool[:self.shots]
        if len(shots) < self.shots:
            raise EvalError(f"mmmlu {doc['lang']} has {len(shots)} other questions for {doc['subject']}: "
                            f"expected --shots <= {len(shots)}")
        return (header(doc["subject"] or "various subjects")
                + "".join(item(s["question"], s["choices"], "ABCD".index(s["answer"])) for s in shots)
                + item(doc["question"], doc["choices"]))
