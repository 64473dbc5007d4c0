"""The text codec: byte-level BPE tokenizers (HF `tokenizers`) and chat templates.

Byte-level BPE with no normaliser maps any UTF-8 string to ids and back exactly. A tokenizer
folder is what `transformers.AutoTokenizer` loads (tokenizer.json, tokenizer_config.json, the
chat template); the tokenizer adds `<|bos|>` in front of each encoded text, as Llama's does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from genlab.errors import DataError, InvalidParameterError, ModelLoadError
from genlab.fsutil import atomic_dir

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]  # ids 0, 1, 2, ...

# HF convention (messages, add_generation_prompt, bos_token, raise_exception).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PLAIN_CHAT_TEMPLATE = (  # for tokenizers with neither a template nor genlab's chat tokens
    "{% for message in messages %}{{ message['role'] ~ ': ' ~ message['content'] ~ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def train_tokenizer(sources=None, *, texts: Iterable[str] | None = None, vocab_size: int = 8192,
                    min_frequency: int = 2, extra_special_tokens: Iterable[str] = (), out_dir=None):
    """Train a byte-level BPE on `sources` (paths, see data.readers.iter_texts) or on `texts`.

    Returns a `transformers.PreTrainedTokenizerFast`; with `out_dir`, also saves it there
    atomically (an existing folder is replaced only once the new one is complete).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    minimum = 256 + len(specials)
    if vocab_size <= minimum:
        raise InvalidParameterError(f"vocab_size must be > {minimum} (256 bytes + {len(specials)} special tokens)")
    if (sources is None) == (texts is None):
        raise InvalidParameterError("give either sources (paths) or texts (strings)")
    counted = [0]

    def corpus():
        from genlab.data.readers import iter_texts

        for t in iter_texts(sources) if texts is None else texts:
            if t:
                counted[0] += 1
                yield t

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if counted[0] == 0:
        raise DataError("no text to train the tokenizer on (all inputs empty)")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=specials[3:], chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            fast.save_pretrained(tmp)
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such tokenizer folder")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer ({e})") from None


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: eos, plus genlab's end-of-turn token if present."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = tokenizer.convert_tokens_to_ids(END) if END in tokenizer.get_vocab() else None
    return sorted(set(ids + ([end] if end is not None else [])))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render a conversation with the model's own template (genlab's or a plain one as fallback)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(m, dict) or not isinstance(m.get(key), str):
                raise InvalidParameterError(f"message {i}: field '{key}' must be a string")
    template = tokenizer.chat_template
    if template is None:
        template = CHAT_TEMPLATE if END in tokenizer.get_vocab() else PLAIN_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError, including raise_exception() in templates
        raise InvalidParameterError(f"chat template failed: {e}") from None
