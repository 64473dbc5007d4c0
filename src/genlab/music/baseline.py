"""The character-level anchor: an interpolated Kneser-Ney character n-gram model.

Bits per character is the measure that compares across tokenizations: a model's total bits on a
tune (every token after `<|bos|>`, the end-of-tune `<|eos|>` included) divided by the tune's
characters plus one for its end. The n-gram scores the same thing: every character given the
previous n-1 (padded at the start of a tune), then an end-of-tune symbol.

Kneser-Ney (Chen & Goodman's interpolated form, one absolute discount per order estimated as
n1 / (n1 + 2 n2)): the highest order uses counts, lower orders use continuation counts (in how
many different contexts a character follows), and the lowest order backs off to a uniform
distribution over the training characters plus one "unseen character" symbol, so every held-out
character gets a finite cost.
"""

from __future__ import annotations

import math
from collections import defaultdict

from genlab.errors import InvalidParameterError

START, END = "\x02", "\x03"  # padding before a tune, the end-of-tune symbol (not ABC characters)


class CharNgram:
    def __init__(self, order: int = 5):
        if not isinstance(order, int) or order < 1:
            raise InvalidParameterError("order must be an integer >= 1")
        self.order = order
        self.vocab: set[str] = set()
        # tables[k]: context of length k -> {next character: count}; k = order - 1 holds real
        # counts, shorter contexts hold continuation counts
        self.tables: list[dict[str, dict[str, int]]] = []
        self.stats: list[dict[str, tuple[int, int]]] = []  # context -> (total, distinct followers)
        self.discounts: list[float] = []

    def _padded(self, text: str) -> str:
        return START * (self.order - 1) + text + END

    def fit(self, texts: list[str]) -> "CharNgram":
        n = self.order
        top: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for text in texts:
            s = self._padded(text)
            self.vocab.update(text)
            for i in range(n - 1, len(s)):
                top[s[i - n + 1:i]][s[i]] += 1
        if not top:
            raise InvalidParameterError("no text to fit the character n-gram on")
        self.vocab.add(END)
        tables = [None] * n
        tables[n - 1] = top
        for k in range(n - 2, -1, -1):  # continuation counts of order k from the order above
            lower: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for context, followers in tables[k + 1].items():
                for c in followers:
                    lower[context[1:]][c] += 1
            tables[k] = lower
        self.tables = [{h: dict(f) for h, f in t.items()} for t in tables]
        self.stats = [{h: (sum(f.values()), len(f)) for h, f in t.items()} for t in self.tables]
        self.discounts = []
        for t in self.tables:
            n1 = sum(1 for f in t.values() for c in f.values() if c == 1)
            n2 = sum(1 for f in t.values() for c in f.values() if c == 2)
            self.discounts.append(n1 / (n1 + 2 * n2) if n1 + n2 else 0.5)
        return self

    def prob(self, char: str, context: str) -> float:
        """P(char | the last order-1 characters of `context`), `context` already padded."""
        p = 1.0 / (len(self.vocab) + 1)  # uniform over the training characters + "unseen"
        for k in range(self.order):
            h = context[len(context) - k:] if k else ""
            total_types = self.stats[k].get(h)
            if total_types is None:
                break  # an unseen context: its longer extensions are unseen too
            total, types = total_types
            d = self.discounts[k]
            count = self.tables[k][h].get(char, 0)
            p = (max(count - d, 0.0) + d * types * p) / total
        return p

    def bits(self, text: str) -> float:
        """-log2 P(text, then end of tune)."""
        s = self._padded(text)
        n = self.order
        return -sum(math.log2(self.prob(s[i], s[i - n + 1:i])) for i in range(n - 1, len(s)))

    def bits_per_char(self, texts: list[str]) -> float:
        """Total bits over total characters (+1 per text for its end), as for the model."""
        total = sum(self.bits(t) for t in texts)
        return total / sum(len(t) + 1 for t in texts)
