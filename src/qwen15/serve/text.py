"""Per-sequence text output: incremental detokenizing with stop strings held back until they cannot match."""

from __future__ import annotations

from ..tokenizer import Tokenizer


class TextTracker:
    """Feed token ids one at a time; get back the text that is safe to emit (never part of a stop string)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=0) - 1
        self.pending = ""  # decoded text held back while it could still be the start of a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found: the caller finishes the sequence

    def add(self, token: int) -> str:
        self.pending += self.decoder.add(token)
        hit = _first_stop(self.pending, self.stop)
        if hit is not None:
            self.stopped = True
            return self._emit(self.pending[:hit], rest="")
        cut = len(self.pending) - self.hold if self.hold > 0 else len(self.pending)
        return self._emit(self.pending[:max(cut, 0)], rest=self.pending[max(cut, 0):])

    def finish(self) -> str:
        """The held-back tail once generation ends (cut at a stop string if one completes in it)."""
        if self.stopped:
            return ""
        tail = self.pending + self.decoder.flush()
        hit = _first_stop(tail, self.stop)
        if hit is not None:
            self.stopped, tail = True, tail[:hit]
        return self._emit(tail, rest="")

    def _emit(self, piece: str, rest: str) -> str:
        self.pending = rest
        self.text += piece
        return piece


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
