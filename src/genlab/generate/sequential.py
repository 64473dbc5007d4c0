"""One request at a time through transformers' `generate()`: the serving anchor bench/serve.py
compares continuous batching against, and the fallback for models genlab's transformer does not
run. Same interface as `Batcher` (submit / resolve_adapter / load / close)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import torch

from genlab.errors import ContextLengthError, InvalidParameterError
from genlab.generate.batcher import Event, QueueFullError, Request, _run_into, resolve_adapter
from genlab.generate.detok import TextStream
from genlab.model import adapters as lora


class SequentialWorker:
    def __init__(self, model, max_queue: int = 64, hf_module=None, threads: int | None = None):
        """`hf_module`: the transformers model to run (default: `model.module` if it is one,
        else transformers' own class loaded from the genlab folder)."""
        import transformers

        if hf_module is None:
            if model.native:
                if model.path is None:
                    raise InvalidParameterError("engine 'sequential' needs a model loaded from a folder")
                hf_module = transformers.AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
                for name, folder in model.adapters.items():
                    hf_module = lora.load_adapter(hf_module, folder, name).eval()
            else:
                hf_module = model.module
        self.model, self.hf = model, hf_module
        cfg = lora.base_module(hf_module).config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        self.max_queue, self.threads = max_queue, threads
        self.waiting: queue.Queue[Request | None] = queue.Queue()
        self.busy = 0
        self.thread = threading.Thread(target=self._loop, name="genlab-sequential", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        if len(request.prompt) >= self.max_len:
            raise ContextLengthError(f"the prompt has {len(request.prompt)} tokens; this model's context is "
                                     f"{self.max_len} tokens")
        if request.json_object or request.params.logprobs or request.params.top_logprobs:
            raise InvalidParameterError("json_object and logprobs need genlab's batching engine (engine 'batch')")
        request.adapter = self.resolve_adapter(request.adapter)
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFullError(f"{self.waiting.qsize()} requests are waiting; try again shortly")
        self.waiting.put(request)
        return request

    def resolve_adapter(self, name: str | None) -> str:
        return resolve_adapter(self.model, name)

    @property
    def load(self) -> dict:
        return {"running": self.busy, "waiting": self.waiting.qsize(), "slots": 1}

    def call(self, fn) -> Future:
        """Run `fn()` on the worker thread between two requests (see Batcher.call)."""
        future: Future = Future()
        self.waiting.put((fn, future))
        return future

    def load_adapter(self, path, name: str) -> Future:
        """Add an adapter to the transformers model while serving (between two requests)."""

        def load():
            self.hf = lora.load_adapter(self.hf, path, name).eval()
            self.model.adapters[name] = str(path)
            return name

        return self.call(load)

    def close(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def _loop(self):
        if self.threads and next(self.hf.parameters()).device.type == "cpu":  # as Batcher
            torch.set_num_threads(self.threads)
        while (req := self.waiting.get()) is not None:
            if isinstance(req, tuple):
                _run_into(*req)
                continue
            if req.cancelled:
                continue
            self.busy = 1
            try:
                with lora.active(self.hf, req.adapter):
                    self._generate(req)
            except Exception as e:  # keep serving the next request
                req.emit([Event(i, "", finish_reason=f"error: {type(e).__name__}: {e}") for i in range(req.params.n)])
            self.busy = 0

    @torch.inference_mode()
    def _generate(self, req: Request):
        import transformers

        p, tok = req.params, self.model.tokenizer
        stop_ids = sorted(set(self.model.eos_token_ids) | set(p.stop_token_ids))
        streams = [TextStream(tok, p.stop) for _ in range(p.n)]
        budget = min(p.max_new_tokens, self.max_len - len(req.prompt))
        worker = self

        class Streamer(transformers.generation.streamers.BaseStreamer):
            """Emits each new token as an event (n = 1); the first call carries the prompt."""

            def __init__(self):
                self.started, self.count = False, 0

            def put(self, value):
                if not self.started:
                    self.started = True
                    return
                self.count += 1
                worker._emit_token(req, streams[0], int(value.reshape(-1)[0]), stop_ids, self.count >= budget)

            def end(self):
                pass

        class Stop(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = [req.cancelled or s.stopped for s in streams]
                return torch.tensor(done * (len(input_ids) // len(done)), device=input_ids.device)

        if p.seed is not None:
            torch.manual_seed(p.seed)
        ids = torch.tensor([req.prompt], device=next(self.hf.parameters()).device)
        sample = p.temperature > 0
        out = self.hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=sample,
            temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
            top_k=p.top_k if sample and p.top_k else None, min_p=p.min_p if sample and p.min_p else None,
            repetition_penalty=p.repetition_penalty, num_return_sequences=p.n, eos_token_id=stop_ids or None,
            pad_token_id=self.model.engine.pad_id, streamer=Streamer() if p.n == 1 else None,
            stopping_criteria=transformers.StoppingCriteriaList([Stop()]))
        if p.n > 1:  # no streaming for several samples: emit each row's tokens now
            for j, row in enumerate(out[:, ids.shape[1]:].tolist()):
                for i, t in enumerate(row):
                    if self._emit_token(req, streams[j], t, stop_ids, i + 1 >= budget, index=j):
                        break

    @staticmethod
    def _emit_token(req: Request, stream: TextStream, token: int, stop_ids, last: bool, index: int = 0) -> bool:
        """Emit one token's event; True when this sample has finished."""
        if stream.stopped or req.cancelled:
            return True
        if token in stop_ids:
            req.emit([Event(index, stream.flush(), None, finish_reason="stop")])
            return True
        text = stream.add(token)
        reason = "stop" if stream.stopped else "length" if last else None
        if reason:
            text += stream.flush()
        req.emit([Event(index, text, token, finish_reason=reason)])
        return reason is not None
