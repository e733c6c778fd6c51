"""Task prompts and scoring against the published formats, with small fixtures and scripted backends."""

import json

import pytest

from qwen15.eval.backends import Backend, GenParams
from qwen15.eval.runner import run_task
from qwen15.eval.tasks import get_task


class Scripted(Backend):
    """Answers by a function of the prompt; records what it was asked."""

    fingerprint = "scripted"

    def __init__(self, answer=None, letters=None, lls=None):
        self.answer, self.letters, self.lls, self.asked = answer, letters, lls, []

    def generate(self, prompt, params):
        self.asked.append((prompt, params))
        return self.answer(prompt, params)

    def letter_logprobs(self, context, letters, prefix=" "):
        self.asked.append((context, prefix))
        return self.letters(context, letters)

    def loglikelihood(self, requests):
        return [self.lls(c, x) for c, x in requests]


def test_mmlu_prompt_is_qwens_format():
    from qwen15.eval.tasks.mmlu import header, item

    text = header("high_school_physics") + item("What is 1+1?", ["1", "2", "3", "4"], 1) + item("Q2?", list("wxyz"))
    assert text == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                    "Question: What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                    "Question: Q2?\nA. w\nB. x\nC. y\nD. z\nAnswer:")


def write_csv(path, header, rows):
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.parametrize("task,split,header", [
    ("ceval", "val", ["id", "question", "A", "B", "C", "D", "answer", "explanation"]),
    ("cmmlu", "test", ["", "Question", "A", "B", "C", "D", "Answer"]),
])
def test_chinese_mc_from_data_dir(tmp_path, task, split, header):
    def row(i, q, ans):
        r = [str(i), q, "甲", "乙", "丙", "丁", ans] + (["解析"] if task == "ceval" else [])
        return r

    dev_name = "computer_network_dev.csv" if task == "ceval" else "computer_network.csv"
    eval_name = f"computer_network_{split}.csv" if task == "ceval" else "computer_network.csv"
    write_csv(tmp_path / "dev" / dev_name, header, [row(i, f"例题{i}", "ABCDA"[i]) for i in range(5)])
    write_csv(tmp_path / split / eval_name, header, [row(i, f"问题{i}", "ABCD"[i % 4]) for i in range(8)])
    gold = {f"问题{i}": "ABCD"[i % 4] for i in range(8)}

    def letters(context, options):  # right on even questions, 'D' otherwise
        q = context.rsplit("问题：", 1)[1].split("\n")[0]
        want = gold[q] if int(q[-1]) % 2 == 0 else ("A" if gold[q] == "D" else "D")
        return [0.0 if x == want else -5.0 for x in options]

    backend = Scripted(letters=letters)
    result = run_task(get_task(task, data_dir=tmp_path), backend, out_dir=tmp_path / "runs", progress=False)
    assert result["metrics"]["accuracy"]["mean"] == pytest.approx(0.5) and result["n"] == 8
    context, prefix = backend.asked[0]
    assert prefix == "" and context.endswith("答案：") and context.count("答案：") == 6
    assert "问题：例题0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n" in context


def test_missing_data_dir_task_names_its_source():
    from qwen15.eval.data import EvalDataError

    with pytest.raises(EvalDataError, match="ceval-exam"):
        get_task("ceval").docs()


def test_bbh_from_data_dir(tmp_path):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    (tmp_path / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": [
        {"input": "not True is", "target": "False"}, {"input": "True and True is", "target": "True"}]}))
    shots = "".join(f"\n\nQ: ex{i}\nA: Let's think step by step.\nSo the answer is True." for i in range(4))
    (tmp_path / "cot-prompts" / "boolean_expressions.txt").write_text(
        "BBH canary\n-----\nEvaluate the result of a random Boolean expression." + shots)

    def answer(prompt, params):
        return "not True is False. So the answer is False." if "not True" in prompt.split("ex3")[-1] else "So the answer is False."

    backend = Scripted(answer=answer)
    result = run_task(get_task("bbh", data_dir=tmp_path), backend, out_dir=tmp_path / "runs", progress=False)
    assert result["metrics"]["accuracy"]["mean"] == 0.5
    prompt, params = backend.asked[0]
    assert prompt.startswith("Evaluate the result") and "ex2" in prompt and "ex3" not in prompt  # 3 shots
    assert prompt.endswith("Q: not True is\nA: Let's think step by step.") and "Q:" in params.stop[-1]


