"""tool_choice "required" or a named function: sample only text that stays a valid call.

The answer is forced to open with `<tool_call>\\n{"name": "` (tools.forced_prefix); from there every token
must keep `{"name": "<one of the tools>", "arguments": <JSON object>}` reachable, and end-of-text is
allowed once that object is closed (the engine stops there). Without this, a forced `<tool_call>\\n`
alone made the 0.5B emit end-of-text at once: an empty answer, no call.
"""

from __future__ import annotations

import json

from .json_mode import JSONConstraint, JSONScanner

_SEP = '", "arguments": '


class ToolCallScanner:
    """Character scanner for one call object: literal head, a known name, literal separator, arguments, `}`."""

    def __init__(self, names: set[str]):
        self.names = sorted(json.dumps(n)[1:-1] for n in names)  # as they appear inside a JSON string
        self.state = "head"  # head, name, sep, args, close, done
        self.text = ""  # characters of the current literal / name read so far
        self.args = JSONScanner()
        self.ok = True
        self.done = False

    def copy(self) -> "ToolCallScanner":
        new = ToolCallScanner.__new__(ToolCallScanner)
        new.__dict__ = {**self.__dict__, "args": self.args.copy()}
        return new

    def feed(self, text: str) -> bool:
        for ch in text:
            if not self.ok:
                return False
            self.ok = self._char(ch)
        return self.ok

    def _char(self, c: str) -> bool:
        s = self.state
        if s == "head":
            return self._literal(c, '{"name": "', "name")
        if s == "name":
            if c == '"':
                if self.text not in self.names:
                    return False
                self.state, self.text = "sep", '"'
                return True
            if not any(n.startswith(self.text + c) for n in self.names):
                return False
            self.text += c
            return True
        if s == "sep":
            return self._literal(c, _SEP, "args")
        if s == "args":
            if not self.args.feed(c):
                return False
            if self.args.done:
                self.state = "close"
            return True
        if s == "close":
            if c in " \t\r\n":
                return True
            if c == "}":
                self.state, self.done = "done", True
                return True
            return False
        return c in " \t\r\n"  # done: only whitespace after the call

    def _literal(self, c: str, literal: str, then: str) -> bool:
        if not literal.startswith(self.text + c):
            return False
        self.text += c
        if self.text == literal:
            self.state, self.text = then, ""
        return True

    def rest(self) -> str:
        """A shortest text that moves on from here (for the fallback when no likely token fits)."""
        if self.state == "head":
            return '{"name": "'[len(self.text):]
        if self.state == "name":
            name = next(n for n in self.names if n.startswith(self.text))
            return name[len(self.text):] + _SEP
        if self.state == "sep":
            return _SEP[len(self.text):] + "{"
        return "}"


class ToolCallConstraint(JSONConstraint):
    """The engine's constraint interface (sample, complete) over a ToolCallScanner.

    prefix: the call text already forced into the prompt (after `<tool_call>\\n`), fed to the scanner first."""

    def __init__(self, tokenizer, eos_ids: set[int], names: set[str], prefix: str):
        super().__init__(tokenizer, eos_ids)
        self.scanner = ToolCallScanner(names)
        if not self.scanner.feed(prefix):
            raise ValueError(f"forced prefix {prefix!r} is not the start of a call to one of {sorted(names)}")

    def _fallback_tokens(self) -> list[int]:
        ids = self.tokenizer.encode(self.scanner.rest())[:1]
        return ids + super()._fallback_tokens()
