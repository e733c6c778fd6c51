"""response_format json_object: sample only tokens that keep the output a prefix of a valid JSON object.

A character-level pushdown scanner says whether text can still grow into valid JSON and whether it is a
complete value. At each step the candidates are tried in the order the sampler would pick them (argmax
for greedy; Gumbel-max keys for sampling, which draws exactly from the distribution restricted to the
tokens that pass), and the first one that keeps the text valid wins. End-of-text is allowed only once
the object is complete, and the engine stops as soon as it is.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_NUMBER_PREFIX = re.compile(r"-?(0|[1-9]\d*)?(\.\d*)?([eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_WS = " \t\n\r"
MAX_CANDIDATES = 512  # tokens tried per step before giving up and ending the text


class JSONScanner:
    """Feed characters; `ok` turns False at the first one no valid JSON object could contain there."""

    def __init__(self, top_level_object: bool = True):
        self.stack: list[str] = []  # "{" / "["
        self.state = "value"  # value, key_or_end, key, colon, after, array_first, string, number, literal
        self.string_is_key = False
        self.escape = 0  # 0: none; 1: after a backslash; 2-5: hex digits left of \\uXXXX (+1)
        self.token = ""  # the number or literal being read
        self.top_object = top_level_object
        self.ok = True
        self.done = False

    def copy(self) -> "JSONScanner":
        new = JSONScanner.__new__(JSONScanner)
        new.__dict__ = {**self.__dict__, "stack": list(self.stack)}
        return new

    def feed(self, text: str) -> bool:
        for ch in text:
            if not self.ok:
                return False
            self.ok = self._char(ch)
        return self.ok

    def _value_done(self) -> None:
        self.state = "after"
        if not self.stack:
            self.done = True

    def _char(self, c: str) -> bool:
        s = self.state
        if s == "string":
            if self.escape == 1:
                if c == "u":
                    self.escape = 5
                    return True
                self.escape = 0
                return c in '"\\/bfnrt'
            if self.escape > 1:
                self.escape = self.escape - 1 if self.escape > 2 else 0
                return c in "0123456789abcdefABCDEF"
            if c == "\\":
                self.escape = 1
            elif c == '"':
                if self.string_is_key:
                    self.state = "colon"
                else:
                    self._value_done()
            elif ord(c) < 0x20:
                return False
            return True
        if s == "number":
            if c in "0123456789+-.eE" and _NUMBER_PREFIX.fullmatch(self.token + c):
                self.token += c
                return True
            if not _NUMBER.fullmatch(self.token):
                return False
            self._value_done()
            return self._char(c)
        if s == "literal":
            word = next(w for w in ("true", "false", "null") if w.startswith(self.token))
            if word.startswith(self.token + c):
                self.token += c
                if self.token == word:
                    self._value_done()
                return True
            return False
        if c in _WS:
            return not (self.top_object and not self.stack and not self.done)  # no whitespace before the object
        if s in ("value", "array_first"):
            if s == "array_first" and c == "]":
                self.stack.pop()
                self._value_done()
                return True
            if self.top_object and not self.stack and c != "{":
                return False  # json_object: the text starts with the object itself
            if self.done:
                return False
            if c == "{":
                self.stack.append("{")
                self.state = "key_or_end"
            elif c == "[":
                self.stack.append("[")
                self.state = "array_first"
            elif c == '"':
                self.state, self.string_is_key = "string", False
            elif c in "-0123456789":
                self.state, self.token = "number", c
            elif c in "tfn":
                self.state, self.token = "literal", c
            else:
                return False
            return True
        if s in ("key_or_end", "key"):
            if c == '"':
                self.state, self.string_is_key = "string", True
                return True
            if c == "}" and s == "key_or_end":
                self.stack.pop()
                self._value_done()
                return True
            return False
        if s == "colon":
            if c == ":":
                self.state = "value"
                return True
            return False
        if s == "after":
            if not self.stack:
                return False  # only whitespace after the top-level value
            if c == ",":
                self.state = "key" if self.stack[-1] == "{" else "value"
                return True
            if c == ("}" if self.stack[-1] == "{" else "]"):
                self.stack.pop()
                self._value_done()
                return True
            return False
        return False


class JSONConstraint:
    """Per-sequence JSON-object constraint used by the batch engine (see module docstring)."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.scanner = JSONScanner()

    def complete(self, text: str) -> bool:
        return self.scanner.done

    def sample(self, seq, logits: Tensor) -> int:
        processed = seq.sampler.process(logits, seq.prompt_ids, seq.generated)[0]
        if seq.params.greedy:
            keys = processed
        else:
            u = torch.rand(processed.shape, generator=seq.sampler.generator).clamp_(1e-20, 1.0)
            keys = processed - torch.log(-torch.log(u))  # Gumbel-max: argmax of keys is a sample
        order = torch.argsort(keys, descending=True)[:MAX_CANDIDATES].tolist()
        before = self.tokenizer.decode(seq.generated)
        for token in order:
            if processed[token] == float("-inf"):
                break
            if token in self.eos_ids:
                if self.scanner.done:
                    return token
                continue
            piece = self.tokenizer.decode(seq.generated + [token])[len(before):]
            if not piece:
                continue
            trial = self.scanner.copy()
            if trial.feed(piece):
                self.scanner = trial
                return token
        # No likely token fits (a weak model): take a one-character token that does; some always fits.
        for token in self._fallback_tokens():
            trial = self.scanner.copy()
            if trial.feed(self.tokenizer.decode([token])):
                self.scanner = trial
                return token
        return next(iter(self.eos_ids))

    def _fallback_tokens(self) -> list[int]:
        if not hasattr(self, "_fallback"):
            ids = (self.tokenizer.token_to_id(c) for c in '"}]0,:{1truefalsn')
            self._fallback = [i for i in ids if i is not None]
        return self._fallback
