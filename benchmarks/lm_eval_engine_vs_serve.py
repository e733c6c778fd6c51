"""ARC-Easy through lm-evaluation-harness against `qwen15 serve`, and in process (`qwen15 eval`'s engine backend).

    python benchmarks/lm_eval_engine_vs_serve.py --limit 200 --concurrent 8 --out /tmp/arc200
    # or the two halves at once (then --phase report): --phase engine / --phase serve

Scores every (question, choice) pair of the first --limit ARC-Easy validation questions (`qwen15 eval fetch`
data; prompt "Question: ...\\nAnswer:", continuation " <choice>") twice: with lm-eval's `local-completions`
model class against a `qwen15 serve` it starts (tokenized_requests True and/or False, --concurrent requests in
flight, so the server batches them), and with EngineBackend in this process. Accuracy is lm-eval's `acc`
(the choice with the highest log-likelihood). Prints accuracies, how many pairs' log-likelihoods differ
(by more than --atol) and the largest difference; --json writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from eval_engine_vs_serve import wait_for  # the same start-up wait (this folder is on sys.path for a script)


def accuracy(lls: list[float], docs: list[dict]) -> float:
    right, i = 0, 0
    for d in docs:
        n = len(d["choices"]["text"])
        best = max(range(n), key=lambda k: lls[i + k])
        right += d["choices"]["label"][best] == d["answerKey"]
        i += n
    return right / len(docs)


def serve(args, path, requests) -> dict:
    """lm-eval's local-completions against a `qwen15 serve` started here: {mode: {loglikelihoods, seconds}}."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    key = "sk-bench"
    os.environ["OPENAI_API_KEY"] = key
    cmd = [sys.executable, "-m", "qwen15.cli", "serve", "--model", str(path), "--port", str(args.port),
           "--quant", args.quant, "--threads", str(args.threads), "--api-key", key, "--max-batch", "16",
           "--served-model-name", "qwen"]
    server = subprocess.Popen(cmd)
    out = {}
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_for(url, server)
        for mode in args.modes.split(","):
            lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="qwen",
                                     tokenized_requests=mode == "tokenized", num_concurrent=args.concurrent,
                                     max_retries=1, timeout=3600)
            t0 = time.perf_counter()
            got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                                   disable_tqdm=True)
            out[mode] = {"loglikelihoods": [ll for ll, _ in got], "seconds": time.perf_counter() - t0}
            print(f"{mode}: {out[mode]['seconds']:.0f} s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return out


def report(args, docs, requests) -> None:
    with open(args.out + ".engine.json") as f:
        engine = json.load(f)
    with open(args.out + ".serve.json") as f:
        served = json.load(f)
    ref = engine["loglikelihoods"]
    result = {"model": args.model, "quant": args.quant, "documents": len(docs), "pairs": len(requests),
              "engine": {"acc": accuracy(ref, docs), "seconds": engine["seconds"]}, "serve": {}}
    print(f"engine (in process): acc {result['engine']['acc']:.4f}, {engine['seconds']:.0f} s")
    for mode, run in served.items():
        got = run["loglikelihoods"]
        diffs = [abs(a - b) for a, b in zip(got, ref)]
        differ_docs, i = 0, 0
        for d in docs:
            n = len(d["choices"]["text"])
            differ_docs += max(diffs[i:i + n]) > args.atol
            i += n
        r = result["serve"][mode] = {"acc": accuracy(got, docs), "seconds": run["seconds"],
                                     "pairs_differing": sum(x > args.atol for x in diffs),
                                     "documents_differing": differ_docs, "max_abs_diff": max(diffs)}
        print(f"lm-eval local-completions ({mode}): acc {r['acc']:.4f}, {r['pairs_differing']} of {len(requests)} "
              f"pairs ({differ_docs} of {len(docs)} documents) differ by > {args.atol}, max |diff| "
              f"{r['max_abs_diff']:.2e}, {r['seconds']:.0f} s")
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--quant", default="gguf", help="the server's --quant (and the engine's)")
    ap.add_argument("--modes", default="tokenized,text", help="lm-eval tokenized_requests: tokenized and/or text")
    ap.add_argument("--concurrent", type=int, default=8, help="lm-eval num_concurrent")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18432)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--out", default="arc", help="results: OUT.engine.json, OUT.serve.json, OUT.json")
    ap.add_argument("--phase", choices=("all", "engine", "serve", "report"), default="all")
    args = ap.parse_args()

    import torch

    from qwen15 import LLM
    from qwen15.eval import data
    from qwen15.eval.backends import EngineBackend
    from qwen15.weights.resolve import resolve_model

    torch.set_num_threads(args.threads)
    docs = data.arc_easy()[:args.limit]
    requests = [(f"Question: {d['question']}\nAnswer:", f" {c}") for d in docs for c in d["choices"]["text"]]
    path = resolve_model(args.model)

    if args.phase in ("all", "engine"):
        t0 = time.perf_counter()
        engine = EngineBackend(LLM.load(path, quant=args.quant)).loglikelihood(requests)
        with open(args.out + ".engine.json", "w") as f:
            json.dump({"seconds": time.perf_counter() - t0, "loglikelihoods": engine}, f)
    if args.phase in ("all", "serve"):
        served = serve(args, path, requests)
        with open(args.out + ".serve.json", "w") as f:
            json.dump(served, f)
    if args.phase in ("all", "report"):
        report(args, docs, requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
