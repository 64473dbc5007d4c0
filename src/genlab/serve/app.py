"""The OpenAI-compatible HTTP API, the feedback API and the web UI, in one FastAPI app.

Every completion is recorded in the feedback database before the client sees its end (the
last choice's finish_reason, or the whole response when not streaming), so nothing a client
was given is lost if the server is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from genlab.errors import ContextLengthError, GenlabError, InvalidParameterError
from genlab.feedback.store import ChoiceRecord, CompletionRecord, FeedbackStore, new_completion_id
from genlab.generate.batcher import Event, QueueFullError
from genlab.generate.batcher import Request as EngineRequest
from genlab.generate.sampling import SamplingParams
from genlab.model import adapters as lora
from genlab.serve.auth import KeyRing
from genlab.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, FeedbackRequest, ImageRequest

log = logging.getLogger("genlab.serve")
RAG_SUFFIX = "+docs"


@dataclass
class ServeConfig:
    name: str | None = None  # the model id clients use (default: the folder's name)
    engine: str = "batch"  # "batch" (continuous batching) or "sequential" (transformers' generate per request)
    slots: int = 16  # rows of the running batch
    max_queue: int = 64  # waiting requests beyond which the server answers 503
    threads: int | None = None  # torch CPU threads for decoding (None: leave torch's setting; process-wide)
    db: str | Path = "genlab-feedback.db"
    store: str | Path | None = None  # RAG store (genlab index)
    embedder: str | None = None  # sentence-transformers folder for /v1/embeddings without a store
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | Path | None = None
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    registry: str | Path | None = None  # version registry: serve its promoted version, hot-swap on change
    improve_every: int | None = None  # run `genlab improve` in a background process after every N new feedback rows
    improve_args: list[str] = field(default_factory=list)  # extra `genlab improve` options for those runs
    poll_seconds: float = 1.0  # how often the registry is checked
    reward_model: str | Path | None = None  # for best_of (default: the serving version's, if it has one)
    max_body_bytes: int = 1_000_000
    max_prompt_chars: int = 100_000
    default_max_tokens: int = 256
    image_model: str | Path | None = None  # text-to-image model folder served at /v1/images/generations
    image_registry: str | Path | None = None  # its version registry (genlab image improve writes it)


class APIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type, self.headers = status, message, code, param, type, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_busy", type="server_error", headers={"Retry-After": "1"})
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, LookupError):
        return APIError(404, str(e).strip("'\""), "not_found")
    if isinstance(e, (InvalidParameterError, GenlabError)):
        return APIError(422, str(e), "invalid_parameter")
    raise e


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 (chunked bodies too)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"request body over {self.limit} bytes", "request_too_large").response()
        if declared is not None and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body over {self.limit} bytes", "request_too_large")
            return message

        try:
            await self.app(scope, counted, send)
        except APIError as e:
            await e.response()(scope, receive, send)


class Job:
    """The events of one engine request, carried from the engine thread into the event loop."""

    def __init__(self, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.texts, self.tokens = [""] * n, [0] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[Event]] = [[] for _ in range(n)]
        self.first_token: float | None = None

    def emit(self, events: list[Event]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    @property
    def done(self) -> bool:
        return all(self.finish)

    async def next(self, http: Request | None = None) -> list[Event]:
        while True:
            try:
                events = await asyncio.wait_for(self.queue.get(), 1.0)
                break
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    raise asyncio.CancelledError from None
        self.first_token = self.first_token or time.perf_counter()
        for e in events:
            self.texts[e.index] += e.text
            if e.token_id is not None:
                self.tokens[e.index] += 1
                if e.logprob is not None:
                    self.logprobs[e.index].append(e)
            if e.finish_reason:
                if e.finish_reason.startswith("error"):
                    raise APIError(500, f"generation failed ({e.finish_reason[7:]})", type="server_error")
                self.finish[e.index] = e.finish_reason
        return events


@dataclass
class Exchange:
    """One request on its way through the engine, and what gets recorded about it."""

    id: str
    endpoint: str  # "chat" or "completions"
    model: str
    adapter: str
    body: dict
    messages: list[dict] | None
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    sources: list | None
    user: str | None
    job: Job
    version: str | None = None  # model and adapter version (content digests)
    rewards: list[float] | None = None  # best_of: the reward model's scores, best first
    engine_request: EngineRequest | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    def record(self) -> CompletionRecord:
        p = self.params
        params = {"max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                  "min_p": p.min_p, "repetition_penalty": p.repetition_penalty, "stop": p.stop, "seed": p.seed, "n": p.n}
        choices = [ChoiceRecord(i, self.job.texts[i], self.job.finish[i], self.job.tokens[i]) for i in range(p.n)]
        return CompletionRecord(
            id=self.id, endpoint=self.endpoint, model=self.model, prompt=self.prompt, choices=choices,
            request=self.body, params=params, messages=self.messages, adapter=self.adapter, user=self.user,
            model_version=self.version,
            sources=self.sources, prompt_tokens=len(self.prompt_ids), completion_tokens=sum(self.job.tokens),
            latency_ms=(time.perf_counter() - self.started) * 1000)

    def usage(self) -> dict:
        completion = sum(self.job.tokens)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}


class Server:
    """What the routes share: the model, its engine worker, the stores, the keys."""

    def __init__(self, model, config: ServeConfig):
        from genlab.generate.batcher import Batcher
        from genlab.generate.sequential import SequentialWorker

        self.model, self.config = model, config
        self.feedback = FeedbackStore(config.db)
        self.images = None
        if config.image_model is not None:  # before the text model: an image-only server has none
            from genlab.serve.images import ImageService

            self.images = ImageService(config.image_model, self.feedback, registry=config.image_registry)
        if model is None:
            self._image_only(config)
            return
        self.name = config.name or (Path(model.path).name if model.path else "genlab")
        self.registry, self.serving = None, None
        self._reward = None  # best_of's reward model, loaded on first use
        self.improver, self.improved_at = None, None  # the background improve process; feedback count it started at
        if config.improve_every and config.registry is None:  # the loop needs a registry: default beside the db
            config.registry = Path(config.db).with_name("registry.db")
        if config.registry is not None:
            from genlab.feedback.registry import Registry

            if model.path is None:
                raise InvalidParameterError("serving from a registry needs a model loaded from a folder")
            self.registry = Registry(config.registry)
            default = model.adapters.get(model.default_adapter) if model.default_adapter else None
            current = self.registry.ensure_initial(model.path, adapter=default)
            self._activate(current, lambda path, name: model.load_adapter(path, name, default=False))
        if config.engine == "batch":
            self.worker = Batcher(model, slots=config.slots, max_queue=config.max_queue, threads=config.threads)
        elif config.engine == "sequential":
            self.worker = SequentialWorker(model, max_queue=config.max_queue, threads=config.threads)
        else:
            raise InvalidParameterError(f"unknown engine {config.engine!r}; use 'batch' or 'sequential'")
        self.context = self.worker.max_len
        base = folder_version(model.path) if model.path else None
        self.versions = {lora.BASE: base, **{name: f"{base}+{name}@{folder_version(folder)}"
                                             for name, folder in model.adapters.items()}}
        self.keys = KeyRing.load(config.api_keys, config.api_keys_file)
        self.retriever = None
        if config.store is not None:
            from genlab.rag.retrieve import Retriever

            self.retriever = Retriever(config.store, config.embedder)
        self._embedder = None

    def _image_only(self, config: ServeConfig) -> None:
        """No text model: the image endpoint, feedback and the UI only."""
        if self.images is None:
            raise InvalidParameterError("nothing to serve: give a text model or an image model folder")
        if config.registry is not None or config.improve_every or config.store is not None:
            raise InvalidParameterError("registry, improve_every and store need a text model "
                                        "(an image model's registry is image_registry)")
        self.name, self.registry, self.serving, self.worker, self.context = self.images.name, None, None, None, 0
        self.versions, self.retriever, self._embedder, self._reward = {}, None, None, None
        self.improver = self.improved_at = None
        self.keys = KeyRing.load(config.api_keys, config.api_keys_file)

    @property
    def embedder(self):
        if self._embedder is None:
            from genlab.rag.embed import Embedder

            self._embedder = self.retriever.embedder if self.retriever else Embedder(self.config.embedder)
        return self._embedder

    def _activate(self, version: dict, load) -> None:
        """Make a registry version the default for new requests (its adapter loaded as NAME:vN)."""
        name = version["name"]
        if version["adapter"] and name not in self.model.adapters:
            load(version["adapter"], name)
        self.model.default_adapter = name if version["adapter"] else None
        self.serving = version
        self._reward = None

    async def follow_registry(self) -> None:
        """Hot swap: poll the registry; a newly promoted (or rolled back) version serves the next
        requests, while requests already running finish on the version they started with."""
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            try:
                sid = await asyncio.to_thread(self.registry.serving_id)
                if sid is None or sid == self.serving["id"]:
                    continue
                version = await asyncio.to_thread(self.registry.get, sid)

                def load(path, name):  # on the engine thread, between decoding steps
                    self.worker.load_adapter(path, name).result()

                await asyncio.to_thread(self._activate, version, load)
                if version["adapter"]:
                    self.versions[version["name"]] = f"{self.versions[lora.BASE]}+{version['name']}@{folder_version(version['adapter'])}"
                log.info("now serving %s (%s)", version["name"], version.get("note") or "")
            except Exception:  # a broken registry must not take serving down
                log.exception("registry check failed")

    def maybe_improve(self) -> None:
        """After every `improve_every` new feedback rows, start `genlab improve` in its own process
        (never blocking serving; a failed or losing run leaves the serving version as it is)."""
        import subprocess
        import sys

        if not self.config.improve_every or (self.improver is not None and self.improver.poll() is None):
            return
        count = self.feedback.count_feedback()
        if self.improved_at is None:
            self.improved_at = 0
        if count - self.improved_at < self.config.improve_every:
            return
        self.improved_at = count
        runs = Path(self.config.db).with_name("improve-runs")
        runs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "genlab.cli", "improve", str(self.model.path), "--feedback", str(self.config.db),
               "--registry", str(self.config.registry), "--out", str(runs), *self.config.improve_args]
        log_file = open(runs / f"improve-{int(time.time())}.log", "w")  # noqa: SIM115 - handed to the child
        self.improver = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        log.info("feedback rows: %d; started genlab improve (pid %d)", count, self.improver.pid)

    def reward_model(self):
        """The reward model for best_of: --reward-model, else the serving version's."""
        if self._reward is None:
            path = self.config.reward_model or ((self.serving or {}).get("data") or {}).get("reward_model")
            if not path:
                raise APIError(422, "best_of needs a reward model: start the server with --reward-model DIR, or "
                                    "serve a registry version trained by genlab improve", "invalid_parameter", "best_of")
            from genlab.train.prefer import RewardModel

            self._reward = RewardModel(path)
        return self._reward

    def model_ids(self) -> list[str]:
        """The text model ids (the image model's is `images.name`)."""
        if self.model is None:
            return []
        names = [self.name] + [f"{self.name}:{a}" for a in self.model.adapters]
        if self.retriever is not None:
            names += [n + RAG_SUFFIX for n in names]
        return names

    def resolve(self, model: str, adapter: str | None, rag: bool) -> tuple[str | None, bool]:
        """(adapter, rag) for a model id: NAME, NAME:ADAPTER, either + "+docs"."""
        if model not in self.model_ids():
            raise APIError(404, f"The model '{model}' does not exist; available: {', '.join(self.model_ids())}",
                           "model_not_found", "model")
        if model.endswith(RAG_SUFFIX):
            model, rag = model[: -len(RAG_SUFFIX)], True
        if ":" in model and adapter is None:
            adapter = model.split(":", 1)[1]
        if rag and self.retriever is None:
            raise APIError(422, "rag needs a document store: start the server with --store DIR", "rag_unavailable", "rag")
        return adapter, rag

    def close(self):
        if self.worker is not None:
            self.worker.close()
        if self.images is not None:
            self.images.close()
        self.feedback.close()
        if self.registry is not None:
            self.registry.close()


