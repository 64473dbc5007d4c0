"""Music as ABC text (issue 10): the corpus music21 ships, normalised to single tunes; the ABC
codec over the text tokenizer (the header as a conditioning prefix); a tune model trained by
`genlab.pretrain`, scored against a character n-gram; tunes generated in a key and meter and
checked by music21, written as ABC and MIDI."""

_API = {
    "music21_corpus": "corpus", "build_corpus": "corpus", "normalise_tune": "corpus", "check_tune": "corpus",
    "tunes_to_abc": "corpus", "MusicSpec": "codec", "conditioning": "codec", "train_abc_tokenizer": "codec",
    "CharNgram": "baseline", "MusicTrainConfig": "train", "train_music": "train", "generate_tunes": "generate",
    "write_abc": "generate", "write_midi": "generate",
}


def __getattr__(name):
    # Lazy, so `genlab music --help` and bad-input errors do not pay for torch or music21.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"genlab.music.{_API[name]}"), name)
    raise AttributeError(f"module 'genlab.music' has no attribute {name!r}")


__all__ = sorted(_API)