def test_gsm8k_strict_and_flexible():
    task = get_task("gsm8k")
    doc = {"id": "0", "question": "Janet has 16 eggs ...", "answer": "16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18"}
    rec = task.run_one(Scripted(answer=lambda p, g: "9 * 2 = 18 dollars\nThe answer is 18"), doc, task.gen_params())
    assert rec["correct"] and rec["strict_correct"]
    rec = task.run_one(Scripted(answer=lambda p, g: "she makes 18 dollars"), doc, task.gen_params())
    assert rec["correct"] and not rec["strict_correct"]
    assert rec["prompt"].count("Let's think step by step") == 9 and rec["prompt"].endswith(
        "Question: Janet has 16 eggs ...\nLet's think step by step\n")
    assert task.gen_params().stop == ["\n\n", "Question:"]


def test_continuation_mc_acc_norm_differs_from_acc():
    from qwen15.eval.tasks.base import MultipleChoiceContinuations

    class Toy(MultipleChoiceContinuations):
        name = "toy"

        def prompt(self, doc):
            return "Q:"

    doc = {"id": "0", "choices": ["a", "a much longer right answer"], "gold": 1}
    # total logprob favours the short choice; per byte the long one wins
    rec = Toy().run_one(Scripted(lls=lambda c, x: -2.0 if len(x) < 5 else -10.0), doc, GenParams())
    assert rec["acc"] == 0.0 and rec["acc_norm"] == 1.0


@pytest.mark.parametrize("text,rating", [("Good. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("score [6]", 6.0),
                                         ("Rating: 9", 9.0), ("Rating: 11", -1.0), ("no rating", -1.0)])
def test_mt_bench_rating_parser(text, rating):
    from qwen15.eval.tasks.judged import parse_rating

    assert parse_rating(text) == rating


class FakeJudge:
    def __init__(self, reply):
        self.reply, self.asked = reply, []

    def generate(self, messages, params):
        self.asked.append((messages, params))
        return self.reply(messages)


def test_mt_bench_temperatures_references_and_score(monkeypatch, tmp_path):
    from qwen15.eval import data

    questions = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
                 {"question_id": 111, "category": "math", "turns": ["2+2?", "times 3?"]}]
    prompts = {n: {"system_prompt": f"SYS {n}", "prompt_template": "Q={question_1} A={answer_1} REF={ref_answer_1}"}
               for n in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")}
    monkeypatch.setattr(data, "mt_bench", lambda: (questions, {111: ["4", "12"]}, prompts))
    task = get_task("mt_bench", judge_url="http://judge.invalid")
    judge = FakeJudge(lambda m: "Rating: [[9]]" if "math" in m[0]["content"] else "[[5]]")
    task._judge = judge
    model = Scripted(answer=lambda p, g: f"answer at T={g.temperature}")
    result = run_task(task, model, out_dir=tmp_path, progress=False)
    temps = [g.temperature for _, g in model.asked]
    assert temps == [0.7, 0.7, 0.0, 0.0]  # FastChat's per-category temperatures
    assert isinstance(model.asked[1][0], list) and model.asked[1][0][1]["role"] == "assistant"  # second turn sees the first
    math_prompts = [m for m, _ in judge.asked if m[0]["content"].startswith("SYS single-math")]
    assert len(math_prompts) == 2 and "REF=4" in math_prompts[0][1]["content"]
    assert result["metrics"]["score"]["mean"] == pytest.approx(7.0)  # (5 + 5 + 9 + 9) / 4


def test_judged_task_without_judge_is_one_line_error():
    from qwen15.errors import EvalError

    with pytest.raises(EvalError, match="--judge-url"):
        get_task("alpaca_eval").judge()


def test_alpaca_eval_length_controlled_win_rate(tmp_path):
    import random

    rng = random.Random(0)
    rows = [{"instruction": f"task {i}", "output": "b" * rng.randint(50, 150)} for i in range(60)]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(rows))
    task = get_task("alpaca_eval", data_dir=tmp_path, judge_url="http://judge.invalid")

    def longer(messages):  # a judge that always prefers the longer output
        text = messages[0]["content"]
        a = text.split("## Output A\n")[1].split("\n\n## Output B")[0]
        b = text.split("## Output B\n")[1].split("\n\nWhich output")[0]
        return "[[A]]" if len(a) >= len(b) else "[[B]]"

    task._judge = FakeJudge(longer)
    model = Scripted(answer=lambda p, g: "o" * rng.randint(60, 200))  # usually longer than the baseline
    m = run_task(task, model, out_dir=tmp_path / "runs", progress=False)["metrics"]
    assert m["win_rate"]["mean"] > 0.6
    assert m["lc_win_rate"]["mean"] < m["win_rate"]["mean"] - 0.1  # the length advantage is taken out