def folder_version(folder) -> str:
    """A short digest of a model or adapter folder: its file names, sizes and modification times,
    and its small JSON files (cheap even for multi-GB weights)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if f.suffix == ".json" and stat.st_size < 1_000_000:
                digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def _citations_of(text: str, sources: list | None) -> dict | None:
    from genlab.rag.prompts import citations

    if sources is None:
        return None
    cited, invalid = citations(text, len(sources))
    return {"cited": cited, "invalid": invalid}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The web UI, read once into memory: requests pick a name from this table, never a path."""
    types = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    folder = resources.files("genlab.serve") / "static"
    return {f.name: (f.read_bytes(), types.get(Path(f.name).suffix, "application/octet-stream"))
            for f in folder.iterdir() if f.is_file()}


def create_app(model, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    server = Server(model, config)
    static = _static_files()

    @asynccontextmanager
    async def lifespan(app):
        watchers = [asyncio.create_task(server.follow_registry())] if server.registry is not None else []
        if server.images is not None and server.images.registry is not None:
            watchers.append(asyncio.create_task(follow_image_registry()))
        yield
        for watcher in watchers:
            watcher.cancel()
        server.close()

    async def follow_image_registry():
        while True:
            await asyncio.sleep(config.poll_seconds)
            try:
                if await asyncio.to_thread(server.images.refresh):
                    log.info("images: now serving %s", server.images.version)
            except Exception:  # a broken registry must not take serving down
                log.exception("image registry check failed")

    app = FastAPI(title="genlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        message = first["msg"].removeprefix("Value error, ")
        return APIError(422, f"{where}: {message}" if where else message, "invalid_parameter", where or None).response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error ({type(e).__name__})", type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response()

    def user_of(request: Request) -> str | None:
        if not server.keys.enabled:
            return None
        user = server.keys.user(request.headers.get("authorization"))
        if user is None:
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
        return user

    # --- models, health, embeddings --------------------------------------------------------------
    @app.get("/health")
    async def health():
        version = server.serving["name"] if server.serving else None
        body = {"status": "ok", "model": server.name, "version": version, "engine": config.engine,
                **(server.worker.load if server.worker is not None else {})}
        if server.images is not None:
            body["image_model"], body["image_version"] = server.images.name, server.images.version
        return body

    @app.get("/v1/models")
    async def models(user=Depends(user_of)):
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "genlab"} for m in server.model_ids()]
        if server.images is not None:  # "modality" tells the web UI which mode a model belongs to
            data.append({"id": server.images.name, "object": "model", "created": created, "owned_by": "genlab",
                         "modality": "image"})
        return {"object": "list", "data": data}

    @app.post("/v1/images/generations")
    async def image_generations(body: ImageRequest, user=Depends(user_of)):
        if server.images is None:
            raise APIError(404, "this server has no text-to-image model (genlab image serve MODEL serves one)",
                           "model_not_found", "model")
        try:
            return await asyncio.to_thread(server.images.generate, body, user)
        except (LookupError, InvalidParameterError) as e:
            raise as_api_error(e) from None

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, user=Depends(user_of)):
        embedder = await asyncio.to_thread(lambda: server.embedder)
        if body.model not in (embedder.name, embedder.id):
            raise APIError(404, f"The model '{body.model}' does not exist; the embedding model is '{embedder.name}'",
                           "model_not_found", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not t for t in texts) or len(texts) > 2048:
            raise APIError(422, "input: 1 to 2048 non-empty strings", "invalid_parameter", "input")
        vectors = await asyncio.to_thread(embedder.encode, texts)
        if body.encoding_format == "base64":
            import base64

            def encode(v):
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
        else:
            def encode(v):
                return v.tolist()
        tokens = sum(embedder.count_tokens(t) for t in texts)
        return {"object": "list", "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    # --- completions -----------------------------------------------------------------------------
    async def start(body, endpoint: str, user: str | None) -> Exchange:
        adapter, rag = server.resolve(body.model, body.adapter, body.rag)
        try:
            adapter = server.worker.resolve_adapter(adapter)
        except InvalidParameterError as e:
            raise APIError(404, str(e), "adapter_not_found", "adapter") from None
        if (body.best_of or 1) > 1:
            await asyncio.to_thread(server.reward_model)  # refuse before generating if there is none
        messages = body.chat() if endpoint == "chat" else None
        text = body.text() if endpoint == "completions" else None
        asked = (body.max_completion_tokens or body.max_tokens) if endpoint == "chat" else body.max_tokens
        sources = None
        if rag:
            messages, text, sources = await asyncio.to_thread(ground, messages, text, body.rag_k,
                                                              asked or config.default_max_tokens)
        prompt = model.prompt_text(messages if messages is not None else text)
        if len(prompt) > config.max_prompt_chars:
            raise APIError(400, f"the prompt has {len(prompt):,} characters; this server takes at most "
                                f"{config.max_prompt_chars:,}", "prompt_too_long", "messages")
        ids = model.encode(messages if messages is not None else text)
        if len(ids) >= server.context or (asked and len(ids) + asked > server.context):
            raise APIError(400, f"This model's maximum context length is {server.context} tokens. However, you "
                                f"requested {len(ids) + (asked or 0)} tokens ({len(ids)} in the messages, "
                                f"{asked or 0} in the completion).", "context_length_exceeded", "messages")
        if endpoint == "chat":
            logprobs, top = body.logprobs or bool(body.top_logprobs), body.top_logprobs or 0
        else:
            logprobs, top = body.logprobs is not None, body.logprobs or 0
        try:
            params = SamplingParams(max_new_tokens=asked or min(config.default_max_tokens, server.context - len(ids)),
                                    temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                                    repetition_penalty=body.repetition_penalty, stop=body.stop or [], seed=body.seed,
                                    n=body.best_of or body.n, logprobs=logprobs, top_logprobs=top)
        except InvalidParameterError as e:
            raise as_api_error(e) from None
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        ex = Exchange(new_completion_id(prefix), endpoint, body.model, adapter, body.model_dump(exclude_none=True),
                      messages, prompt, ids, params, sources, user or body.user, Job(params.n), server.versions.get(adapter))
        json_object = bool(body.response_format and body.response_format.type == "json_object")
        try:
            ex.engine_request = server.worker.submit(EngineRequest(ids, params, ex.job.emit, adapter, json_object))
        except (GenlabError, QueueFullError) as e:
            raise as_api_error(e) from None
        return ex

    def ground(messages, text, k: int, max_new: int):
        """Retrieve for the question (the last user message) and put the numbered sources into the prompt."""
        from genlab.rag.prompts import build_prompt, load_template

        question = text if messages is None else next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise APIError(422, "rag: there is no user question to retrieve for", "invalid_parameter", "messages")
        hits = server.retriever.search(question, k=k)

        def wrap(p):
            if messages is None:
                return p
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            return [*messages[:last], {"role": "user", "content": p}, *messages[last + 1:]]

        try:
            prompt, kept = build_prompt(load_template("qa"), question, hits, lambda p: len(model.encode(wrap(p))),
                                        server.context - max_new)
        except ContextLengthError as e:
            raise APIError(400, str(e), "context_length_exceeded", "messages") from None
        sources = [{"n": i + 1, "source": h.source, "path": h.path, "title": h.title, "heading": h.heading,
                    "page": h.page, "start": h.start, "end": h.end, "score": h.score, "text": h.text}
                   for i, h in enumerate(kept)]
        wrapped = wrap(prompt)
        return (wrapped, None, sources) if messages is not None else (None, wrapped, sources)

    async def finish(ex: Exchange):
        """Record the exchange; only then may the client see that it ended."""
        await asyncio.to_thread(server.feedback.record, ex.record())
        log.info("%s %s adapter=%s prompt=%d completion=%d %.0fms", ex.id, ex.model, ex.adapter,
                 len(ex.prompt_ids), sum(ex.job.tokens), (time.perf_counter() - ex.started) * 1000)

    def token_logprobs(e: Event) -> dict:
        decode = model.tokenizer.decode
        token = decode([e.token_id])
        top = [{"token": decode([t]), "logprob": lp, "bytes": list(decode([t]).encode())} for t, lp in (e.top_logprobs or {}).items()]
        return {"token": token, "logprob": e.logprob, "bytes": list(token.encode()), "top_logprobs": top}

    def completion_logprobs(events: list[Event]) -> dict:
        decode = model.tokenizer.decode
        tokens = [decode([e.token_id]) for e in events]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{decode([t]): lp for t, lp in (e.top_logprobs or {}).items()} for e in events],
                "text_offset": offsets}

    def choice_body(ex: Exchange, i: int) -> dict:
        text, lp = ex.job.texts[i], ex.job.logprobs[i]
        if ex.endpoint == "chat":
            choice = {"index": i, "message": {"role": "assistant", "content": text},
                      "logprobs": {"content": [token_logprobs(e) for e in lp]} if ex.params.logprobs else None,
                      "finish_reason": ex.job.finish[i]}
        else:
            choice = {"index": i, "text": text, "logprobs": completion_logprobs(lp) if ex.params.logprobs else None,
                      "finish_reason": ex.job.finish[i]}
        if ex.sources is not None:
            choice["citations"] = _citations_of(text, ex.sources)
        return choice

    def envelope(ex: Exchange, chunk: bool) -> dict:
        kind = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
                ("completions", False): "text_completion", ("completions", True): "text_completion"}[ex.endpoint, chunk]
        return {"id": ex.id, "object": kind, "created": ex.created, "model": ex.model, "system_fingerprint": f"genlab-{ex.adapter}"}

    async def respond(ex: Exchange, http: Request):
        try:
            while not ex.job.done:
                await ex.job.next(http)
        except asyncio.CancelledError:
            ex.engine_request.cancel()
            return Response(status_code=499)
        shown = ex.params.n
        if body_best_of(ex) > 1:
            await asyncio.to_thread(rank_by_reward, ex)
            shown = 1
        await finish(ex)
        body = {**envelope(ex, False), "choices": [choice_body(ex, i) for i in range(shown)], "usage": ex.usage()}
        if shown < ex.params.n:
            body["best_of"] = {"samples": ex.params.n, "rewards": ex.rewards}
        if ex.sources is not None:
            body["sources"] = ex.sources
        return body

    def body_best_of(ex: Exchange) -> int:
        return ex.body.get("best_of") or 1

    def rank_by_reward(ex: Exchange) -> None:
        """best_of: order the samples by the reward model's score; choice 0 is the one returned (and
        the one feedback on this completion refers to); all samples are recorded."""
        prompt = ex.messages if ex.messages is not None else ex.prompt
        scores = server.reward_model().score([prompt] * ex.params.n, ex.job.texts)
        order = sorted(range(ex.params.n), key=lambda i: -scores[i])
        job = ex.job
        job.texts, job.tokens, job.finish, job.logprobs = ([xs[i] for i in order] for xs in
                                                          (job.texts, job.tokens, job.finish, job.logprobs))
        ex.rewards = [scores[i] for i in order]

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(ex: Exchange, include_usage: bool):
        chat = ex.endpoint == "chat"

        def chunk(i, delta=None, text=None, logprobs=None, finish=None):
            c = {"index": i, "logprobs": logprobs, "finish_reason": finish}
            c.update({"delta": delta} if chat else {"text": text or ""})
            return {**envelope(ex, True), "choices": [c], **({"usage": None} if include_usage else {})}

        try:
            if chat:
                for i in range(ex.params.n):
                    yield sse(chunk(i, delta={"role": "assistant", "content": ""}))
            while not ex.job.done:
                for e in await ex.job.next():
                    if not e.text and e.logprob is None:
                        continue  # nothing to show yet (e.g. a held-back partial stop string)
                    lp = None
                    if ex.params.logprobs and e.logprob is not None:
                        lp = {"content": [token_logprobs(e)]} if chat else completion_logprobs([e])
                    yield sse(chunk(e.index, delta={"content": e.text}, text=e.text, logprobs=lp))
            await finish(ex)
            for i in range(ex.params.n):  # finish reasons only once the exchange is recorded
                last = chunk(i, delta={}, text="", finish=ex.job.finish[i])
                if ex.sources is not None:
                    last["sources"] = ex.sources
                    last["choices"][0]["citations"] = _citations_of(ex.job.texts[i], ex.sources)
                yield sse(last)
            if include_usage:
                yield sse({**envelope(ex, True), "choices": [], "usage": ex.usage()})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        finally:
            if not ex.job.done:  # the client went away: stop generating for it
                ex.engine_request.cancel()

    async def complete(body, endpoint: str, http: Request, user):
        ex = await start(body, endpoint, user)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(ex, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await respond(ex, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request, user=Depends(user_of)):
        return await complete(body, "chat", http, user)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request, user=Depends(user_of)):
        return await complete(body, "completions", http, user)

    # --- feedback --------------------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def post_feedback(body: FeedbackRequest, user=Depends(user_of)):
        fields = body.model_dump(exclude={"completion_id", "user"})
        try:
            row = await asyncio.to_thread(server.feedback.add_feedback, body.completion_id, user=user or body.user, **fields)
        except (LookupError, InvalidParameterError) as e:
            raise as_api_error(e) from None
        if config.improve_every:
            await asyncio.to_thread(server.maybe_improve)
        return {"object": "feedback", **row}

    @app.get("/v1/feedback")
    async def get_feedback(limit: int = 50, offset: int = 0, completion_id: str | None = None, user=Depends(user_of)):
        if not 1 <= limit <= 500 or offset < 0:
            raise APIError(422, "limit must be in 1..500 and offset >= 0", "invalid_parameter", "limit")
        rows = await asyncio.to_thread(server.feedback.list_feedback, limit, offset, completion_id)
        return {"object": "list", "data": rows, "total": await asyncio.to_thread(server.feedback.count_feedback)}

    # --- web UI ----------------------------------------------------------------------------------
    def page(name: str) -> Response:
        if name not in static:
            raise APIError(404, "not found", "not_found")
        content, media = static[name]
        return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})

    @app.get("/")
    async def index():
        return page("index.html")

    @app.get("/history")
    async def history():
        return page("history.html")

    @app.get("/static/{name}")
    async def static_file(name: str):
        return page(name)

    return app


def serve(model, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, config), host=host, port=port, log_level=log_level)


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve `app` from a thread (notebooks, tests, the quickstart); yields the base URL.
    Port 0 picks a free port."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name="genlab-serve", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

