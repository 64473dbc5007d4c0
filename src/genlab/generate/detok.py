"""Incremental detokenization with stop strings, for streaming one sequence token by token.

Byte-level BPE tokens may end in the middle of a UTF-8 character, so text is released only once
it decodes cleanly; text that could be the start of a stop string is held back until it is
known not to be one.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from a little before the new tokens: BPE spacing depends on context
        self.read_offset = 0
        self.text = ""  # everything decoded so far (stop string excluded once found)
        self.emitted = 0  # how much of `text` has been handed out
        self.stopped = False

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the newly releasable text (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> str:
        hold = 0
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                break
            # the longest tail of the text that is a proper prefix of this stop string
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:k])), 0))
        end = len(self.text) if self.stopped or final else len(self.text) - hold
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is still held back."""
        if not self.stopped:
            tail = self._decode(self.ids[self.prefix_offset:])[len(self._decode(self.ids[self.prefix_offset:self.read_offset])):]
            self.text += tail
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)