def test_gpqa_shuffles_options_and_keeps_gold(tmp_path):
    import csv

    with open(tmp_path / "gpqa_main.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        for i in range(12):
            w.writerow([f"q{i}", f"right{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c"])
    task = get_task("gpqa", data_dir=tmp_path)
    docs = task.docs()
    assert len(docs) == 7  # 5 exemplars held out
    assert all(d["choices"][d["gold"]].startswith("right") for d in docs)
    assert len({d["gold"] for d in docs}) > 1  # the right answer is not always first

    def letters(context, options):
        body = context.rsplit("Question: ", 1)[1]
        right = next(line[0] for line in body.splitlines() if "right" in line)
        return [0.0 if x == right else -3.0 for x in options]

    result = run_task(task, Scripted(letters=letters), out_dir=tmp_path / "runs", progress=False)
    assert result["metrics"]["accuracy"]["mean"] == 1.0


def test_theoremqa_answer_types(tmp_path):
    from qwen15.eval.tasks.theoremqa import equivalent, extract

    assert extract("so x = 2. Therefore, the answer is 3.14.") == "3.14"
    assert equivalent("3.141", 3.14, "float") and not equivalent("3.3", 3.14, "float")
    assert equivalent("[1, 2, 3]", [1, 2, 3], "list of integer") and not equivalent("[1, 2]", [1, 2, 3], "list of integer")
    assert equivalent("True", True, "bool") and not equivalent("False", True, "bool")
    assert equivalent("\\frac{1}{2}", "0.5", "option") is True


def test_flores_bleu_and_mgsm_per_language(tmp_path):
    import sacrebleu

    d = tmp_path / "flores200" / "devtest"
    d.mkdir(parents=True)
    (d / "eng_Latn.devtest").write_text("The cat sits on the mat.\nIt is raining today.\n")
    (d / "fra_Latn.devtest").write_text("Le chat est assis sur le tapis.\nIl pleut aujourd'hui.\n")
    outputs = {"The cat sits on the mat.": "Le chat est sur le tapis.", "It is raining today.": "Il pleut aujourd'hui."}
    backend = Scripted(answer=lambda p, g: " " + outputs[p.split("English: ")[1].split("\n")[0]] + "\n")
    result = run_task(get_task("flores", data_dir=tmp_path), backend, out_dir=tmp_path / "runs", progress=False)
    expected = sacrebleu.corpus_bleu(["Le chat est sur le tapis.", "Il pleut aujourd'hui."],
                                     [["Le chat est assis sur le tapis.", "Il pleut aujourd'hui."]]).score / 100
    assert result["metrics"]["bleu"]["mean"] == pytest.approx(expected) and 0 < expected < 1

    m = tmp_path / "mgsm"
    m.mkdir()
    (m / "mgsm_de.tsv").write_text("Wie viel ist 2+2?\t4\nWie viel ist 3+3?\t6\n")
    (m / "mgsm_zh.tsv").write_text("2+5等于多少？\t7\n")
    backend = Scripted(answer=lambda p, g: "The answer is 4" if "2+2" in p.rsplit("Question:", 1)[1] else "The answer is 7")
    metrics = run_task(get_task("mgsm", data_dir=tmp_path), backend, out_dir=tmp_path / "runs", progress=False)["metrics"]
    assert metrics["accuracy_de"]["mean"] == 0.5 and metrics["accuracy_zh"]["mean"] == 1.0
    assert metrics["accuracy"]["mean"] == pytest.approx(0.75)  # the mean over languages


def test_xcopa_xwinograd_belebele_requests(tmp_path):
    (tmp_path / "xcopa").mkdir()
    (tmp_path / "xcopa" / "test.it.jsonl").write_text(json.dumps(
        {"premise": "L'uomo aprì il rubinetto.", "choice1": "Il gabinetto si riempì d'acqua.",
         "choice2": "L'acqua scorreva dal beccuccio.", "question": "effect", "label": 1}) + "\n")
    seen = []

    def lls(ctx, cont):
        seen.append((ctx, cont))
        return -1.0 if "scorreva" in cont else -5.0

    result = run_task(get_task("xcopa", data_dir=tmp_path), Scripted(lls=lls), out_dir=tmp_path / "r", progress=False)
    assert result["metrics"]["accuracy_it"]["mean"] == 1.0
    assert seen[0] == ("L'uomo aprì il rubinetto quindi", " il gabinetto si riempì d'acqua.")

    (tmp_path / "xwinograd").mkdir()
    (tmp_path / "xwinograd" / "en.jsonl").write_text(json.dumps(
        {"sentence": "The trophy doesn't fit into the suitcase because the _ is too small.",
         "option1": "trophy", "option2": "suitcase", "answer": "2"}) + "\n")
    seen.clear()
    result = run_task(get_task("xwinograd", data_dir=tmp_path),
                      Scripted(lls=lambda c, x: seen.append((c, x)) or (-1.0 if c.endswith("suitcase") else -2.0)),
                      out_dir=tmp_path / "r", progress=False)
    assert result["metrics"]["accuracy"]["mean"] == 1.0
    assert seen[0] == ("The trophy doesn't fit into the suitcase because the trophy", " is too small.")

    (tmp_path / "belebele").mkdir()
    (tmp_path / "belebele" / "fra_Latn.jsonl").write_text(json.dumps(
        {"flores_passage": "Le chat dort.", "question": "Que fait le chat ?", "mc_answer1": "Il mange",
         "mc_answer2": "Il dort", "mc_answer3": "Il court", "mc_answer4": "Il chante", "correct_answer_num": "2"}) + "\n")
    backend = Scripted(letters=lambda c, o: [0.0 if x == "B" else -1.0 for x in o])
    result = run_task(get_task("belebele", data_dir=tmp_path), backend, out_dir=tmp_path / "r", progress=False)
    assert result["metrics"]["accuracy_fra_Latn"]["mean"] == 1.0
    assert backend.asked[0][0] == "P: Le chat dort.\nQ: Que fait le chat ?\nA. Il mange\nB. Il dort\nC. Il court\nD. Il chante\nAnswer:"


def test_pawsx_lm_eval_requests_and_per_language(tmp_path):
    d = tmp_path / "pawsx" / "de"
    d.mkdir(parents=True)
    (d / "test_2k.tsv").write_text(
        "id\tsentence1\tsentence2\tlabel\n"
        "1\tDer Hund bellt .\tDer Hund bellt laut.\t1\n"
        "2\tSie sagte \"ja\" , dann ging sie;\tSie ging.\t0\n"
        "3\tOhne zweiten Satz.\t\t1\n", encoding="utf-8")
    (tmp_path / "pawsx" / "de.jsonl").write_text(json.dumps(  # the TSV wins for de
        {"id": 9, "sentence1": "ignored", "sentence2": "ignored", "label": 1}) + "\n")
    (tmp_path / "pawsx" / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 1, "sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1},
        {"id": 2, "sentence1": "It is n't late", "sentence2": "It is early.", "label": 1}]))
    task = get_task("pawsx", data_dir=tmp_path)
    docs = task.docs()
    assert [d["id"] for d in docs] == ["de/0", "de/1", "en/0", "en/1"]  # empty sentence2 skipped, de.jsonl unread
    assert [d["gold"] for d in docs] == [1, 0, 1, 1]
    assert docs[0]["requests"] == [("Der Hund bellt, richtig?", " Nein, der Hund bellt laut."),
                                   ("Der Hund bellt, richtig?", " Ja, der Hund bellt laut.")]
    # lm-eval's general_detokenize, quirks included (' "' -> '"'); the final ';' goes
    assert docs[1]["requests"][1] == ('Sie sagte"ja", dann ging sie, richtig?', " Ja, sie ging.")
    assert docs[3]["requests"][0] == ("It isn't late, right?", " No, it is early.")

    seen = []

    def lls(ctx, cont):  # a model that always says yes
        seen.append((ctx, cont))
        return -1.0 if cont.startswith((" Ja,", " Yes,")) else -4.0

    metrics = run_task(task, Scripted(lls=lls), out_dir=tmp_path / "r", progress=False)["metrics"]
    assert metrics["accuracy_de"]["mean"] == 0.5 and metrics["accuracy_en"]["mean"] == 1.0
    assert metrics["accuracy"]["mean"] == pytest.approx(0.75)
    assert len(seen) == 8 and seen[0] == ("Der Hund bellt, richtig?", " Nein, der Hund bellt laut.")


