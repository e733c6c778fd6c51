"""Independent check of the MMLU letter scoring: recompute the logged letter log-probs with transformers.

    python benchmarks/eval_mmlu_vs_transformers.py benchmarks/results/eval/runs/mmlu-<key>.jsonl 6
"""

import json, glob, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
path = glob.glob('/root/.cache/qwen15/models/qwen2.5-coder-0.5b-instruct/*.gguf')[0]
import os
d, f = os.path.dirname(path), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
recs = sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda r: len(r["prompt"]))[:int(sys.argv[2])]
letters = [tok.encode(" " + x, add_special_tokens=False)[0] for x in "ABCD"]
agree = 0
for r in recs:
    ids = tok.encode(r["prompt"], add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    lp = torch.log_softmax(logits[letters].double(), 0).tolist()
    ours = [r["output"][x] for x in "ABCD"]
    agree += "ABCD"[max(range(4), key=lp.__getitem__)] == r["extracted"]
    print(r["id"], "hf", [round(x, 3) for x in lp], "ours", ours)
print(f"argmax agreement {agree}/{len(recs)}")
