"""Training data: JSONL records -> token ids with a loss mask -> rows (optionally packed) -> micro-batches.

Record formats (one JSON object a line):
- `{"messages": [...], "tools": [...]?}`: an OpenAI-style chat, rendered with the checkpoint's own chat
  template; the loss covers the assistant turns only, each with its closing `<|im_end|>` (a model that
  never sees the loss on it never learns to stop).
- `{"prompt": ..., "completion": ...}`: strings are plain text (TRL's "standard" form: prompt, completion,
  then the eos token, the loss on completion + eos); message lists are a chat whose completion turns train.
- `{"text": ...}`: continued pre-training, the loss on every token (then eos).

The mask is computed from the rendered turns, not asked of the template (Qwen's templates have no
`{% generation %}` tags, and transformers' `return_assistant_tokens_mask` then returns all ones): for each
assistant turn i, the text rendered for messages[:i] with the generation prompt is a prefix of the
text for messages[:i+1]; what the turn adds is the assistant's. Each segment is tokenized on its own, as
generation sees it (the prompt is encoded, then the reply comes token by token).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import Qwen15Error, TokenizerError
from ..tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TOO_LONG = ("drop", "truncate", "error")
IGNORE = -100  # target id that the loss skips (PyTorch's cross_entropy default)


class DataError(Qwen15Error, ValueError):
    """A training data file or record that cannot be used: the message names the file and line."""


@dataclass
class Example:
    """One training example: ids and, per token, whether the loss predicts it."""

    ids: list[int]
    trained: list[bool]
    where: str  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.ids)


# ---- reading ---------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[str, Any]]:
    """(`file:line`, object) for every non-blank line; a missing file or a line that is not JSON raises."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (expected a JSONL file, one JSON object a line)")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): expected one JSON object a line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        out.append((where, obj))
    if not out:
        raise DataError(f"{path}: no records (expected a JSONL file, one JSON object a line)")
    return out