def test_pawsx_language_words():
    from qwen15.eval.tasks.multilingual import PAWSX_WORDS

    assert PAWSX_WORDS["zh"] == ("对吧", "是", "不是") and PAWSX_WORDS["fr"] == ("n'est-ce pas", "Oui", "Non")
    assert set(PAWSX_WORDS) == {"en", "de", "es", "fr", "ja", "ko", "zh"}


def _m3exam_question(text, options, answer, **extra):
    return {"question_text": text, "options": options, "answer_text": answer, "background_description": [],
            "need_image": "no", "language": "english", "level": "mid", "subject_category": "social-science",
            **extra}


def test_m3exam_parsing_prompt_and_per_language(tmp_path):
    (tmp_path / "m3exam" / "chinese").mkdir(parents=True)
    (tmp_path / "m3exam" / "english-questions-test.json").write_text(json.dumps([
        _m3exam_question("Which Civil War event occurred first?",
                         ["(1) battle of Gettysburg", "(2) firing on Fort Sumter", "(3) assassination of Lincoln",
                          "(4) Emancipation Proclamation"], "2",
                         background_description=["Read this first.", "Then answer."]),
        _m3exam_question("What is in the picture?", ["(1) a cat", "(2) a dog"], "1", need_image="yes"),
        _m3exam_question("Pick the vowel.", ["A. b", "B. c", "C. d", "D. f", "E. e"], "E"),
        _m3exam_question("How heavy is it?", ["1.5 kg", "2 kg", "3 kg"], "1"),
    ]))
    (tmp_path / "m3exam" / "chinese" / "chinese-questions-test.json").write_text(json.dumps([
        _m3exam_question("哪个是水果？", ["A．石头", "B．苹果", "C．铁"], "B", language="chinese")]), encoding="utf-8")
    task = get_task("m3exam", data_dir=tmp_path)
    docs = task.docs()
    assert [d["id"] for d in docs] == ["english/0", "english/2", "english/3", "chinese/0"]  # need_image skipped
    assert [d["gold"] for d in docs] == [1, 4, 0, 1]
    assert docs[0]["choices"][1] == "firing on Fort Sumter" and docs[1]["choices"] == list("bcdfe")
    assert docs[2]["choices"][0] == "1.5 kg" and docs[3]["choices"] == ["石头", "苹果", "铁"]

    asked = []

    def letters(context, options):  # always 'B'
        asked.append((context, list(options)))
        return [0.0 if x == "B" else -3.0 for x in options]

    metrics = run_task(task, Scripted(letters=letters), out_dir=tmp_path / "r", progress=False)["metrics"]
    assert metrics["accuracy_english"]["mean"] == pytest.approx(1 / 3)
    assert metrics["accuracy_chinese"]["mean"] == 1.0
    assert metrics["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert asked[0][0] == ("Read this first.\nThen answer.\nWhich Civil War event occurred first?\n"
                           "A. battle of Gettysburg\nB. firing on Fort Sumter\nC. assassination of Lincoln\n"
                           "D. Emancipation Proclamation\nAnswer:")
    assert [len(o) for _, o in asked] == [4, 5, 3, 3]  # letters over each question's own options


