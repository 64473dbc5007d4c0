"""`genlab synth instructions`: question/answer pairs for SFT, drafted by a model from the chunks
of a RAG store (self-instruct style), kept only if they pass every filter.

Each chunk is shown to the model (chat template if it has one, else a plain prompt ending in "Q:")
with the instruction to reply "Q: <question> A: <answer>" from the passage alone. Drafts are
dropped, and counted, for: no parsable pair; too short / long; not a question; an answer whose
content words are mostly absent from the chunk (ungrounded); a question repeating a kept one
(normalised exact match, or Jaccard of content-word uni+bigrams); optionally, a question for which
the store's retriever misses the source chunk in its top k. Output: `messages` JSONL (what
`genlab finetune` reads; it ignores the extra provenance keys) and a `.summary.json` beside it.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from genlab.errors import ContextLengthError, DataError, InvalidParameterError, ModelLoadError
from genlab.fsutil import atomic_write_text, write_json

REASONS = ("parse_failed", "too_short", "too_long", "not_a_question", "ungrounded", "duplicate", "not_retrieved")
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as into about over under than then that this these those "
    "it its is are was were be been being do does did done has have had can could should would will shall may might "
    "must not no nor so such what which who whom whose when where why how there here their they them he she his her "
    "we our you your i me my also only very just more most other some any each all both".split())
QUESTION_WORDS = frozenset("what which who whom whose when where why how is are was were do does did can could should "
                           "would will shall may might must has have had name list".split())
INSTRUCTION = ("Read the passage, then write one question that the passage answers and the answer to it, using only "
               "facts stated in the passage. Reply in exactly this form:\nQ: <question>\nA: <answer>\n\n"
               "Passage ({source}):\n{text}")
_LABEL = r"[ \t*_#>]*(?:{})[ \t]*\d*[ \t]*[*_]*[ \t]*[:：][ \t*_]*"
Q_LINE = re.compile(r"(?:^|\n)(?:" + _LABEL.format("q|question") + ")+", re.I)  # question label(s) at a line start
A_LABEL = re.compile(r"(?:^|\n|(?<=\?))" + _LABEL.format("a|answer"), re.I)  # ... or right after the "?"

Prompt = str | list[dict]
Generate = Callable[[list[Prompt], int], list[list[str]]]  # (prompts, n) -> n draft texts per prompt


@dataclass
class DraftConfig:
    chunks: int | None = None  # sample this many chunks of the store (None: every chunk)
    per_chunk: int = 1  # drafts per chunk
    seed: int = 0  # chunk sample and sampling seed
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 160
    batch_size: int = 8  # chunks prompted together
    min_question_words: int = 3
    max_question_words: int = 60
    min_answer_words: int = 1
    max_answer_words: int = 200
    min_overlap: float = 0.5  # least fraction of the answer's content words found in its chunk
    max_similarity: float = 0.7  # questions at least this similar to a kept one are near-duplicates
    check_retrieval: bool = False  # keep only questions whose chunk the store's retriever finds ...
    retrieval_k: int = 5  # ... in its top k

    def __post_init__(self):
        lengths_ok = self.min_question_words <= self.max_question_words and self.min_answer_words <= self.max_answer_words
        for ok, message in [(self.chunks is None or self.chunks >= 1, "-n (chunks) must be >= 1"),
                            (self.per_chunk >= 1 and self.batch_size >= 1, "--per-chunk and batch size must be >= 1"),
                            (0 <= self.min_overlap <= 1, "--min-overlap must be in [0, 1]"),
                            (0 < self.max_similarity <= 1, "--max-similarity must be in (0, 1]"),
                            (self.retrieval_k >= 1, "--retrieval-k must be >= 1"),
                            (lengths_ok, "a minimum length exceeds its maximum")]:
            if not ok:
                raise InvalidParameterError(message)


@dataclass
class DraftResult:
    pairs: list[dict]  # SFT records
    summary: dict  # chunks, drafted, kept, dropped (per reason), a few dropped drafts, seconds, config


def parse_draft(text: str) -> tuple[str, str] | None:
    """(question, answer) from a "Q: ... A: ..." draft, or None. The "Q:" label may be missing (a
    plain prompt ends with it); the answer ends at a blank line or the next "Q:" line."""
    a = A_LABEL.search(text)
    if a is None:
        return None
    start = ([0] + [q.end() for q in Q_LINE.finditer(text, 0, a.start())])[-1]
    answer = re.split(r"\n[ \t]*\n", text[a.end():].strip("\n"), maxsplit=1)[0]
    answer = Q_LINE.split(answer, maxsplit=1)[0]
    question, answer = (" ".join(t.split()).strip(" \"'*_`") for t in (text[start:a.start()], answer))
    return (question, answer) if question and answer else None


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _stem(w: str) -> str:  # plural -> singular, roughly
    if len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w
    return w[:-3] + "y" if w.endswith("ies") else w[:-2] if w.endswith(("sses", "xes", "shes", "ches")) else w[:-1]


def content_words(text: str) -> list[str]:
    return [_stem(w) for w in words(text) if w not in STOPWORDS]


def grounding(answer: str, source: str) -> float:
    """Fraction of the answer's content words (all its words if it has none) found in `source`."""
    mine = content_words(answer) or [_stem(w) for w in words(answer)]
    theirs = {_stem(w) for w in words(source)}
    return sum(w in theirs for w in mine) / len(mine) if mine else 0.0