# ---- encoding --------------------------------------------------------------------------------------------
def _check_chat(messages: Any, where: str, what: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{what}' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {what}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {what}[{i}] has unknown role {role!r}: expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise DataError(f"{where}: {what}[{i}] ({role}) has no 'content'")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: {what}[{i}].content must be a string, got {type(content).__name__}")
    return messages


def encode_chat(tokenizer: Tokenizer, messages: list[dict], where: str, tools: list | None = None,
                train_from: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered chat and the mask of its assistant turns at index >= train_from."""
    _check_chat(messages, where)
    trained_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if not trained_turns:
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    end_text = tokenizer.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None
    turn_end = "<|im_end|>" if tokenizer.token_to_id("<|im_end|>") is not None else end_text

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None

    full = render(messages, False)
    segments: list[tuple[str, bool]] = []  # (text, trained)
    done = 0  # characters of `full` already in segments
    if trained_turns[0] == 0:
        raise DataError(f"{where}: the conversation starts with an assistant turn: expected a system or user turn first")
    for i in trained_turns:
        before, after = render(messages[:i], True), render(messages[:i + 1], False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
            raise DataError(f"{where}: the chat template does not render messages[:{i + 1}] as a prefix of the "
                            f"whole conversation, so the assistant turn cannot be located")
        reply = after[len(before):]
        calls = messages[i].get("tool_calls") or []
        for call in calls:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if not isinstance(name, str) or name not in reply:
                raise DataError(f"{where}: messages[{i}] has tool_calls the chat template does not render "
                                f"(expected each call as {{'function': {{'name', 'arguments'}}}} and a template with tools)")
        cut = reply.rfind(turn_end) + len(turn_end) if turn_end and turn_end in reply else len(reply)
        segments.append((full[done:len(before)], False))
        segments.append((reply[:cut], True))
        done = len(before) + cut
    segments.append((full[done:], False))
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segments:
        if text:
            piece = tokenizer.encode(text)
            ids += piece
            trained += [train] * len(piece)
    return ids, trained


def _as_chat(value: Any, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def encode_prompt_completion(tokenizer: Tokenizer, prompt: Any, completion: Any, where: str,
                             names: tuple[str, str] = ("prompt", "completion"),
                             tools: list | None = None) -> tuple[list[int], list[bool]]:
    """Strings: prompt + completion + eos (loss on completion and eos); any message list: a chat."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DataError(f"{where}: '{names[1]}' is empty: nothing to train on")
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + tokenizer.eos_token_ids[:1]
        return p + c, [False] * len(p) + [True] * len(c)
    for name, value in zip(names, (prompt, completion)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: '{name}' must be a string or a list of messages, got {type(value).__name__}")
    prompt_msgs = _check_chat(_as_chat(prompt, "user"), where, names[0])
    completion_msgs = _check_chat(_as_chat(completion, "assistant"), where, names[1])
    return encode_chat(tokenizer, prompt_msgs + completion_msgs, where, tools, train_from=len(prompt_msgs))


def encode_record(tokenizer: Tokenizer, obj: dict, where: str) -> Example:
    """One SFT record ({"messages"}, {"prompt", "completion"} or {"text"}) as an Example."""
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of JSON-schema objects")
    if "messages" in obj:
        ids, trained = encode_chat(tokenizer, obj["messages"], where, tools)
    elif "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            raise DataError(f"{where}: a prompt/completion record needs both 'prompt' and 'completion'")
        ids, trained = encode_prompt_completion(tokenizer, obj["prompt"], obj["completion"], where, tools=tools)
    elif "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        ids = tokenizer.encode(obj["text"]) + tokenizer.eos_token_ids[:1]
        trained = [True] * len(ids)
    else:
        raise DataError(f"{where}: unknown record with keys {sorted(obj)[:5]}: expected 'messages', "
                        f"'prompt' and 'completion', or 'text'")
    return Example(ids, trained, where)


def fit_length(examples: list[Example], max_seq_len: int, too_long: str, log: Callable[[str], None] = print,
               ) -> list[Example]:
    """Apply --max-seq-len: drop, truncate (keeping the start) or refuse longer examples, naming each one."""
    if too_long not in TOO_LONG:
        raise DataError(f"unknown too-long policy {too_long!r}: expected one of {', '.join(TOO_LONG)}")
    kept, changed = [], []
    for ex in examples:
        if len(ex) <= max_seq_len:
            kept.append(ex)
            continue
        if too_long == "error":
            raise DataError(f"{ex.where}: example is {len(ex)} tokens, longer than --max-seq-len {max_seq_len} "
                            f"(use --too-long drop or truncate)")
        if too_long == "truncate" and any(ex.trained[:max_seq_len][1:]):
            kept.append(Example(ex.ids[:max_seq_len], ex.trained[:max_seq_len], ex.where))
            changed.append(f"{ex.where}: {len(ex)} tokens, truncated to {max_seq_len}")
        else:
            why = "dropped" if too_long == "drop" else "dropped (no trained token left after truncation)"
            changed.append(f"{ex.where}: {len(ex)} tokens > --max-seq-len {max_seq_len}, {why}")
    if changed:
        for line in changed[:10]:
            log(line)
        if len(changed) > 10:
            log(f"... and {len(changed) - 10} more")
        verb = "truncated or dropped" if too_long == "truncate" else "dropped"
        log(f"{len(changed)} of {len(examples)} examples longer than --max-seq-len {max_seq_len} were {verb}")
    if not kept:
        raise DataError(f"no example fits --max-seq-len {max_seq_len}")
    return kept


def load_sft_data(path: str | Path, tokenizer: Tokenizer, max_seq_len: int, too_long: str = "drop",
                  log: Callable[[str], None] = print) -> list[Example]:
    examples = []
    for where, obj in read_jsonl(path):
        ex = encode_record(tokenizer, obj, where)
        if not any(ex.trained[1:]):  # the first token is never predicted
            raise DataError(f"{where}: no token to train on")
        examples.append(ex)
    return fit_length(examples, max_seq_len, too_long, log)


# ---- rows and batches ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One sequence of the batch: one example, or several packed (docs gives each one's length)."""

    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)

    def add(self, ex: Example) -> None:
        self.ids += ex.ids
        self.trained += ex.trained
        self.docs.append(len(ex.ids))

    @property
    def targets(self) -> int:
        """Tokens the loss predicts (a document's first token is predicted by nothing)."""
        n, start = 0, 0
        for length in self.docs:
            n += sum(self.trained[start + 1:start + length])
            start += length
        return n


def make_rows(examples: list[Example], max_seq_len: int, packing: bool, seed: int, epoch: int) -> list[Row]:
    """Rows for one epoch: the examples in a seeded order, each its own row or packed first-fit."""
    order = list(range(len(examples)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    rows: list[Row] = []
    for i in order:
        if packing and rows and len(rows[-1].ids) + len(examples[i]) <= max_seq_len:
            rows[-1].add(examples[i])
        else:
            rows.append(Row())
            rows[-1].add(examples[i])
    return rows


def make_microbatches(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Consecutive rows, as many as fit batch_tokens once padded to the longest (at least one)."""
    out: list[list[Row]] = []
    for row in rows:
        if out:
            last = out[-1]
            if (len(last) + 1) * max(len(row.ids), max(len(r.ids) for r in last)) <= batch_tokens:
                last.append(row)
                continue
        out.append([row])
    return out


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor | None]:
    """ids and next-token targets [B, T] (IGNORE where untrained or padding); for packed rows also
    positions restarting at 0 per document and a block-diagonal causal mask [B, 1, T, T]."""
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: doc -1
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        row_ids = torch.tensor(r.ids)
        ids[b, :n] = row_ids
        start = 0
        for d, length in enumerate(r.docs):
            seg = slice(start, start + length)
            doc[b, seg] = d
            positions[b, seg] = torch.arange(length)
            trained = torch.tensor(r.trained[start + 1:start + length], dtype=torch.bool)
            targets[b, start:start + length - 1] = torch.where(trained, row_ids[start + 1:start + length], IGNORE)
            start += length
    if not packed:
        return {"ids": ids, "targets": targets, "positions": None, "mask": None}
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    mask |= torch.eye(T, dtype=torch.bool)  # padding rows see themselves (an all-False row would be NaN)
    return {"ids": ids, "targets": targets, "positions": positions, "mask": mask[:, None]}


# ---- DPO pairs -------------------------------------------------------------------------------------------
@dataclass
class Pair:
    chosen: Example
    rejected: Example


def load_dpo_data(path: str | Path, tokenizer: Tokenizer, max_seq_len: int, too_long: str = "drop",
                  log: Callable[[str], None] = print) -> list[Pair]:
    """{"prompt", "chosen", "rejected"} records: strings (plain text + eos) or message lists (a chat)."""
    pairs = []
    for where, obj in read_jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise DataError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected' "
                            f"(missing {', '.join(missing)})")
        tools = obj.get("tools")
        sides = []
        for name in ("chosen", "rejected"):
            ids, trained = encode_prompt_completion(tokenizer, obj["prompt"], obj[name], where, ("prompt", name), tools)
            sides.append(Example(ids, trained, where))
        pairs.append(Pair(*sides))
    if too_long not in TOO_LONG:
        raise DataError(f"unknown too-long policy {too_long!r}: expected one of {', '.join(TOO_LONG)}")
    flat = fit_length([e for p in pairs for e in (p.chosen, p.rejected)], max_seq_len, too_long, log) \
        if too_long != "drop" else None
    if flat is None:  # drop: a pair goes when either side is too long
        kept = [p for p in pairs if max(len(p.chosen), len(p.rejected)) <= max_seq_len]
        dropped = [p for p in pairs if p not in kept]
        for p in dropped[:10]:
            log(f"{p.chosen.where}: pair is {max(len(p.chosen), len(p.rejected))} tokens > --max-seq-len "
                f"{max_seq_len}, dropped")
        if dropped:
            log(f"{len(dropped)} of {len(pairs)} pairs longer than --max-seq-len {max_seq_len} were dropped")
        if not kept:
            raise DataError(f"no pair fits --max-seq-len {max_seq_len}")
        return kept
    if len(flat) != 2 * len(pairs):
        raise DataError(f"a pair has no trained token left after truncation to --max-seq-len {max_seq_len}")
    return [Pair(flat[2 * i], flat[2 * i + 1]) for i in range(len(pairs))]
