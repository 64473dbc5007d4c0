"""Request bodies of the OpenAI-compatible API (validated: a bad field is a 422 naming it).

genlab's extras (top_k, min_p, repetition_penalty, rag, adapter) sit at the top level, as other
OpenAI-compatible servers do; fields OpenAI defines that genlab does not implement are refused
when set to anything but their neutral value, never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # genlab extras
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    rag: bool = False
    rag_k: int = Field(4, ge=1, le=20)
    best_of: int | None = Field(None, ge=1, le=16)  # sample this many, return the one the reward model ranks first
    adapter: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported; use repetition_penalty")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.best_of and self.best_of > 1 and (self.stream or self.n > 1):
            raise ValueError("best_of returns one answer: it cannot be combined with stream or n > 1")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def chat(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _plain(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: one prompt per request (send a list of one, or a string)")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes (the openai client's default)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=100)
    choice: int = Field(0, ge=0)
    rating: int | None = None
    rating_scale: Literal["thumbs", "stars"] | None = None
    correction: str | None = None
    comment: str | None = None
    preferred: str | None = None
    rejected: str | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("rating", mode="before")
    @classmethod
    def _no_bool(cls, v):
        if isinstance(v, bool):
            raise ValueError("rating must be an integer (-1/1 thumbs, 1-5 stars), not a boolean")
        return v


class ImageRequest(BaseModel):
    """POST /v1/images/generations: OpenAI's fields (size, if given, must be the model's own;
    images come back as b64_json PNGs) plus genlab's sampling controls."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=1000)
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    size: str | None = None
    response_format: str = "b64_json"
    user: str | None = Field(None, max_length=256)
    # genlab extras
    seed: int | None = Field(None, ge=0, lt=2**31)
    guidance: float | None = Field(None, ge=0, le=20)
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    candidates: int = Field(1, ge=1, le=16)  # best of N by the model's captioner (image/rerank.py)

    @field_validator("response_format")
    @classmethod
    def _b64(cls, v):
        if v != "b64_json":
            raise ValueError("only b64_json is supported (this server keeps no image URLs)")
        return v
