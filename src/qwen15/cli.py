"""The `qwen15` command: presets, pull, generate, chat, bench, plan, serve, eval."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GenerationError, Qwen15Error

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
TP_HELP = ("shard the model over N processes on this machine (tensor parallelism, --quant none); "
           "under torchrun, leave it out: the ranks torchrun started")


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESETS

    rows = []
    for name, c in PRESETS.items():
        rows.append({
            "name": name, "params": c.num_parameters(), "active_params": c.num_parameters(active=True),
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "tied_embeddings": c.tie_word_embeddings,
            "experts": c.num_experts, "experts_per_token": c.num_experts_per_tok,
        })
    if args.json:
        print(json.dumps(rows))
        return 0
    header = ["name", "params", "active", "hidden", "inter", "layers", "heads/kv", "vocab", "rope_theta", "tied"]
    table = [header] + [[
        r["name"], _fmt_params(r["params"]), _fmt_params(r["active_params"]), str(r["hidden_size"]),
        str(r["intermediate_size"]), str(r["layers"]), f"{r['heads']}/{r['kv_heads']}", str(r["vocab_size"]),
        f"{r['rope_theta']:.0e}", "yes" if r["tied_embeddings"] else "no"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .weights.resolve import resolve_model

    path = resolve_model(args.name)
    print(path)
    return 0


def _precheck(args: argparse.Namespace) -> None:
    """Device, threads and context are checked first: without importing torch, and before any load."""
    from .checks import check_device, check_positive

    check_device(args.device)
    check_positive("--threads", args.threads)
    check_positive("--context", getattr(args, "context", None))
    if getattr(args, "quant", None) == "int8":
        from .weights.packaged import PACKAGED_MODELS

        model = str(args.model or DEFAULT_MODEL)
        if model.lower() in PACKAGED_MODELS or model.endswith(".gguf"):
            # Rounding a GGUF's already quantized values again adds a second error (and took 33 s on the
            # 1.5B); gguf-int8 gives the same int8 arithmetic without loss.
            raise GenerationError(f"--quant int8 quantizes dense (safetensors) checkpoints, and {model} is a GGUF: "
                                  f"use --quant gguf-int8 (its blocks as int8, lossless) or gguf")


def _sampling(args: argparse.Namespace, chat: bool):
    from .engine.sampling import SamplingParams

    base = SamplingParams.chat_defaults() if (chat and args.temperature is None) else SamplingParams()
    overrides = {k: v for k, v in {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed, "max_tokens": args.max_tokens,
    }.items() if v is not None}
    if args.stop:
        overrides["stop"] = list(args.stop)
    fields = {**base.__dict__, **overrides}
    return SamplingParams(**fields)


def _load(args: argparse.Namespace):
    from .engine.engine import LLM

    if getattr(args, "lora", None):
        from .lora import read_adapter

        read_adapter(args.lora)  # a bad adapter directory fails before the (slow) load
    llm = LLM.load(args.model, device=args.device, threads=args.threads, context_length=args.context,
                   compile=False if args.no_compile else None, quant=args.quant, tp=args.tp)
    if getattr(args, "lora", None):  # unmerged: over a GGUF base, LoRA runs beside the compact matrices
        from .lora import load_adapter

        load_adapter(llm.model, args.lora)
    if getattr(args, "draft", None):
        llm.attach_draft(LLM.load(args.draft, device=args.device, context_length=args.context, quant=args.quant),
                         tokens=args.draft_tokens)
    return llm


def _check_max_tokens(args: argparse.Namespace, context: int | None, prompt_tokens: int = 0) -> None:
    """--max-tokens past the context window is refused, as the server refuses it (not silently cut)."""
    if context is not None and context < 1:
        return  # LLM.load names the bad --context itself
    if args.max_tokens is not None and context is not None and max(prompt_tokens, 1) + args.max_tokens > context:
        room = f"{context - prompt_tokens} with this {prompt_tokens}-token prompt" if prompt_tokens else context - 1
        raise GenerationError(f"--max-tokens {args.max_tokens} does not fit the context window of {context} "
                              f"tokens: expected at most {room}")


def cmd_generate(args: argparse.Namespace) -> int:
    _precheck(args)
    _check_max_tokens(args, args.context)
    params = _sampling(args, args.chat)  # bad values fail before the (slow) load
    llm = _load(args)
    _check_max_tokens(args, llm.context_length, len(llm.encode_prompt(args.prompt, args.chat)))
    stream = not args.json and not args.no_stream

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = llm.generate(args.prompt, chat=args.chat, params=params, on_text=show if stream else None)
    if stream:
        print()
    elif not args.json:
        print(result.text)
    summary = {
        "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
        "load_s": round(result.load_s, 3), "prefill_s": round(result.prefill_s, 3),
        "decode_tok_s": round(result.decode_tok_s, 2),
    }
    if result.drafted:
        summary["acceptance_rate"] = round(result.acceptance_rate, 4)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        accept = f", draft acceptance {result.acceptance_rate:.0%}" if result.drafted else ""
        print(f"[{len(result.token_ids)} tokens, {result.finish_reason}; load {result.load_s:.1f}s, "
              f"decode {result.decode_tok_s:.1f} tok/s{accept}]", file=sys.stderr)
    return 0


CHAT_HELP = "/reset  clear the conversation\n/help   this list\n/exit   quit (also /quit, Ctrl-D)"


def cmd_chat(args: argparse.Namespace) -> int:
    _precheck(args)
    _check_max_tokens(args, args.context)
    params = _sampling(args, chat=True)
    llm = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qwen15 chat with {llm.name}. /help lists commands, /reset clears, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if text == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": line})
        try:
            result = llm.generate(messages, params=params,
                                  on_text=lambda p: (sys.stdout.write(p), sys.stdout.flush()))
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            if args.tp and args.tp > 1:
                raise  # other ranks may be inside this step's collectives: end them all
            print("\n(interrupted)", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": result.text})


def cmd_bench(args: argparse.Namespace) -> int:
    _precheck(args)
    from .engine.bench import as_dict, run_bench

    for name in ("prompt_tokens", "gen_tokens"):
        if getattr(args, name) < 1:
            raise GenerationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, args.threads, args.device,
                       draft=args.draft, draft_tokens=args.draft_tokens, quant=args.quant, tp=args.tp,
                       random_weights=args.random_weights)
    row = as_dict(result)
    if args.json:
        print(json.dumps(row))
    else:
        shown = {k: v for k, v in row.items() if v is not None}  # no draft: no draft rows
        width = max(map(len, shown))
        for key, value in shown.items():
            print(f"{key:>{width}}  {value}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_plan, make_plan

    plan = make_plan(args.model, quant=args.quant, context=args.context, batch=args.batch,
                     gpu_mem_gb=args.gpu_mem, device=args.device, tp=args.tp)
    print(json.dumps(plan.as_dict()) if args.json else format_plan(plan))
    return 0


def _lora_specs(specs: list[str], base_name: str) -> dict[str, str]:
    """--lora NAME=DIR values -> {NAME: DIR}, each directory checked before the model loads."""
    from .lora import read_adapter

    out: dict[str, str] = {}
    for spec in specs:
        lora_name, sep, path = spec.partition("=")
        if not sep or not lora_name.strip() or not path.strip():
            raise GenerationError(f"--lora {spec!r}: expected NAME=DIR (the model name clients send, and a PEFT "
                                  "adapter directory)")
        lora_name = lora_name.strip()
        if lora_name == base_name or lora_name in out:
            raise GenerationError(f"--lora {spec!r}: the name {lora_name!r} is already served: each adapter needs "
                                  "its own name")
        read_adapter(path)
        out[lora_name] = path
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    _precheck(args)
    for name in ("port", "max_batch", "max_queue", "token_budget", "kv_tokens", "block_size"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise GenerationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    name = args.served_model_name or str(args.model or DEFAULT_MODEL).rstrip("/").split("/")[-1].removesuffix(".gguf")
    adapters = _lora_specs(args.lora or [], name)
    from .checks import check_port_free

    check_port_free(args.host, args.port)  # before the load, not after it
    from .engine.engine import LLM
    from .serve.app import ServerConfig, serve

    llm = LLM.load(args.model, device=args.device, threads=args.threads, context_length=args.context,
                   compile=False, quant=args.quant, tp=args.tp)
    if adapters:
        from .lora import load_adapter

        for lora_name, path in adapters.items():
            load_adapter(llm.model, path, name=lora_name, activate=False)
    config = ServerConfig(model_name=name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                          token_budget=args.token_budget, kv_tokens=args.kv_tokens, block_size=args.block_size,
                          ui=not args.no_ui, adapters=adapters)
    print(f"qwen15 serve: {name} on http://{args.host}:{args.port}/v1 (loaded in {llm.load_s:.1f}s)",
          file=sys.stderr, flush=True)
    if config.ui:
        print(f"qwen15 serve: chat page at http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    serve(llm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_train_merge(sub) -> None:
    """`qwen15 train merge`, joining the `train` group where train/cli.py made it, else making it."""
    import argparse as ap

    from .train.merge import TYPES, cmd_merge

    train = sub.choices.get("train") or sub.add_parser("train", help="fine-tune and merge adapters")
    tsub = next((a for a in train._actions if isinstance(a, ap._SubParsersAction)), None) \
        or train.add_subparsers(dest="train_command", required=True)
    p = tsub.add_parser("merge", help="fold a LoRA adapter into its base: an HF directory, or a .gguf file")
    p.add_argument("--model", default=None, help=f"the adapter's base (default: {DEFAULT_MODEL}); a GGUF is "
                                                 "dequantized to float for the merge")
    p.add_argument("--adapter", required=True, help="PEFT LoRA directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output: a directory (Hugging Face checkpoint) or a file ending in .gguf")
    p.add_argument("--type", choices=TYPES, default=None,
                   help="weight type (default: bf16 for a directory, f16 for .gguf; q8_0 only for .gguf)")
    p.set_defaults(func=cmd_merge)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"packaged name, hub name (Qwen/Qwen1.5-0.5B-Chat), local directory or .gguf file "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--context", type=int, default=None, help="context window in tokens (default: the model's)")
    p.add_argument("--no-compile", action="store_true", help="do not compile the decode step (on by default on CUDA)")
    p.add_argument("--quant", choices=("gguf", "gguf-int8", "gguf-f32", "int8", "none"), default="gguf",
                   help="gguf: keep a .gguf file's quantized weights compact on CPU, int8 activations in decode "
                        "(default: as the file stores them); gguf-int8: all as block int8 (more memory; the same "
                        "int8 products, summed in another order); "
                        "gguf-f32: block int8, float activations (exact); int8: quantize dense weights "
                        "(HF checkpoints) group-wise on load; none: dequantize to fp32")
    p.add_argument("--max-tokens", type=int, default=None, help="most new tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: greedy; chat: 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all; chat: 20)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens whose probabilities sum to p (default: 1.0; chat: 0.8)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (chat: 1.05)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same sample")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--draft", default=None, help="draft model for speculative decoding of greedy requests "
                                                 "(same tokenizer, e.g. the 0.5B for the 1.5B)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    p.add_argument("--lora", default=None, help="a PEFT LoRA adapter directory to run with (unmerged)")
    p.add_argument("--tp", type=int, default=None, metavar="N", help=TP_HELP)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="qwen15", description="Run the Qwen1.5 model family locally.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the Qwen1.5 presets and their parameter counts")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("pull", help="fetch a model into the cache (packaged name or hub name)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                   help=f"packaged name or hub name such as Qwen/Qwen1.5-0.5B-Chat (default: {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text for one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="last line: one JSON object with text and token_ids")
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="measure load time, prefill and decode tok/s, and peak RSS")
    p.add_argument("--model", default=None, help=f"model to measure (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length to prefill (default: 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--draft", default=None, help="draft model: measure speculative decoding")
    p.add_argument("--quant", choices=("gguf", "gguf-int8", "gguf-f32", "int8", "none"), default="gguf",
                   help="gguf: keep a .gguf file's quantized weights compact on CPU, int8 activations in decode "
                        "(default: as the file stores them); gguf-int8: all as block int8 (more memory; the same "
                        "int8 products, summed in another order); "
                        "gguf-f32: block int8, float activations (exact); int8: quantize dense weights "
                        "(HF checkpoints) group-wise on load; none: dequantize to fp32")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default: 4)")
    p.add_argument("--tp", type=int, default=None, metavar="N", help=TP_HELP)
    p.add_argument("--random-weights", action="store_true",
                   help="--model names a preset (qwen1.5-32b): random weights at its real shape, no checkpoint")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="memory of weights, KV cache and activations; devices needed")
    p.add_argument("--model", required=True, help="preset name (qwen1.5-32b), model directory or .gguf file")
    p.add_argument("--quant", default=None, help="fp32, bf16, int8, int4, q4_k_m (or gguf for a .gguf file)")
    p.add_argument("--context", type=int, default=None, help="tokens of context (default: the model's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=None, help="GB per device: also say how many are needed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when --gpu-mem is given)")
    p.add_argument("--tp", default=None, metavar="N|auto",
                   help="tensor-parallel degree: memory per rank (auto: the smallest that fits --gpu-mem)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streaming; /reset, Ctrl-D quits)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", default=None, help=f"model to serve (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the id clients send as 'model' (default: from --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoding together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="most sequences waiting; more are answered 429 (default: 64)")
    p.add_argument("--token-budget", type=int, default=512, help="tokens computed per engine step, decode + prefill (default: 512)")
    p.add_argument("--kv-tokens", type=int, default=32768, help="KV cache pool size in tokens (default: 32768)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: 16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--context", type=int, default=None, help="context window in tokens (default: the model's)")
    # Serving batches rows: the file's blocks interleaved by 8 rows (x8) multiply a 16-row step ~1.4x faster
    # than block int8 and take ~30% less memory (benchmarks/results/serve_ceiling.md).
    p.add_argument("--quant", choices=("gguf", "gguf-int8", "gguf-f32", "int8", "none"), default="gguf",
                   help="weights on CPU (default gguf: the file's blocks, the fastest at one row and at batches): "
                        "see `qwen15 generate --help`")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=DIR",
                   help="also serve a PEFT LoRA adapter as model NAME (repeatable); requests pick it by 'model'")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="info: one access line per request and start/stop lines; warning: problems only "
                        "(default: info)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the API only)")
    p.add_argument("--tp", type=int, default=None, metavar="N", help=TP_HELP)
    p.set_defaults(func=cmd_serve)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    from .cache_cli import add_cache_parser

    add_cache_parser(sub)
    from .train.cli import add_train_parser

    add_train_parser(sub)
    _add_train_merge(sub)  # joins the train group
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    # A torchrun rank other than 0 follows rank 0's tensor-parallel commands; training ranks (FSDP2,
    # `train --nproc`) each run the same command instead.
    if os.environ.get("RANK", "0") != "0" and "MASTER_ADDR" in os.environ and args.command != "train":
        from .parallel.group import follow_from_env

        return follow_from_env()
    clean = False
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not in the interpreter's exit
        clean = True
        return code
    except Qwen15Error as e:
        clean = type(e).__name__ != "RankFailed"
        print(f"qwen15: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        tp = sys.modules.get("qwen15.parallel.group")
        group = tp.current() if tp is not None else None
        print(f"\nqwen15: interrupted: stopped all {group.world} ranks" if group else "", file=sys.stderr)
        if group is not None:
            # Stop the ranks and leave now: tearing down a process group that Ctrl-C cut mid-collective can
            # wait on it (seen once in the suite as a 30 s hang), and nothing is left to tidy.
            group.kill()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
                    pass
            os._exit(130)
        return 130
    except BrokenPipeError:
        # The reader went away (`qwen15 generate ... | head`): stop quietly, as Unix tools do. Point stdout
        # at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool SIGPIPE stopped
    finally:
        tp = sys.modules.get("qwen15.parallel.group")
        if tp is not None and tp.current() is not None:
            tp.current().close(clean)  # the other ranks stop with this one


if __name__ == "__main__":
    sys.exit(main())
