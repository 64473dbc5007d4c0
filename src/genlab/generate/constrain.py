"""Constrained decoding: outputs guaranteed to be a JSON object (OpenAI's `json_object` format).

`JsonPrefix` is a byte-level pushdown automaton over the prefixes of a JSON text whose top-level
value is an object (RFC 8259). `JsonObjectConstraint` uses it during decoding: each step it
masks the logits so that only tokens whose bytes keep the output such a prefix can be sampled,
and EOS only once the object is closed. If generation stops early (a token limit), `closing()`
is the shortest text that completes the object.
"""

from __future__ import annotations

import bisect
import re
import weakref
from typing import Callable

import torch

_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}  # first byte -> the rest

# Parser modes: what the next byte may be.
START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, DONE = range(8)  # between tokens
STR, ESC, HEX, LIT = range(8, 12)  # inside a string / escape / \uXXXX / true-false-null
NEG, DOT, EXP, EXP_SIGN, ZERO, INT, FRAC, EXP_DIG = range(12, 20)  # inside a number (>= ZERO: may end)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are shifted to 256+
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte-fallback tokens
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> list[bytes]:
    """The raw bytes each token id 0..len(tokenizer)-1 stands for (b"" for special tokens)."""
    if tokenizer in _CACHE:
        return _CACHE[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    out = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or tok is None:
            out.append(b"")
        elif i in added:  # added tokens hold plain text, not byte-level characters
            out.append(added[i].content.encode())
        elif byte_level and all(c in _UNICODE_TO_BYTE for c in tok):
            out.append(bytes(_UNICODE_TO_BYTE[c] for c in tok))
        elif m := _BYTE_TOKEN.fullmatch(tok):
            out.append(bytes([int(m.group(1), 16)]))
        elif "▁" in tok:  # sentencepiece marks a leading space with ▁
            out.append(tok.replace("▁", " ").encode())
        else:
            out.append(tokenizer.convert_tokens_to_string([tok]).encode())
    _CACHE[tokenizer] = out
    return out


def _sorted_tokens(tokenizer) -> tuple[list[bytes], list[int]]:
    """The tokens' bytes, sorted (specials left out), and their ids."""
    if tokenizer not in _SORTED:
        pairs = sorted((b, i) for i, b in enumerate(token_bytes(tokenizer)) if b)
        _SORTED[tokenizer] = ([b for b, _ in pairs], [i for _, i in pairs])
    return _SORTED[tokenizer]


def accepted_tokens(tokenizer, step: Callable[[object, int], object], state) -> list[int]:
    """Ids of every token whose bytes a byte automaton accepts from `state` (`step(state, byte)`
    gives the next state, None on a byte it rejects): an exact mask over the whole vocabulary.

    Tokens sharing a prefix form a run of the sorted vocabulary, so it is walked like a trie
    without building one: each distinct byte at a depth is stepped once, and a rejected byte
    prunes its whole run. The cost follows the accepted continuations, not the vocabulary size.
    """
    keys, ids = _sorted_tokens(tokenizer)
    found: list[int] = []

    def walk(state, lo: int, hi: int, depth: int) -> None:
        while lo < hi and len(keys[lo]) == depth:  # tokens that end here
            found.append(ids[lo])
            lo += 1
        while lo < hi:
            b = keys[lo][depth]
            end = bisect.bisect_left(keys, keys[lo][:depth] + bytes([b + 1]), lo, hi) if b < 255 else hi
            after = step(state, b)
            if after is not None:
                walk(after, lo, end, depth + 1)
            lo = end

    walk(state, 0, len(keys), 0)
    return found


def _number_step(mode: int, b: int) -> int | None:
    """The next number mode after byte `b`; AFTER if `b` ends the number; None if invalid."""
    digit = 0x30 <= b <= 0x39
    if mode == NEG:
        return (ZERO if b == 0x30 else INT) if digit else None
    if mode in (DOT, EXP_SIGN):
        return (FRAC if mode == DOT else EXP_DIG) if digit else None
    if mode == EXP:
        return EXP_DIG if digit else EXP_SIGN if b in b"+-" else None
    if digit and mode != ZERO:  # no digit may follow a leading 0
        return mode
    if b == 0x2E and mode in (ZERO, INT):
        return DOT
    if b in b"eE" and mode != EXP_DIG:
        return EXP
    return AFTER  # the number is complete; `b` is re-read as what follows a value


class JsonPrefix:
    """Incremental byte-level recogniser of the prefixes of a JSON object text."""

    def __init__(self, max_whitespace: int | None = None):
        """`max_whitespace`: longest run of whitespace allowed between tokens (None: any, as RFC 8259)."""
        # (open containers as a string of "{"/"[", mode, inside a key?, mode's extra: hex digits left / literal
        # rest, whitespace bytes in the current run)
        self._state: tuple = ("", START, False, 0, 0)
        self.max_whitespace = max_whitespace

    @property
    def complete(self) -> bool:
        return self._state[1] == DONE

    def feed(self, data: bytes) -> bool:
        """Advance over `data`; on an invalid byte return False and leave the state unchanged."""
        state = self._run(data)
        if state is None:
            return False
        self._state = state
        return True

    def accepts(self, data: bytes) -> bool:
        """Whether `feed(data)` would succeed, without changing the state."""
        return self._run(data) is not None

    def _run(self, data: bytes) -> tuple | None:
        stack, mode, key, aux, ws = self._state  # locals only: the state changes only on success
        limit = self.max_whitespace
        for b in data:
            if mode >= NEG:
                mode = _number_step(mode, b)
                if mode is None:
                    return None
                if mode != AFTER:
                    continue
            if mode == STR:
                if b == 0x22:
                    mode = COLON if key else AFTER
                elif b == 0x5C:
                    mode = ESC
                elif b < 0x20:  # control characters must be escaped
                    return None
            elif b in _WS and mode < STR:
                ws += 1
                if limit is not None and ws > limit:
                    return None
                continue
            elif mode == AFTER:
                if b == 0x2C:
                    mode = OBJ_KEY if stack[-1] == "{" else VALUE
                elif b == (0x7D if stack[-1] == "{" else 0x5D):
                    stack = stack[:-1]
                    mode = AFTER if stack else DONE
                else:
                    return None
            elif mode in (VALUE, ARR_FIRST):
                if b == 0x22:
                    mode, key = STR, False
                elif b in b"{[":
                    stack += chr(b)
                    mode = OBJ_FIRST if b == 0x7B else ARR_FIRST
                elif b == 0x2D:
                    mode = NEG
                elif 0x30 <= b <= 0x39:
                    mode = ZERO if b == 0x30 else INT
                elif b in _LITERALS:
                    mode, aux = LIT, _LITERALS[b]
                elif b == 0x5D and mode == ARR_FIRST:
                    stack = stack[:-1]
                    mode = AFTER  # the top level is an object, so the stack is not empty
                else:
                    return None
            elif mode in (OBJ_FIRST, OBJ_KEY):
                if b == 0x22:
                    mode, key = STR, True
                elif b == 0x7D and mode == OBJ_FIRST:
                    stack = stack[:-1]
                    mode = AFTER if stack else DONE
                else:
                    return None
            elif mode == ESC:
                if b in _ESCAPES:
                    mode = STR
                elif b == 0x75:
                    mode, aux = HEX, 4
                else:
                    return None
            elif mode == HEX:
                if b not in _HEX:
                    return None
                aux -= 1
                mode = HEX if aux else STR
            elif mode == LIT:
                if b != aux[0]:
                    return None
                aux = aux[1:]
                mode = LIT if aux else AFTER
            elif mode == COLON and b == 0x3A:
                mode = VALUE
            elif mode == START and b == 0x7B:
                stack, mode = "{", OBJ_FIRST
            else:  # DONE: only whitespace may follow the object
                return None
            ws = 0
        return stack, mode, key, aux, ws

    def closing(self) -> str:
        """The shortest text that, appended, makes the prefix a complete JSON object."""
        stack, mode, key, aux, _ = self._state
        if mode == START:
            return "{}"
        tail = {STR: '"', ESC: '\\"', OBJ_KEY: '"": null', COLON: ": null", VALUE: "null",
                NEG: "0", DOT: "0", EXP: "0", EXP_SIGN: "0"}.get(mode, "")
        if mode == HEX:
            tail = "0" * aux + '"'
        elif mode == LIT:
            tail = aux.decode()
        if mode in (STR, ESC, HEX) and key:  # a key needs a value too
            tail += ": null"
        return tail + "".join("}" if c == "{" else "]" for c in reversed(stack))


class JsonObjectConstraint:
    """Per-generation state: masks logits so the output is a JSON object, then EOS."""

    def __init__(self, tokenizer, eos_token_ids: list[int], max_whitespace: int | None = 1):
        """`max_whitespace=1` keeps the output compact and stops a weak model from looping on
        whitespace, which JSON allows without end."""
        self.tokens = token_bytes(tokenizer)
        self.eos = frozenset(eos_token_ids)
        self.prefix = JsonPrefix(max_whitespace)

    @property
    def complete(self) -> bool:
        return self.prefix.complete

    def closing(self) -> str:
        return self.prefix.closing()

    def allowed(self, token_id: int) -> bool:
        if token_id in self.eos:
            return self.complete
        data = self.tokens[token_id] if 0 <= token_id < len(self.tokens) else b""
        return bool(data) and not self.complete and self.prefix.accepts(data)

    def mask(self, logits: torch.Tensor, window: int = 64) -> torch.Tensor:
        """A copy of one row of logits [V] with every disallowed token at -inf.

        Only the `window` most likely tokens are checked (bounded cost); if none of them is
        allowed, the scan goes on down the sorted order until one is.
        """
        n = logits.shape[-1]
        if self.complete:
            keep = [i for i in self.eos if i < n]
            if not keep:
                raise RuntimeError("the JSON object is complete and there is no EOS id: stop decoding (see .complete)")
        else:
            keep = [i for i in torch.topk(logits, min(window, n)).indices.tolist() if self.allowed(i)]
            if not keep:  # rare: sort everything and scan on in chunks (from 0, as ties may order differently)
                order = torch.argsort(logits, descending=True).tolist()
                for start in range(0, n, window):
                    keep = [i for i in order[start:start + window] if self.allowed(i)]
                    if keep:
                        break
                else:
                    raise RuntimeError("no token of the vocabulary can continue the JSON object here")
        idx = torch.tensor(keep, dtype=torch.long, device=logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[idx] = logits[idx]
        return out

    def advance(self, token_id: int) -> None:
        """Feed the chosen token (EOS is ignored)."""
        if token_id in self.eos:
            return
        data = self.tokens[token_id] if 0 <= token_id < len(self.tokens) else b""
        if not data or not self.prefix.feed(data):
            raise ValueError(f"token {token_id} cannot continue the JSON object here")
