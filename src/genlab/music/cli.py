"""`genlab music ...`: the ABC corpus, training a tune model, generating tunes (ABC and MIDI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from genlab.cli_options import (
    BatchSize, CkptEvery, Config, EvalEvery, Lr, MaxMinutes, MaxSteps, Out, Preset, Resume, SeqLen, TrainDevice,
    TrainSeed, Warmup, err, out,
)

music_app = typer.Typer(no_args_is_help=True, help="Music as ABC text: the corpus, training, tunes in a key and meter (ABC, MIDI).")

AbcData = Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="ABC files or folders (repeatable; default: the ABC corpus music21 ships).")]


@music_app.command("corpus")
def music_corpus(
    data: AbcData = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write train.jsonl, heldout.jsonl and report.json here.")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Share of tunes held out (by tune hash).")] = 0.05,
    max_chars: Annotated[int, typer.Option(help="Drop tunes longer than this (characters).")] = 800,
):
    """Read, normalise, check (music21) and split ABC tunes; print the counts.

    Example: genlab music corpus --out runs/abc-corpus
    """
    from genlab.music.corpus import build_corpus, music21_corpus
    from genlab.music.train import abc_files, write_corpus

    log = err.print
    corpus = (build_corpus(abc_files([str(d) for d in data]), heldout_fraction, max_chars, log=log) if data
              else music21_corpus(heldout_fraction, max_chars, log=log))
    if out_dir:
        write_corpus(corpus, out_dir)
    out.print_json(json.dumps(corpus.report))


@music_app.command("train")
def music_train(
    out_dir: Out = None,
    data: AbcData = None,
    config: Config = None,
    preset: Preset = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="BPE vocabulary trained on the training tunes.")] = None,
    split_words: Annotated[Optional[bool], typer.Option("--split-words/--no-split-words", help="Tokenizer: genlab's text pre-split into letters / digits / punctuation (default: off; merges over whole ABC lines).")] = None,
    heldout_fraction: Annotated[Optional[float], typer.Option(help="Share of tunes held out for bits per token / character.")] = None,
    baseline_order: Annotated[Optional[int], typer.Option(help="Order of the character Kneser-Ney n-gram baseline.")] = None,
    seq_len: SeqLen = None,
    batch_size: BatchSize = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    lr: Lr = None,
    warmup_steps: Warmup = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CkptEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    resume: Resume = False,
):
    """Train a tune model on ABC (music21's corpus by default) with genlab's pretraining; reports
    held-out bits per token and per character against a character n-gram fitted in the same run.

    Example: genlab music train --out runs/music --max-steps 2000
    """
    from genlab.music.train import train_music

    overrides = dict(out=str(out_dir) if out_dir else None, abc=[str(d) for d in data] if data else None,
                     preset=preset, vocab_size=vocab_size, split_words=split_words, heldout_fraction=heldout_fraction,
                     baseline_order=baseline_order, seq_len=seq_len, batch_size=batch_size, max_steps=max_steps,
                     max_minutes=max_minutes, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, seed=seed, device=device)
    result = train_music(config_file=config, resume=resume, console=err, **overrides)
    print(result.model_dir)


@music_app.command("generate")
def music_generate(
    model: Annotated[str, typer.Argument(help="Music model folder (or a `genlab music train` run folder).")],
    key: Annotated[str, typer.Option("--key", "-k", help="ABC key: D, Em, F#m, Ador, Gmix ...")] = "D",
    meter: Annotated[str, typer.Option("--meter", "-M", help="ABC meter: 6/8, 3/4, 2/4, C, C| ...")] = "6/8",
    n: Annotated[int, typer.Option("-n", help="Tunes to generate.")] = 4,
    out_abc: Annotated[Path, typer.Option("--out", "-o", help="ABC file of the tunes music21 parses (failures go to <stem>.failed.abc).")] = Path("tune.abc"),
    midi: Annotated[Optional[Path], typer.Option("--midi", help="MIDI file (one tune) or stem of <stem>-01.mid ... (several).")] = None,
    unit_length: Annotated[Optional[str], typer.Option("--unit-length", help="L: field (default: the model's usual one for the meter).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed -> same tunes.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Generate tunes in a key and meter; write those music21 parses as ABC (and MIDI), count the rest.

    Example: genlab music generate runs/music/model --key D --meter 6/8 -n 4 --out tune.abc --midi tune.mid
    """
    from genlab.music.codec import check_header

    check_header(key, meter, unit_length)  # before torch loads: bad input fails fast
    from genlab.music.generate import generate_tunes, write_abc, write_midi

    result = generate_tunes(model, key=key, meter=meter, n=n, unit=unit_length, seed=seed, temperature=temperature,
                            top_p=top_p, log=err.print)
    files = write_abc(result, out_abc)
    midi_errors = []
    if midi is not None:
        midi_files, midi_errors = write_midi(result, midi)
        files += midi_files
    summary = {**result.summary(), "files": [str(f) for f in files], "warnings": result.warnings,
               "midi_errors": midi_errors}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    s = summary
    out.print(f"{s['tunes']} tunes in K:{result.tunes[0].key} M:{result.tunes[0].meter}: {s['parsed']} parse with "
              f"music21 ({s['parse_rate']:.0%}), {s['failed']} failed"
              + (f" ({', '.join(f'{k} {v}' for k, v in s['failure_reasons'].items())})" if s["failed"] else "")
              + f"; {s['seconds']:.1f}s", highlight=False)
    for f in files:
        out.print(f"  -> {f}", highlight=False)
    for e in midi_errors:
        err.print(f"[yellow]note:[/] no MIDI for {e}", highlight=False)
