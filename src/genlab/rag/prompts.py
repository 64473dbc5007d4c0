"""Grounded prompts: Jinja2 templates with a system prompt, few-shot examples and the retrieved
context numbered [1]..[k], fitted to the model's context budget; and `ask`, which answers from
retrieved chunks and reports which sources the answer's [n] markers cite.

Template variables: `system` (str or None), `examples` (list of {question, answer}),
`context` (list of {n, title, heading, source, text}), `question`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import jinja2

from genlab.errors import ContextLengthError, InvalidParameterError

BUILTIN = {
    "qa": (
        "{% if system %}{{ system }}\n\n{% endif %}"
        "Answer the question from the numbered sources. Cite the sources you use as [n].\n\n"
        "{% for ex in examples %}Question: {{ ex.question }}\nAnswer: {{ ex.answer }}\n\n{% endfor %}"
        "Sources:\n{% for c in context %}[{{ c.n }}] {{ c.title }}{% if c.heading %} > {{ c.heading }}{% endif %}\n"
        "{{ c.text }}\n\n{% endfor %}"
        "Question: {{ question }}\nAnswer:"
    ),
    "context": (  # for base (non-chat) models: the sources as a document to continue
        "{% for c in context %}[{{ c.n }}] {{ c.text }}\n\n{% endfor %}"
        "{% for ex in examples %}Q: {{ ex.question }}\nA: {{ ex.answer }}\n\n{% endfor %}"
        "Q: {{ question }}\nA:"
    ),
}
MARKER = re.compile(r"\[(\d+)\]")


def load_template(name_or_file: str | None) -> jinja2.Template:
    """A built-in template by name, or a Jinja2 template file."""
    name_or_file = name_or_file or "qa"
    if name_or_file in BUILTIN:
        source = BUILTIN[name_or_file]
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise InvalidParameterError(f"{name_or_file}: neither a built-in template ({', '.join(BUILTIN)}) nor a file")
        source = path.read_text(encoding="utf-8")
    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidParameterError(f"{name_or_file}:{e.lineno}: template syntax error: {e.message}") from None


def build_prompt(template: jinja2.Template, question: str, hits: list, count: Callable[[str], int], budget: int,
                 system: str | None = None, examples: list[dict] | None = None) -> tuple[str, list]:
    """The rendered prompt and the hits it holds: the lowest-ranked chunks are dropped until the
    prompt fits `budget` tokens; if the best chunk alone is too long, its end is cut off."""

    def render(kept):
        context = [{"n": i + 1, "title": h.title, "heading": h.heading, "source": h.source, "text": h.text}
                   for i, h in enumerate(kept)]
        try:
            return template.render(system=system, examples=examples or [], context=context, question=question)
        except jinja2.UndefinedError as e:
            raise InvalidParameterError(f"template error: {e.message}") from None

    kept = list(hits)
    while len(kept) > 1 and count(render(kept)) > budget:
        kept.pop()
    if count(render(kept)) <= budget:
        return render(kept), kept
    if count(render([])) > budget:
        raise ContextLengthError(f"the prompt needs {count(render([]))} tokens without any source; the budget is {budget}")
    best, lo, hi = kept[0], 0, len(kept[0].text)  # the longest prefix of the best chunk that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(render([replace(best, text=best.text[:mid])])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    kept = [replace(best, text=best.text[:lo], end=best.start + lo)] if lo else []
    return render(kept), kept


@dataclass
class Answer:
    text: str
    sources: list  # the hits given to the model, [1]..[k]
    cited: list[int] = field(default_factory=list)  # valid [n] markers, in order of first use
    invalid: list[int] = field(default_factory=list)  # markers that point to no source

    def cited_sources(self) -> list:
        return [self.sources[n - 1] for n in self.cited]


def citations(text: str, n_sources: int) -> tuple[list[int], list[int]]:
    numbers = list(dict.fromkeys(int(m) for m in MARKER.findall(text)))
    return [n for n in numbers if 1 <= n <= n_sources], [n for n in numbers if not 1 <= n <= n_sources]


def ask(model, retriever, question: str, k: int = 5, template: str | None = None, system: str | None = None,
        examples: list[dict] | None = None, method: str = "hybrid", chat: bool = False,
        on_text: Callable[[str], None] | None = None, **sampling) -> Answer:
    """Retrieve, prompt, generate (streaming pieces to `on_text`), and check the citations."""
    if not question.strip():
        raise InvalidParameterError("empty question")
    hits = retriever.search(question, k=k, method=method)
    max_new = sampling.setdefault("max_new_tokens", 256)
    budget = model.max_seq_len - max_new
    wrap = (lambda p: [{"role": "user", "content": p}]) if chat else (lambda p: p)
    prompt, kept = build_prompt(load_template(template), question, hits, lambda p: len(model.encode(wrap(p))), budget,
                                system=system, examples=examples)
    pieces = []
    for piece in model.stream(wrap(prompt), **sampling):
        pieces.append(piece)
        if on_text:
            on_text(piece)
    text = "".join(pieces)
    cited, invalid = citations(text, len(kept))
    return Answer(text, kept, cited, invalid)