class NearDuplicates:
    """Exact (normalised) and near-duplicate questions: Jaccard similarity of content-word
    unigrams + bigrams, compared only with kept questions sharing a shingle (inverted index)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact, self.shingles, self.index = set(), [], {}  # normalised texts; shingle sets; shingle -> ids

    @staticmethod
    def shingle(text: str) -> set[str]:
        w = content_words(text)
        return set(w) | {f"{a} {b}" for a, b in zip(w, w[1:])}

    def seen(self, text: str) -> bool:
        if " ".join(words(text)) in self.exact:
            return True
        mine = self.shingle(text)
        candidates = {i for s in mine for i in self.index.get(s, ())}
        return any(len(mine & self.shingles[i]) / len(mine | self.shingles[i]) >= self.threshold for i in candidates)

    def add(self, text: str) -> None:
        self.exact.add(" ".join(words(text)))
        for s in self.shingle(text):
            self.index.setdefault(s, []).append(len(self.shingles))
        self.shingles.append(self.shingle(text))


def check_pair(question: str, answer: str, source: str, cfg: DraftConfig) -> str | None:
    """The first filter (a REASONS name) that a parsed pair fails, or None; duplicates and
    retrieval are checked by the caller, which knows the pairs kept so far."""
    nq, na = len(words(question)), len(words(answer))
    if nq < cfg.min_question_words or na < cfg.min_answer_words:
        return "too_short"
    if nq > cfg.max_question_words or na > cfg.max_answer_words:
        return "too_long"
    if not question.endswith("?") or not any(w in QUESTION_WORDS for w in words(question)):
        return "not_a_question"
    if grounding(answer, source) < cfg.min_overlap:
        return "ungrounded"
    return None


def chunk_source(chunk: dict) -> str:  # what the model is told the passage is
    parts = [chunk.get("title") or Path(chunk.get("path", "")).name, chunk.get("heading") or ""]
    return " > ".join(p for p in parts if p) + (f", p. {chunk['page']}" if chunk.get("page") else "")


def draft_prompt(chunk: dict, chat: bool, text: str | None = None) -> tuple[Prompt, str]:
    """(prompt, prefix): a one-message chat or a plain prompt ending in "Q:"; `prefix` is what the
    prompt already said of the draft (prepended to the generated text before parsing)."""
    body = INSTRUCTION.format(source=chunk_source(chunk), text=chunk["text"] if text is None else text)
    return ([{"role": "user", "content": body}], "") if chat else (body + "\n\nQ:", "Q:")


def fitted_prompt(chunk: dict, chat: bool, count: Callable[[Prompt], int], budget: int) -> tuple[Prompt, str]:
    """draft_prompt with the chunk's end cut off until the prompt fits `budget` tokens."""
    prompt = draft_prompt(chunk, chat)
    if count(prompt[0]) <= budget:
        return prompt
    lo, hi = 0, len(chunk["text"])  # the longest prefix of the chunk that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(draft_prompt(chunk, chat, chunk["text"][:mid])[0]) <= budget else (lo, mid - 1)
    if lo == 0:
        raise ContextLengthError(f"the drafting prompt does not fit in {budget} tokens of context; lower --max-new-tokens")
    return draft_prompt(chunk, chat, chunk["text"][:lo])


def lm_generate(model, temperature: float, top_p: float, max_new_tokens: int, seed: int) -> Generate:
    """A Generate over a genlab LanguageModel; each call uses fresh seeds (sample j: seed + j)."""
    calls = [0]  # samples drawn so far: the next call's seeds start after them

    def generate(prompts: list[Prompt], n: int) -> list[list[str]]:
        out = model.generate(list(prompts), n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             seed=seed + calls[0])
        calls[0] += n
        return [[c.text for c in out if c.prompt_index == i] for i in range(len(prompts))]

    return generate


