"""Build pydoc_qrels.jsonl and pydoc_qrels_words.jsonl: known-item retrieval sets over CPython's bundled documentation topics.

Each document is one `pydoc_data.topics` entry, cut to its first CHARS characters (the test
indexes the same cut, saved as TOPIC.txt). Per topic, the relevant source
being the topic's file:
- pydoc_qrels.jsonl: a question in a user's own words (pydoc_questions.json, written by hand
  from the topic's name, without looking at retrieval results), where meaning matters more
  than wording; the test's labelled set;
- pydoc_qrels_words.jsonl: a simulated known-item query of a user who remembers words of the document (Azzopardi, de
  Rijke & Balog, SIGIR 2007): QUERY_WORDS content words drawn at random from one of its
  sentences, in their original order, where wording matters.

    python tests/data/make_pydoc_qrels.py   # rewrites both files
"""

import json
import random
import re
from pathlib import Path

CHARS = 2500
QUERY_WORDS = 5
STOP = set("""a an and are as at be by can for from has have if in into is it its may must not of on or such that the
their then there these this to was were which will with you your when where how what than also other only one two
any all each more most some same used use using see e g i example following""".split())


def topic_documents() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: text[:CHARS] for name, text in sorted(topics.items())}


def main():
    rng = random.Random(2026)
    questions = json.loads(Path(__file__).with_name("pydoc_questions.json").read_text())
    write("pydoc_qrels.jsonl", [{"query": q, "relevant": [f"{name}.txt"]} for name, q in sorted(questions.items())])
    out = []
    for name, text in topic_documents().items():
        sentences = [s for s in re.split(r"(?<=[.!?:])\s+", text) if len(re.findall(r"[A-Za-z]{3,}", s)) >= 8]
        if not sentences:
            continue
        sentence = rng.choice(sentences)
        words = [w for w in re.findall(r"[A-Za-z_]{3,}", sentence) if w.lower() not in STOP]
        picked = sorted(rng.sample(range(len(words)), min(QUERY_WORDS, len(words))))
        out.append({"query": " ".join(words[i] for i in picked), "relevant": [f"{name}.txt"]})
    write("pydoc_qrels_words.jsonl", out)


def write(name: str, records: list[dict]) -> None:
    path = Path(__file__).with_name(name)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} queries -> {path}")


if __name__ == "__main__":
    main()