def test_m3exam_shots_from_dev_file(tmp_path):
    (tmp_path / "m3exam").mkdir()
    (tmp_path / "m3exam" / "english-questions-test.json").write_text(json.dumps([
        _m3exam_question("Q test?", ["(1) a", "(2) b"], "1")]))
    with pytest.raises(Exception, match="english-questions-dev.json"):
        get_task("m3exam", data_dir=tmp_path, shots=1).docs()
    (tmp_path / "m3exam" / "english-questions-dev.json").write_text(json.dumps([
        _m3exam_question("Other level?", ["(1) x", "(2) y"], "1", level="low"),
        _m3exam_question("Q dev?", ["(1) x", "(2) y"], "2")]))
    task = get_task("m3exam", data_dir=tmp_path, shots=1)
    doc = task.docs()[0]
    assert task.prompt(doc) == "Q dev?\nA. x\nB. y\nAnswer: B\n\nQ test?\nA. a\nB. b\nAnswer:"


def test_mmmlu_csv_layouts_prompt_and_per_language(tmp_path):
    rows = [("What is 2+2?", "3", "4", "5", "6", "B", "elementary_mathematics"),
            ("Capital of France?", "Paris", "Rome", "Oslo", "Bern", "A", "high_school_geography"),
            ("What is 3+3?", "6", "7", "8", "9", "A", "elementary_mathematics")]
    write_csv(tmp_path / "mmmlu" / "mmlu_ZH_CN.csv", ["", "Question", "A", "B", "C", "D", "Answer", "Subject"],
              [(str(i),) + r for i, r in enumerate(rows)])
    write_csv(tmp_path / "mmmlu" / "mmlu_DE_DE.csv", ["question", "a", "b", "c", "d", "answer", "subject"],
              rows[:2])  # no index column, lower-case header
    write_csv(tmp_path / "mmmlu" / "mmlu_FR_FR.csv", ["0"] + list(rows[0]), [(str(i),) + r for i, r in
                                                                             enumerate(rows[1:], 1)])  # no header
    task = get_task("mmmlu", data_dir=tmp_path)
    assert task.shots == 0
    docs = task.docs()
    assert [d["id"] for d in docs] == ["DE_DE/0", "DE_DE/1", "FR_FR/0", "FR_FR/1", "FR_FR/2",
                                       "ZH_CN/0", "ZH_CN/1", "ZH_CN/2"]
    assert [d["gold"] for d in docs] == [1, 0, 1, 0, 0, 1, 0, 0]
    assert docs[0]["choices"] == ["3", "4", "5", "6"] and docs[1]["subject"] == "high_school_geography"
    assert task.prompt(docs[0]) == ("The following are multiple choice questions (with answers) about elementary "
                                    "mathematics.\n\nQuestion: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")

    backend = Scripted(letters=lambda c, o: [0.0 if x == "A" else -2.0 for x in o])  # always 'A'
    metrics = run_task(task, backend, out_dir=tmp_path / "r", progress=False)["metrics"]
    assert metrics["accuracy_DE_DE"]["mean"] == 0.5
    assert metrics["accuracy_FR_FR"]["mean"] == pytest.approx(2 / 3)
    assert metrics["accuracy_ZH_CN"]["mean"] == pytest.approx(2 / 3)
    assert metrics["accuracy"]["mean"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert all(prefix == " " for _, prefix in backend.asked)

    shot = get_task("mmmlu", data_dir=tmp_path, shots=1)
    zh = [d for d in shot.docs() if d["lang"] == "ZH_CN"]
    # the first other row of the same subject: row 2 for row 0, row 0 for row 2
    assert "Question: What is 3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer: A\n\nQuestion: What is 2+2?" in shot.prompt(zh[0])
    assert "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\nQuestion: What is 3+3?" in shot.prompt(zh[2])
    with pytest.raises(Exception, match="--shots <= 0"):
        shot.prompt(zh[1])  # geography has no other question


@pytest.mark.parametrize("task,pattern", [("pawsx", "pawsx/*/test_2k.tsv"), ("pawsx", "pawsx/*.jsonl"),
                                          ("m3exam", "m3exam/*-questions-test.json"),
                                          ("mmmlu", "mmmlu/mmlu_*.csv")])
def test_multilingual_missing_data_names_expected_files(tmp_path, task, pattern):
    import re

    from qwen15.eval.data import EvalDataError

    with pytest.raises(EvalDataError, match=re.escape(pattern)):
        get_task(task).docs()
    with pytest.raises(EvalDataError, match="data not found: expected .*" + re.escape(pattern)):
        get_task(task, data_dir=tmp_path).docs()
