"""GSM8K (Cobbe et al. 2021), test 1,319: Qwen's 8-shot chain of thought, greedy; strict and flexible match."""

from __future__ import annotations

from ..backends import GenParams
from ..scoring import gsm8k_extract, gsm8k_gold
from ...errors import EvalError
from .base import Task, ask

# The 8 chain-of-thought exemplars of Wei et al. (2022), as every GSM8K harness uses them.
EXEMPLARS = [
    ('There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?',
     'There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6.',
     '6'),
    ('If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?',
     'There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.',
     '5'),
    ('Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?',
     'Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39.',
     '39'),
    ('Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?',
     'Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.',
     '8'),
    ('Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?',
     'Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.',
     '9'),
    ('There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?',
     'There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29.',
     '29'),
    ('Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?',
     'Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls.',
     '33'),
    ('Olivia has $23. She bought five bagels for $3 each. How much money does she have left?',
     'Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8.',
     '8'),
]


def item(question: str, reasoning: str | None = None, answer: str | None = None) -> str:
    text = f"Question: {question}\nLet's think step by step\n"
    if reasoning is not None:
        text += f"{reasoning}\nThe answer is {answer}\n\n"
    return text


class GSM8K(Task):
    name = "gsm8k"
    metric = "flexible"
    default_shots = 8

    def docs(self):
        from .. import data

        return [{**d, "id": str(d.get("id", i))} for i, d in enumerate(data.gsm8k())]

    def gen_params(self):
        return GenParams(max_tokens=512, stop=["\n\n", "Question:"])

    def prompt(self, doc):
        if self.shots > len(EXEMPLARS):
            raise EvalError(f"gsm8k has {len(EXEMPLARS)} exemplars: expected --shots <= {len(EXEMPLARS)}")
        return "".join(item(*ex) for ex in EXEMPLARS[:self.shots]) + item(doc["question"])

    def run_one(self, backend, doc, gen):
        prompt = self.prompt(doc)
        output = ask(backend, prompt, gen, self.chat)
        gold = gsm8k_gold(doc["answer"])
        got = gsm8k_extract(output)
        return {"prompt": prompt, "output": output, "extracted": got["flexible"], "strict": got["strict"],
                "gold": gold, "correct": got["flexible"] == gold, "strict_correct": got["strict"] == gold}

    def aggregate(self, records):
        n = max(1, len(records))
        return {"flexible": sum(r["correct"] for r in records) / n,
                "strict": sum(r["strict_correct"] for r in records) / n}
