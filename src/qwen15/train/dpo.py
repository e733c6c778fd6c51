"""Direct preference optimisation (Rafailov et al. 2023), with TRL's loss and metric names.

    loss = -(1-ε) log σ(β m) - ε log σ(-β m),   m = (log πθ(y_w|x) - log πref(y_w|x)) - (log πθ(y_l|x) - log πref(y_l|x))

log-probs summed over the completion tokens only; reward = β (log πθ - log πref). The reference is the
base with the adapter switched off for LoRA (one model in memory), or, with --full, the log-probs of the
starting weights computed once before training. At step 0 policy = reference, so the loss is ln 2.
The training loop is sft.py's; this file adds the data, the reference and the loss.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Pair, Row, collate, load_dpo_data
from .distributed import World
from .forward import CausalLM, row_sums
from .sft import Options, Result, Task, run


def _rows(pairs: list[Pair], idx: list[int]) -> list[Row]:
    """The chosen rows of the micro-batch, then the rejected ones."""
    rows = []
    for side in ("chosen", "rejected"):
        for i in idx:
            r = Row()
            r.add(getattr(pairs[i], side))
            rows.append(r)
    return rows


def sequence_logps(root: CausalLM, pairs: list[Pair], idx: list[int], pad: int) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs (chosen [n], rejected [n]) of the pairs idx."""
    batch = collate(_rows(pairs, idx), pad, packed=False)
    dev = next(root.parameters()).device
    logps, rows = root(batch["ids"].to(dev), batch["targets"].to(dev))
    sums = row_sums(logps, rows, 2 * len(idx))
    return sums[:len(idx)], sums[len(idx):]


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair sigmoid DPO loss [n] and TRL's metrics (per pair)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    metrics = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
               "rewards/accuracy": (chosen_reward > rejected_reward).float(), "rewards/margin": margin,
               "logps/chosen": policy_chosen, "logps/rejected": policy_rejected}
    return loss, metrics


def _batches(pairs: list[Pair], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Pairs in order, as many per micro-batch as fit batch_tokens (both sides, padded) — at least one."""
    out: list[list[int]] = []
    longest = 0
    for i in order:
        n = max(len(pairs[i].chosen), len(pairs[i].rejected))
        if out and 2 * (len(out[-1]) + 1) * max(longest, n) <= batch_tokens:
            out[-1].append(i)
            longest = max(longest, n)
        else:
            out.append([i])
            longest = n
    return out


def dpo_task(tokenizer, opts: Options, world: World, log) -> Task:
    import random

    pairs = load_dpo_data(opts.data, tokenizer, opts.max_seq_len, opts.too_long, log)
    n_train = len(pairs)
    log(f"{opts.data}: {n_train} preference pairs")
    eval_mbs = None
    if opts.eval_data:
        ev = load_dpo_data(opts.eval_data, tokenizer, opts.max_seq_len, opts.too_long, log)
        eval_mbs = _batches(pairs + ev, list(range(n_train, n_train + len(ev))), opts.batch_tokens)
        pairs = pairs + ev  # one list: eval pairs are indices past the training ones
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_ids or [0])[0]
    reference: dict[str, Tensor] = {}

    def reference_logps(root: CausalLM, idx: list[int]) -> tuple[Tensor, Tensor]:
        if reference:  # --full: computed once before training
            return reference["chosen"][idx], reference["rejected"][idx]
        from ..lora import disabled

        with torch.no_grad(), disabled(root.net):  # LoRA: the base is the reference
            return sequence_logps(root, pairs, idx, pad)

    def before_training(root: CausalLM) -> None:
        if not opts.full:
            return
        log(f"computing the reference log-probs of {len(pairs)} pairs once (--full)")
        chosen, rejected = torch.zeros(len(pairs), dtype=torch.float64), torch.zeros(len(pairs), dtype=torch.float64)
        with torch.no_grad():
            for idx in _batches(pairs, list(range(len(pairs))), opts.batch_tokens):
                c, r = sequence_logps(root, pairs, idx, pad)
                chosen[idx], rejected[idx] = c.double().cpu(), r.double().cpu()
        reference.update(chosen=chosen, rejected=rejected)

    def loss(root: CausalLM, idx: list[int]):
        policy_c, policy_r = sequence_logps(root, pairs, idx, pad)
        ref_c, ref_r = reference_logps(root, idx)
        dev = policy_c.device
        losses, metrics = dpo_loss(policy_c, policy_r, ref_c.to(dev, policy_c.dtype), ref_r.to(dev, policy_c.dtype),
                                   opts.beta, opts.label_smoothing)
        sums = {"loss": float(losses.detach().sum())}
        sums.update({k: float(v.detach().sum()) for k, v in metrics.items()})
        return losses.sum(), sums

    def epoch_microbatches(epoch: int) -> list[list[int]]:
        order = list(range(n_train))
        random.Random(opts.seed * 100003 + epoch).shuffle(order)
        return _batches(pairs, order, opts.batch_tokens)

    return Task(epoch_microbatches=epoch_microbatches, loss=loss, weight=len,
                tokens=lambda idx: sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in idx),
                eval_microbatches=eval_mbs, before_training=before_training)


def dpo(model: str | None = None, data: str = "", out: str = "", *, on_step=None, **options: Any) -> Result:
    """Preference-tune a model on {"prompt", "chosen", "rejected"} JSONL: `qwen15.train.dpo(model=..., beta=0.1)`."""
    from dataclasses import fields

    from .forward import TrainError

    known = {f.name for f in fields(Options)}
    bad = sorted(set(options) - known)
    if bad:
        raise TrainError(f"unknown option(s) {', '.join(bad)}: expected some of {', '.join(sorted(known))}")
    opts = Options(model=model, data=str(data), out=str(out), **options)
    return run(opts, dpo_task, "dpo", on_step)


class _CallableModule(types.ModuleType):
    """`qwen15.train.dpo(...)` calls the function even once this module is imported (see sft.py)."""

    def __call__(self, *args, **kwargs):
        return dpo(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