def synthesize(chunks: Iterable[dict], generate: Generate, cfg: DraftConfig | None = None,
               prompt_for: Callable[[dict], tuple[Prompt, str]] | None = None, retriever=None,
               progress: Callable[[int, int], None] = lambda done, kept: None) -> DraftResult:
    """Draft `cfg.per_chunk` pairs per chunk (dicts with id, path, title, heading, page, text)
    and filter them. `retriever` (a genlab Retriever) is needed for `cfg.check_retrieval`;
    `progress(chunks done, pairs kept)` is called after each batch."""
    cfg = cfg or DraftConfig()
    if cfg.check_retrieval and retriever is None:
        raise InvalidParameterError("the retrieval check needs the store's retriever")
    prompt_for = prompt_for or (lambda c: draft_prompt(c, chat=False))
    chunks, start = list(chunks), time.perf_counter()
    dropped, examples = dict.fromkeys(REASONS, 0), {r: [] for r in REASONS}  # examples: a few dropped drafts per reason
    pairs, dups, drafted = [], NearDuplicates(cfg.max_similarity), 0
    for b in range(0, len(chunks), cfg.batch_size):
        batch = chunks[b : b + cfg.batch_size]
        prompts = [prompt_for(c) for c in batch]
        texts = generate([p for p, _ in prompts], cfg.per_chunk)
        for chunk, (_, prefix), drafts in zip(batch, prompts, texts):
            source = f"{chunk_source(chunk)}\n{chunk['text']}"
            for text in drafts:
                drafted += 1
                parsed = parse_draft(prefix + text)
                reason = "parse_failed" if parsed is None else check_pair(*parsed, source, cfg)
                if reason is None and dups.seen(parsed[0]):
                    reason = "duplicate"
                if reason is None and cfg.check_retrieval:
                    hits = retriever.search(parsed[0], k=cfg.retrieval_k)
                    reason = None if any(h.id == chunk["id"] for h in hits) else "not_retrieved"
                if reason:
                    dropped[reason] += 1
                    if len(examples[reason]) < 3:
                        examples[reason].append(prefix + text)
                    continue
                dups.add(parsed[0])
                pairs.append(sft_record(*parsed, chunk, grounding(parsed[1], source)))
        progress(b + len(batch), len(pairs))
    summary = {"chunks": len(chunks), "per_chunk": cfg.per_chunk, "drafted": drafted, "kept": len(pairs),
               "dropped": dropped, "dropped_examples": {r: e for r, e in examples.items() if e},
               "seconds": round(time.perf_counter() - start, 3), "config": asdict(cfg)}
    return DraftResult(pairs, summary)


def sft_record(question: str, answer: str, chunk: dict, overlap: float) -> dict:
    """A `messages` record for genlab finetune, with where its answer came from."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "source": {k: chunk.get(k) for k in ("id", "path", "title", "heading", "page", "start", "end")},
            "grounding": round(overlap, 4)}


def read_chunks(store, n: int | None = None, seed: int = 0) -> list[dict]:
    """Every chunk of a genlab Store, or a seeded sample of `n` of them (in store order)."""
    ids = [i for (i,) in store.db.execute("SELECT id FROM chunks ORDER BY id")]
    if not ids:
        raise DataError(f"{store.folder}: the store holds no chunks (add some: genlab index DOCS --store {store.folder})")
    if n is not None and n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    rows = {}
    for i in range(0, len(ids), 500):  # SQLite caps the parameters of one query
        rows.update(store.chunks(ids[i : i + 500]))
    return [rows[i] for i in ids]


def draft_instructions(store: str | Path, model, out: str | Path, cfg: DraftConfig | None = None, embedder=None,
                       chat: bool | None = None, device: str = "cpu", console=None) -> DraftResult:
    """Draft pairs from `store`'s chunks with `model` (LanguageModel, model folder or Generate), write
    them to `out` (JSONL) and its `.summary.json` atomically. `embedder`: the store's (folder or Embedder),
    for the retrieval check; `chat`: prompt through the chat template (None: if the tokenizer has one)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from genlab.lm import LanguageModel, load
    from genlab.rag.retrieve import Retriever
    from genlab.rag.store import Store

    cfg, out = cfg or DraftConfig(), Path(out)
    if out.suffix.lower() != ".jsonl":
        raise InvalidParameterError(f"{out}: the output must be a .jsonl file (what genlab finetune reads)")
    db = Store(store)
    chunks = read_chunks(db, cfg.chunks, cfg.seed)
    retriever = Retriever(db, embedder) if cfg.check_retrieval else None
    lm = load(model, device=device) if isinstance(model, (str, Path)) else model
    if not isinstance(lm, LanguageModel):  # a Generate callable: tests, or another backend
        generate, chat = lm, bool(chat)
        prompt_for = lambda c: draft_prompt(c, chat)  # noqa: E731
    else:
        if not hasattr(lm.tokenizer, "apply_chat_template"):
            raise ModelLoadError(f"{model}: not a text model (its codec is {type(lm.tokenizer).__name__})")
        chat = getattr(lm.tokenizer, "chat_template", None) is not None if chat is None else chat
        budget, count = lm.max_seq_len - cfg.max_new_tokens, lambda p: len(lm.encode(p))
        if budget < 1:
            raise ContextLengthError(f"--max-new-tokens {cfg.max_new_tokens} fills the model's {lm.max_seq_len}-token context")
        generate = lm_generate(lm, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed)
        prompt_for = lambda c: fitted_prompt(c, chat, count, budget)  # noqa: E731
    with Progress(TextColumn("[bold]draft"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks · {task.fields[kept]} kept"),
                  TimeRemainingColumn(), console=console, disable=console is None) as bar:
        task = bar.add_task("draft", total=len(chunks), kept=0)
        result = synthesize(chunks, generate, cfg, prompt_for, retriever,
                            progress=lambda done, kept: bar.update(task, completed=done, kept=kept))
    db.close()
    result.summary.update(store=str(store), model=str(getattr(lm, "path", None) or model), chat=chat, out=str(out))
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.pairs))
    write_json(out.with_suffix(".summary.json"), result.summary)
    return result
