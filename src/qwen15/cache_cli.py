"""`qwen15 cache {ls,prune,rm}`: the repack cache (quant/repack_cache.py) as a user sees and cleans it."""

from __future__ import annotations

import argparse
import sys
import time


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_ls(args: argparse.Namespace) -> int:
    from .quant import repack_cache

    found = repack_cache.entries()
    if not found:
        print(f"the repack cache ({repack_cache.cache_root()}) is empty", file=sys.stderr)
        return 0
    for e in reversed(found):  # the most recently used first
        why = e.stale_reason()
        age = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        print(f"{e.path.name}  {_size(e.size):>10}  {e.layout:<6}  used {age}" + (f"  STALE: {why}" if why else ""))
        for src in e.sources:
            print(f"    {src}")
    total = sum(e.size for e in found)
    print(f"{len(found)} entries, {_size(total)} of {_size(repack_cache.max_bytes())} "
          f"(QWEN15_REPACK_CACHE_MAX) in {repack_cache.cache_root()}", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .quant import repack_cache

    dropped = repack_cache.prune()
    for e, why in dropped:
        print(f"removed {e.path.name} ({_size(e.size)}): {why}")
    print(f"freed {_size(sum(e.size for e, _ in dropped))}", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import Qwen15Error
    from .quant import repack_cache

    found = repack_cache.entries()
    if args.all:
        chosen = found
    else:
        if not args.entries:
            raise Qwen15Error("cache rm: name entries (as `qwen15 cache ls` shows them, or a source .gguf path) "
                              "or give --all")
        chosen = []
        for name in args.entries:
            source = str(Path(name).expanduser().resolve())
            hits = [e for e in found if e.path.name == name or e.path.stem == name or source in e.sources]
            if not hits:
                raise Qwen15Error(f"cache rm: no entry named {name!r} and none made from it: "
                                  f"see `qwen15 cache ls`")
            chosen += [e for e in hits if e not in chosen]
    for e in chosen:
        repack_cache.remove(e)
        print(f"removed {e.path.name} ({_size(e.size)})")
    return 0


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="the repacked-weights cache: list, prune stale or excess entries, remove")
    csub = p.add_subparsers(dest="cache_command", required=True)
    c = csub.add_parser("ls", help="entries with their size, layout, last use and source files")
    c.set_defaults(func=cmd_ls)
    c = csub.add_parser("prune", help="remove entries whose source is gone or changed, then the least recently "
                                      "used above QWEN15_REPACK_CACHE_MAX (default 16G)")
    c.set_defaults(func=cmd_prune)
    c = csub.add_parser("rm", help="remove entries by name or by source .gguf path")
    c.add_argument("entries", nargs="*", help="entry names from `qwen15 cache ls`, or .gguf paths")
    c.add_argument("--all", action="store_true", help="remove every entry")
    c.set_defaults(func=cmd_rm)
