"""The generation loop: batched prompts of any lengths -> sampled continuations, streamed step
by step. Modality-agnostic: it sees token ids; text only enters through the tokenizer used for
stop strings and streaming."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from genlab.errors import ContextLengthError, InvalidParameterError
from genlab.generate.backends import backend_for, left_pad
from genlab.generate.detok import TextStream
from genlab.generate.sampling import RowSampler, SamplingParams
from genlab.model.adapters import base_module


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # generated tokens (stop token excluded)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (stop token/string) or "length"

    def __str__(self) -> str:
        return self.text


@dataclass
class Delta:
    """What one decoding step added to one completion."""

    index: int  # position in the list of completions
    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None


class Engine:
    def __init__(self, module, tokenizer, eos_token_ids: list[int], compile: bool = False, pack: bool = True):
        self.backend = backend_for(module, compile=compile, pack=pack)
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_token_ids or [0])[0]
        self.vocab_size = base_module(module).config.vocab_size

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 constraints: list | None = None) -> list[Completion]:
        completions = None
        for completions, _ in self.run(prompts, params, stream_text=bool(params.stop), constraints=constraints):
            pass
        return completions

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[Delta]]:
        for _, deltas in self.run(prompts, params, stream_text=True):
            if deltas:
                yield deltas

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], params: SamplingParams, stream_text: bool, constraints: list | None = None):
        """Yield (completions, deltas of this step) after every decoding step.

        `constraints`: constrained decoding, one object per completion (row i * n + j is sample j
        of prompt i) with the interface of generate.constrain.JsonObjectConstraint: `mask(logits)`
        restricts the row's next token, `advance(token)` feeds the chosen one, and the row stops once
        it is `complete`. A row cut by max_new_tokens ends with "length"; a caller that needs a
        complete output appends the constraint's `closing()`. Logprobs stay the model's own.
        """
        if not prompts:
            raise InvalidParameterError("no prompts given")
        limit = self.backend.max_seq_len
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidParameterError(f"prompt {i} is empty")
            if len(p) >= limit:
                raise ContextLengthError(f"prompt {i} has {len(p)} tokens; the model's context is {limit} tokens")
        rows = [(i, j) for i, _ in enumerate(prompts) for j in range(params.n)]
        if constraints is not None and len(constraints) != len(rows):
            raise InvalidParameterError(f"{len(constraints)} constraints for {len(rows)} completions")
        base_seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**62)
        sampler = RowSampler([params] * len(rows), [base_seed + j for _, j in rows], self.vocab_size, self.backend.device)
        completions = [Completion(i, j, len(prompts[i]), logprobs=[] if params.logprobs else None,
                                  top_logprobs=[] if params.top_logprobs else None) for i, j in rows]
        streams = [TextStream(self.tokenizer, params.stop) for _ in rows] if stream_text else None
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids + params.stop_token_ids)), device=self.backend.device)

        ids, valid = left_pad([prompts[i] for i, _ in rows], self.pad_id, self.backend.device)
        budget = min(params.max_new_tokens, limit - ids.shape[1])  # new tokens the cache can still hold
        logits = self.backend.prefill(ids, valid, ids.shape[1] + budget)
        sampler.observe(ids, valid)
        for step in range(budget):
            tokens = sampler(self._constrain(logits, constraints, completions) if constraints else logits)
            sampler.observe(tokens[:, None])
            hit_stop = torch.isin(tokens, stop_ids)
            chosen = self._logprobs(logits, tokens, params)
            deltas = []
            for r, (tok, stop) in enumerate(zip(tokens.tolist(), hit_stop.tolist())):
                c = completions[r]
                if c.finish_reason:
                    continue
                text, reason = "", None
                if stop:
                    reason = "stop"
                else:
                    c.token_ids.append(tok)
                    if chosen is not None:
                        self._record_logprobs(c, chosen, r, tok)
                    if streams:
                        text = streams[r].add(tok)
                        reason = "stop" if streams[r].stopped else None
                    if constraints:
                        constraints[r].advance(tok)
                        reason = "stop" if constraints[r].complete else reason
                if reason is None and step == budget - 1:
                    reason = "length"
                if reason and streams:
                    text += streams[r].flush()
                c.finish_reason = reason
                if streams:  # only streaming reads deltas; generate() skips building them
                    deltas.append(Delta(r, tok, text, c.logprobs[-1] if c.logprobs and not stop else None, reason))
            if all(c.finish_reason for c in completions):
                self._finish(completions, streams)
                yield completions, deltas
                return
            yield completions, deltas
            logits = self.backend.decode(tokens)

    @staticmethod
    def _constrain(logits: torch.Tensor, constraints: list, completions: list[Completion]) -> torch.Tensor:
        masked = logits.clone()  # the raw logits still give the logprobs
        for r, (constraint, c) in enumerate(zip(constraints, completions)):
            if not c.finish_reason:
                masked[r] = constraint.mask(logits[r])
        return masked

    def _finish(self, completions, streams):
        for r, c in enumerate(completions):
            c.text = streams[r].text if streams else self.tokenizer.decode(c.token_ids, skip_special_tokens=True)

    @staticmethod
    def _logprobs(logits, tokens, params: SamplingParams):
        if not (params.logprobs or params.top_logprobs):
            return None
        logp = logits.log_softmax(-1)
        top = logp.topk(params.top_logprobs, -1) if params.top_logprobs else None
        return logp.gather(1, tokens[:, None])[:, 0].tolist(), top

    @staticmethod
    def _record_logprobs(c: Completion, chosen, r: int, tok: int):
        values, top = chosen
        if c.logprobs is not None:
            c.logprobs.append(values[r])
        if top is not None:
            c.top_logprobs.append(dict(zip(top.indices[r].tolist(), top.values[r].tolist())))
