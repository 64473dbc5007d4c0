"""The text-to-image side of the server: POST /v1/images/generations.

Each generated image is recorded as its own completion (endpoint "images") with its token ids
(image codes + EOS, what preference tuning trains on), so thumbs (`/v1/feedback` with its id) and
A/B choices (`preferred` / `rejected`: two images of the same caption) use the feedback API as
text answers do. With a registry (`genlab image improve` writes image-registry.db) the promoted
version serves, and a newly promoted or rolled-back one replaces it between requests.
"""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from pathlib import Path

from genlab.errors import InvalidParameterError
from genlab.feedback.store import ChoiceRecord, CompletionRecord, FeedbackStore, new_completion_id


def png_base64(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ImageService:
    """One text-to-image model (a registry version when a registry is given), generation behind a
    lock (one request at a time on the CPU threads), every image recorded before it is returned."""

    def __init__(self, folder, store: FeedbackStore, name: str | None = None, registry=None, device: str = "cpu"):
        from genlab.image.feedback import load_version

        self.folder, self.store, self.device = Path(folder).resolve(), store, device
        self.name = name or self.folder.name
        self._load = load_version
        self._lock = threading.Lock()
        self.registry, self.serving = None, None
        if registry is not None:
            from genlab.feedback.registry import Registry

            self.registry = Registry(registry)
            self.serving = self.registry.ensure_initial(self.folder)
        self.model = load_version(self.folder, self.serving["adapter"] if self.serving else None, device)

    @property
    def version(self) -> str | None:
        return self.serving["name"] if self.serving else None

    def refresh(self) -> bool:
        """Serve the registry's promoted version if it changed; True if it did."""
        if self.registry is None:
            return False
        sid = self.registry.serving_id()
        if sid is None or sid == self.serving["id"]:
            return False
        version = self.registry.get(sid)
        model = self._load(self.folder, version["adapter"], self.device)  # loaded outside the lock
        with self._lock:
            self.model, self.serving = model, version
        return True

    def generate(self, body, user: str | None) -> dict:
        if body.model is not None and body.model != self.name:
            raise LookupError(f"The model '{body.model}' does not exist; the image model is '{self.name}'")
        started = time.perf_counter()
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        with self._lock:
            model, version = self.model, self.version
            codec = model.codec
            size = codec.image.config.size
            if body.size is not None and body.size != f"{size}x{size}":
                raise InvalidParameterError(f"size: this model draws {size}x{size} images, not {body.size}")
            ignored = codec.vocab.unknown(body.prompt)
            if not codec.caption_ids(body.prompt):
                raise InvalidParameterError(f"prompt: the model knows none of its words ({', '.join(ignored)})")
            codes = model.generate_codes([body.prompt], n=body.n, guidance=body.guidance, temperature=body.temperature,
                                         top_k=body.top_k, top_p=body.top_p, seed=seed, candidates=body.candidates)
        images = codec.image.decode(codes.reshape(len(codes), *codec.image.grid))
        return self._record(body, user, seed, model, version, codes, images, ignored, started)

    def _record(self, body, user, seed, model, version, codes, images, ignored, started) -> dict:
        from genlab.image.feedback import tokens_of

        codec = model.codec
        guidance = model.default_guidance if body.guidance is None else body.guidance
        temperature = model.default_temperature if body.temperature is None else body.temperature
        latency = (time.perf_counter() - started) * 1000
        request = body.model_dump(exclude_none=True)
        records, data = [], []
        for k, c in enumerate(codes):
            ids = tokens_of(codec, c)
            # best of N: the request's seed (and candidates) reproduce the image, not seed + k
            own_seed = seed + k if body.candidates == 1 else seed
            params = {"n": body.n, "index": k, "seed": own_seed, "guidance": guidance, "temperature": temperature,
                      "top_k": body.top_k, "top_p": body.top_p, "candidates": body.candidates}
            rec = CompletionRecord(id=new_completion_id("img"), endpoint="images", model=self.name, prompt=body.prompt,
                                   choices=[ChoiceRecord(0, "", "stop", len(ids), token_ids=ids)], request=request,
                                   params=params, adapter=version, model_version=version, user=user or body.user,
                                   prompt_tokens=len(codec.prompt(body.prompt)), completion_tokens=len(ids),
                                   latency_ms=latency)
            records.append(rec)
            data.append({"b64_json": png_base64(images[k]), "id": rec.id, "seed": own_seed, "revised_prompt": None})
        self.store.record_all(records)  # committed before the client sees an image
        return {"created": int(time.time()), "model": self.name, "version": version, "data": data,
                "ignored_words": ignored}

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()
