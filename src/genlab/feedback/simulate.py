"""Scripted users with a consistent, hidden preference, for proving the feedback loop.

A `SimulatedUser` chats with a genlab server through its HTTP API exactly as a person in the web
UI would: it asks two answers to a prompt and picks the one its preference scores higher (an A/B
choice), rates answers with thumbs, and now and then corrects an answer into one it likes. Its
preference is a function of the answer text only, so the same function judges whether a new
model version serves that user better (`win_rate`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

import httpx

from genlab.errors import InvalidParameterError


@dataclass
class Preference:
    name: str
    score: Callable[[str], float]  # higher = preferred
    correct: Callable[[str], str]  # an answer turned into one this user would rather have read


def _first_clause(text: str) -> str:
    words = text.split()
    return " ".join(words[: max(1, len(words) // 4)])


PREFERENCES: dict[str, Preference] = {
    # prefers short answers: fewer characters
    "short": Preference("short", lambda t: -len(t.strip()), _first_clause),
    # prefers answers that give numbers (quantities, units)
    "numbers": Preference("numbers", lambda t: len(re.findall(r"\d", t)),
                          lambda t: t.strip() + " 42 K, 3.5 m/s, 17 %"),
}


def preference(name: str) -> Preference:
    if name.startswith("term:"):  # prefers answers that use a given word
        term = name[5:].lower()
        if not term:
            raise InvalidParameterError("term: preference needs a word, e.g. term:kelvin")
        return Preference(name, lambda t: t.lower().count(term), lambda t: f"{t.strip()} ({term})")
    if name not in PREFERENCES:
        raise InvalidParameterError(f"unknown preference {name!r}; use {', '.join(PREFERENCES)} or term:WORD")
    return PREFERENCES[name]


@dataclass
class SimulationReport:
    exchanges: int = 0
    ab_choices: int = 0
    ratings: int = 0
    corrections: int = 0
    ties: int = 0
    completion_ids: list[str] = field(default_factory=list)


class SimulatedUser:
    def __init__(self, url: str, model: str, taste: Preference | str, api_key: str | None = None, seed: int = 0,
                 max_tokens: int = 32, temperature: float = 1.0, correction_rate: float = 0.15, mislabelled: bool = False):
        """`mislabelled=True` makes a deliberately mislabelled user: every judgement is a coin toss,
        whatever the answers say (feedback with no consistent signal, which the gate must reject)."""
        self.url, self.model = url.rstrip("/"), model
        self.taste = preference(taste) if isinstance(taste, str) else taste
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = random.Random(seed)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.correction_rate, self.mislabelled = correction_rate, mislabelled
        self.http = httpx.Client(timeout=120)

    def _chat(self, prompt: str, seed: int) -> tuple[str, str]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": seed}
        r = self.http.post(self.url + "/v1/chat/completions", json=body, headers=self.headers)
        r.raise_for_status()
        data = r.json()
        return data["id"], data["choices"][0]["message"]["content"]

    def _feedback(self, body: dict) -> None:
        self.http.post(self.url + "/v1/feedback", json=body, headers=self.headers).raise_for_status()

    def _better(self, a: str, b: str) -> int:
        """1 if this user prefers a, -1 if b, 0 if it cannot tell."""
        if self.mislabelled:
            return self.rng.choice((1, -1))
        sa, sb = self.taste.score(a), self.taste.score(b)
        return (sa > sb) - (sa < sb)

    def session(self, prompts: list[str], report: SimulationReport | None = None) -> SimulationReport:
        """One A/B exchange per prompt, with thumbs on both answers and an occasional correction."""
        report = report or SimulationReport()
        for prompt in prompts:
            seed = self.rng.randrange(2**31)
            (ida, a), (idb, b) = self._chat(prompt, seed), self._chat(prompt, seed + 1)
            report.exchanges += 2
            report.completion_ids += [ida, idb]
            verdict = self._better(a, b)
            if verdict == 0:
                report.ties += 1
                continue
            win, lose = (ida, idb) if verdict > 0 else (idb, ida)
            self._feedback({"completion_id": win, "preferred": win, "rejected": lose})
            self._feedback({"completion_id": win, "rating": 1, "rating_scale": "thumbs"})
            self._feedback({"completion_id": lose, "rating": -1, "rating_scale": "thumbs"})
            report.ab_choices += 1
            report.ratings += 2
            if self.rng.random() < self.correction_rate:
                text = a if lose == ida else b
                fixed = text + " " + text if self.mislabelled and self.rng.random() < 0.5 else self.taste.correct(text)
                self._feedback({"completion_id": lose, "correction": fixed})
                report.corrections += 1
        return report


def win_rate(taste: Preference | str, candidate: list[str], current: list[str]) -> tuple[float, int]:
    """Fraction of prompts on which the user prefers the candidate's answer to the current one's
    (ties left out), and how many comparisons were decided."""
    taste = preference(taste) if isinstance(taste, str) else taste
    decided = [(taste.score(a) > taste.score(b)) for a, b in zip(candidate, current) if taste.score(a) != taste.score(b)]
    return (sum(decided) / len(decided) if decided else 0.0), len(decided)


def sunglasses_judge(checker) -> Callable:
    """(captions, images) -> scores of a user who wants sunglasses over the cat's eyes, whatever
    the caption says: 1 + p where the scene checker finds a cat wearing sunglasses, else p, with p
    the checker's strongest sunglasses evidence anywhere in the image (0..1): graded, so that of
    two images without sunglasses the one closer to them is preferred. Liked: score >= 1."""

    def score(captions: list[str], images) -> list[float]:
        evidence = checker.accessory_evidence(images, "sunglasses")
        worn = [any(d.kind == "cat" and d.sunglasses for d in found) for found in checker.detect(images)]
        return [float(w) + float(e) for w, e in zip(worn, evidence)]

    return score


class SimulatedImageUser:
    """A scripted user of the images endpoint: asks `n` images per caption, gives each a thumb by
    its `judge` (captions, images) -> scores (>= `liked`: thumbs up), and makes an A/B choice of the
    best over the worst image when their scores differ by at least `margin`, all through the HTTP
    API as the web UI does."""

    def __init__(self, url: str, judge: Callable, api_key: str | None = None, seed: int = 0, n: int = 4,
                 guidance: float | None = None, temperature: float | None = None, liked: float = 1.0,
                 margin: float = 0.05):
        self.url, self.judge, self.n, self.liked, self.margin = url.rstrip("/"), judge, n, liked, margin
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = random.Random(seed)
        self.sampling = {k: v for k, v in (("guidance", guidance), ("temperature", temperature)) if v is not None}
        self.http = httpx.Client(timeout=120)

    def _feedback(self, body: dict) -> None:
        self.http.post(self.url + "/v1/feedback", json=body, headers=self.headers).raise_for_status()

    def session(self, prompts: list[str], report: SimulationReport | None = None) -> SimulationReport:
        import base64
        import io

        import numpy as np
        from PIL import Image

        report = report or SimulationReport()
        for prompt in prompts:
            body = {"prompt": prompt, "n": self.n, "seed": self.rng.randrange(2**31 - self.n), **self.sampling}
            r = self.http.post(self.url + "/v1/images/generations", json=body, headers=self.headers)
            r.raise_for_status()
            data = r.json()["data"]
            images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in data])
            scores = self.judge([prompt] * len(data), images)
            report.exchanges += len(data)
            report.completion_ids += [d["id"] for d in data]
            for d, s in zip(data, scores):
                self._feedback({"completion_id": d["id"], "rating": 1 if s >= self.liked else -1,
                                "rating_scale": "thumbs"})
                report.ratings += 1
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if scores[best] - scores[worst] < self.margin:
                report.ties += 1
                continue
            win, lose = data[best]["id"], data[worst]["id"]
            self._feedback({"completion_id": win, "preferred": win, "rejected": lose})
            report.ab_choices += 1
        return report
