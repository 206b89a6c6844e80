"""Generated ids to text as it is made: deltas that never split a character and never show a stop string.

Decoding token by token is wrong for byte-level vocabularies (one character's bytes may be spread over
several tokens) and for SentencePiece ones (a token's leading space depends on what precedes it), so each
step decodes a short run of recent tokens twice, with and without the new ones, and emits the difference
once it no longer ends in a partial character (U+FFFD).

Stop strings can span tokens. Text that might be the start of a stop string is held back until it either
completes one (then it and everything after are dropped) or cannot anymore (then it is released).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was completed
        self._prefix = 0  # ids[_prefix:_read] were decoded already, as context for the next ones
        self._read = 0
        self._held = ""

    def push(self, token: int) -> str:
        """Add a generated token; the text that can be shown now ("" while a character or stop string is open)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(self._held + new)

    def finish(self) -> str:
        """The text held back, once no more tokens come: a stop string that never completed is ordinary text, and
        bytes of a character cut off by the token limit decode as U+FFFD, as they do in the whole text."""
        if self.stopped:
            return ""
        tail = self.decode(self.ids[self._prefix :])[len(self.decode(self.ids[self._prefix : self._read])) :]
        pending, self._held = self._held + tail, ""
        self._read = len(self.ids)
        cut = self._first_stop(pending)
        if cut >= 0:
            self.stopped = True
            pending = pending[:cut]
        self.text += pending
        return pending

    def _first_stop(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)

    def _release(self, pending: str) -> str:
        cut = self._first_stop(pending)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            out = pending[:cut]
        else:
            keep = _open_stop_prefix(pending, self.stop)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def _open_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
