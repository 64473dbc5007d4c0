"""The Python API: `genlab.load(path)` -> LanguageModel with generate / stream / chat / save.

The CLI's `generate` and `chat` are thin wrappers over these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from genlab.codecs.text import render_chat, stop_token_ids
from genlab.errors import InvalidParameterError
from genlab.generate.engine import Completion, Engine
from genlab.generate.sampling import SamplingParams
from genlab.model import adapters as lora
from genlab.model import io
from genlab.model.transformer import Transformer

Messages = list[dict]


class LanguageModel:
    """A causal LM plus its tokenizer: genlab's own transformer or (fallback) a transformers model."""

    def __init__(self, module: torch.nn.Module, tokenizer, meta: dict | None = None, generation: dict | None = None,
                 compile: bool = False, hf_config: dict | None = None):
        self.module = module.eval()
        self.compile = compile
        self.hf_config = hf_config  # the config.json this model was loaded with, if any
        self.path: Path | None = None  # the folder it was loaded from
        self.adapters: dict[str, str] = {}  # name -> adapter folder
        self.default_adapter: str | None = None  # used when a call names none
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.generation_config = generation or {}
        eos = self.generation_config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_token_ids = sorted(set(eos) | set(stop_token_ids(tokenizer)))
        self.engine = Engine(module, tokenizer, self.eos_token_ids, compile=compile)

    @property
    def base(self) -> torch.nn.Module:
        """The model without adapter wrapping (genlab Transformer or transformers model)."""
        return lora.base_module(self.module)

    @property
    def native(self) -> bool:
        return isinstance(self.base, Transformer)

    @property
    def config(self):
        return self.base.config

    # --- adapters ----------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, name: str | None = None, default: bool = True) -> str:
        """Add a LoRA adapter (PEFT folder) under `name` (default: the folder's name). The base
        stays loaded once; each call picks an adapter with `adapter=NAME` ("base" for none).
        The first adapter loaded (or any with `default=True`) is used when a call names none."""
        name = name or Path(path).name
        self.module = lora.load_adapter(self.module, path, name).eval()
        self.engine = Engine(self.module, self.tokenizer, self.eos_token_ids, compile=self.compile)
        self.adapters[name] = str(path)
        if default or self.default_adapter is None:
            self.default_adapter = name
        return name

    def using(self, name: str | None):
        """Context manager: calls inside run with adapter `name` ("base": none; None: the default)."""
        return lora.active(self.module, name if name is not None else self.default_adapter)

    @property
    def max_seq_len(self) -> int:
        return self.engine.backend.max_seq_len

    # --- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: str | Messages) -> list[int]:
        """Token ids for a text prompt (the tokenizer adds its own bos, if any) or a chat."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]  # the template has bos

    def prompt_text(self, prompt: str | Messages) -> str:
        """The text the model is fed: a string as is, a chat rendered with the model's template."""
        return prompt if isinstance(prompt, str) else render_chat(self.tokenizer, prompt, add_generation_prompt=True)

    def _batch(self, prompts) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise InvalidParameterError("no prompts given")
        for i, p in enumerate(batch):
            if not isinstance(p, (str, list)) or (isinstance(p, str) and not p):
                raise InvalidParameterError(f"prompt {i} is empty or not text / a list of chat messages")
        return [self.encode(p) for p in batch], single

    # --- generation --------------------------------------------------------------------------
    def generate(self, prompts: str | Messages | list, **sampling) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list (-> list of Completions, n per prompt).

        A prompt is a string or a chat (list of {"role", "content"} dicts, rendered with the
        model's chat template). Keyword arguments are SamplingParams fields.
        """
        ids, single = self._batch(prompts)
        adapter = sampling.pop("adapter", None)
        params = SamplingParams(**sampling)
        with self.using(adapter):
            out = self.engine.generate(ids, params)
        return out[0] if single and params.n == 1 else out

    def stream(self, prompt: str | Messages, **sampling) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated."""
        ids, single = self._batch(prompt)
        if not single:
            raise InvalidParameterError("stream() takes one prompt; use generate() for batches")
        adapter = sampling.pop("adapter", None)
        params = SamplingParams(**sampling)
        if params.n != 1:
            raise InvalidParameterError("stream() generates one sample (n=1)")
        with self.using(adapter):
            for deltas in self.engine.stream(ids, params):
                for d in deltas:
                    if d.text:
                        yield d.text

    def chat(self, messages: Messages, **sampling) -> Completion:
        return self.generate(messages, **sampling)

    @torch.inference_mode()
    def logits(self, text: str, adapter: str | None = None) -> torch.Tensor:
        """Next-token logits at every position of `text` [T, V] (for scoring and tests)."""
        ids = torch.tensor([self.encode(text)], device=self.engine.backend.device)
        with self.using(adapter):
            out = self.module(input_ids=ids)
        return (out if isinstance(out, torch.Tensor) else out.logits)[0].float()

    def merge(self, adapter: str | None = None) -> "LanguageModel":
        """This model with an adapter folded into its weights (in place: the other adapters
        are dropped). Save the result for a plain Hugging Face folder."""
        name = adapter or self.default_adapter
        merged = lora.merge(self.module, name)
        meta = {**self.meta, "merged_adapter": self.adapters.get(name)}
        out = LanguageModel(merged, self.tokenizer, meta, self.generation_config, self.compile, self.hf_config)
        self.module, self.adapters, self.default_adapter = merged, {}, None
        return out

    def save(self, path: str | Path) -> Path:
        """Write the base model folder (adapters are saved as their own folders; see merge())."""
        generation = {**self.generation_config, "eos_token_id": self.eos_token_ids}
        if self.tokenizer.bos_token_id is not None:
            generation["bos_token_id"] = self.tokenizer.bos_token_id
        if self.tokenizer.pad_token_id is not None:
            generation["pad_token_id"] = self.tokenizer.pad_token_id
        return io.save(path, self.base, self.tokenizer, meta=self.meta, generation=generation, hf_config=self.hf_config)


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", compile: bool = False,
         adapters: list | dict | None = None) -> LanguageModel:
    """Load a genlab or Hugging Face causal-LM folder (or, with internet, a hub id), plus any
    LoRA adapter folders (a list, or {name: folder}); the first adapter is the default."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}.get(dtype) or _bad_dtype(dtype)
    loaded = io.load(path, dtype=dtype, device=device)
    model = LanguageModel(loaded.module, loaded.tokenizer, loaded.meta, loaded.generation, compile=compile,
                          hf_config=loaded.hf_config)
    model.path = loaded.path
    named = adapters.items() if isinstance(adapters, dict) else [(None, a) for a in adapters or []]
    for i, (name, folder) in enumerate(named):
        model.load_adapter(folder, name, default=i == 0)
    return model


def _bad_dtype(name):
    raise InvalidParameterError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")


def build(config, tokenizer, seed: int = 0, meta: dict | None = None) -> LanguageModel:
    """A new, randomly initialised genlab transformer sized for `tokenizer`.

    `config` is a preset name ("10m", ...) or a ModelConfig; its vocab_size is set from the
    tokenizer.
    """
    from dataclasses import replace

    from genlab.model.presets import preset
    from genlab.model.transformer import ModelConfig

    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, ModelConfig):
        raise InvalidParameterError("config must be a preset name or a ModelConfig")
    cfg = replace(cfg, vocab_size=len(tokenizer))
    module = Transformer(cfg).init_weights(seed)
    info = {"model_config": cfg.to_dict(), "provenance": {"created_by": "genlab.build", "seed": seed,
                                                          "preset": config if isinstance(config, str) else None}}
    generation = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return LanguageModel(module, tokenizer, meta={**info, **(meta or {})}, generation=generation)
