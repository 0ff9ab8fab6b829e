"""An OpenAI-compatible HTTP server over a ``kvjax.serve.Engine`` (FastAPI).

``create_app(engine, model_name=...)`` is the whole server; ``kvjax-serve``
(``kvjax.serve.cli``) runs it under uvicorn, ``BackgroundServer`` in a thread::

    POST /v1/completions        prompt: text or token ids
    POST /v1/chat/completions   messages: [{"role", "content"}, ...] (the chat template)
    GET  /v1/models             the one model served
    GET  /health                200 while the server is up (open even with an API key)
    GET  /metrics               Prometheus text (``kvjax.serve.metrics``)

Requests and responses follow OpenAI's shapes (docs/serving.md lists the parameters);
``stream: true`` sends server-sent events ending in ``data: [DONE]``. Every request gets
an answer: errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with
400 (bad or unsupported values), 401 (API key), 404 (another model), 429 (the engine's
queue is full) or 503 (the engine is shutting down). A client that goes away cancels its
request, so its row and blocks go to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from kvjax.serve.engine import EngineOverloaded
from kvjax.serve.metrics import ServerMetrics


# Request bodies beyond this get 413: 4 MiB holds a prompt of about a million tokens of
# text, more than any context kvjax serves.
MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param",
    "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        # OpenAI's clients wait Retry-After seconds before they retry a 429 or a 503
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What tells ``/v1/completions`` and ``/v1/chat/completions`` apart."""
    chat: bool
    object: str        # of a whole response
    chunk_object: str  # of a streamed chunk
    id_prefix: str
    fields: frozenset[str]  # the parameters it takes besides the shared ones


COMPLETIONS = Endpoint(False, "text_completion", "text_completion", "cmpl",
                       frozenset({"prompt"}))
CHAT = Endpoint(True, "chat.completion", "chat.completion.chunk", "chatcmpl",
                frozenset({"messages", "max_completion_tokens"}))

# Parameters both endpoints take. ``top_k``, ``min_p`` and ``ignore_eos`` (no stop token
# ends the row: fixed-length outputs for benchmarks) are extensions, as in vLLM.
SHARED_FIELDS = frozenset({"model", "stream", "stream_options", "n", "max_tokens",
                           "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                           "ignore_eos", "user"})
# OpenAI parameters kvjax does not implement, accepted at their neutral value only.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,),
           "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "logit_bias": ({},),
           "suffix": ("",), "parallel_tool_calls": (True, False), "tools": ([],)}


@dataclasses.dataclass(frozen=True)
class Call:
    """One parsed request: what to submit to the engine and how to answer."""
    prompt: str | list  # text, token ids or chat messages
    options: dict[str, Any]  # keyword arguments of ``engine.submit``
    stream: bool
    include_usage: bool


def parse_call(body: Any, endpoint: Endpoint, model_name: str) -> Call:
    """Checks a request body; raises ``ApiError`` (400, or 404 for another model). Values'
    ranges are the engine's to check (``ValueError`` from ``submit``)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in SHARED_FIELDS or name in endpoint.fields:
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"unsupported parameter: {name!r}", param=name)
        if value is not None and value not in NEUTRAL[name]:
            raise ApiError(400, f"{name} is not supported: leave it out or at "
                                f"{NEUTRAL[name][0]!r}", param=name)
    model = body.get("model", model_name)
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                            f"{model_name!r}", param="model", code="model_not_found")
    if _typed(body, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request (send several requests)",
                       param="n")
    stream = _typed(body, "stream", bool, False)
    stream_options = _typed(body, "stream_options", dict, {})
    if stream_options and not stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")
    unknown = set(stream_options) - {"include_usage"}
    if unknown:
        raise ApiError(400, f"unsupported stream_options: {sorted(unknown)}",
                       param="stream_options")
    include_usage = _typed(stream_options, "include_usage", bool, False)
    prompt = _messages(body) if endpoint.chat else _prompt(body)
    return Call(prompt, _options(body, endpoint), stream, include_usage)


def _options(body: dict, endpoint: Endpoint) -> dict[str, Any]:
    """``engine.submit``'s keyword arguments. Sampling values left out are None: the
    model's defaults (``generation_config.json``, as in ``kvjax.generate``). ``max_tokens``
    left out: a chat runs to the end of the context (None, OpenAI's chat default), a
    completion stops at 16 tokens (the engine's default, OpenAI's for completions)."""
    max_tokens = _typed(body, "max_tokens", int)
    if endpoint.chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
        max_tokens = _typed(body, "max_completion_tokens", int)
    options = {"max_tokens": max_tokens, "temperature": _typed(body, "temperature", float),
               "top_p": _typed(body, "top_p", float), "top_k": _typed(body, "top_k", int),
               "min_p": _typed(body, "min_p", float), "seed": _typed(body, "seed", int),
               "stop": _stop(body)}
    if _typed(body, "ignore_eos", bool, False):
        options["stop_tokens"] = []
    kept = {"temperature", "max_tokens"} if endpoint.chat else {"temperature"}
    return {name: value for name, value in options.items() if value is not None or name in kept}


# JSON types of the parameters: a float parameter takes an integer too, no parameter a bool
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", dict: "an object"}


def _typed(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """``body[name]`` when it has JSON type ``kind`` (None or absent: ``default``)."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)}",
                       param=name)
    return value


def _stop(body: dict) -> str | list | None:
    """``stop`` when it is a string or a list (the engine checks the strings)."""
    stop = body.get("stop")
    if stop is None or isinstance(stop, (str, list)):
        return stop
    raise ApiError(400, "stop must be a string or a list of strings", param="stop")


def _prompt(body: dict) -> str | list[int]:
    """The completion prompt: text or token ids (a list holding one of them too)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return prompt
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per "
                        "request)", param="prompt")


def _messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as ``{"role", "content"}`` with text content (a list of text
    parts is joined); the engine checks roles against the chat template's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} "
                            "objects", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", param="messages")
        parsed.append({"role": message["role"], "content": content})
    return parsed


# ----- responses --------------------------------------------------------------------

def usage(handle) -> dict:
    """OpenAI's ``usage`` of a finished request."""
    return {"prompt_tokens": handle.prompt_tokens,
            "completion_tokens": handle.completion_tokens,
            "total_tokens": handle.prompt_tokens + handle.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": handle.cached_tokens or 0}}


def _choice(endpoint: Endpoint, text: str, finish_reason: str) -> dict:
    if endpoint.chat:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _chunk_choice(endpoint: Endpoint, text: str | None,
                  finish_reason: str | None = None) -> dict:
    """A streamed choice holding ``text`` (None: the last one, with the finish reason)."""
    if endpoint.chat:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


@dataclasses.dataclass(frozen=True)
class _Reply:
    """What every response and chunk of one request repeats."""
    endpoint: Endpoint
    id: str
    created: int
    model: str
    include_usage: bool

    def body(self, object: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def chunk(self, choices: list, usage: dict | None = None) -> bytes:
        """One server-sent event; with ``include_usage`` every chunk carries ``usage``,
        null but in the last (OpenAI's convention)."""
        extra = {"usage": usage} if self.include_usage else {}
        return _event(self.body(self.endpoint.chunk_object, choices, **extra))


def _event(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


CANCELLED = ApiError(503, "the request was cancelled: the server is shutting down",
                     type="server_error", code="cancelled")


def _failed(error: RuntimeError) -> ApiError:
    """The engine failed while running the request (its handle raises)."""
    return ApiError(500, str(error), type="server_error", code="engine_failed")


async def _events(reply: _Reply, handle) -> AsyncIterator[bytes]:
    """A request's stream: (chat) the assistant's role, the chunks of its text, the one
    with its finish reason, the usage chunk when asked for, and ``[DONE]``."""
    endpoint = reply.endpoint
    if endpoint.chat:
        yield reply.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])
    error = None
    try:
        async for delta in handle.stream():
            if delta.text:
                yield reply.chunk([_chunk_choice(endpoint, delta.text)])
    except RuntimeError as e:
        error = _failed(e)
    if error is None and handle.finish_reason == "cancelled":
        error = CANCELLED
    if error is not None:  # OpenAI's clients raise it
        yield _event(error.body())
    else:
        yield reply.chunk([_chunk_choice(endpoint, None, handle.finish_reason)])
        if reply.include_usage:
            yield reply.chunk([], usage(handle))
    yield _event("[DONE]")


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however they end: sent whole, the client
    gone (Starlette cancels the stream) or the server's graceful shutdown timed out."""
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _text(request: Request, handle) -> str:
    """A request's whole text; cancels the request when its client goes away first."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return "".join([delta.text async for delta in handle.stream()])
    except RuntimeError as e:
        raise _failed(e) from e
    finally:
        watcher.cancel()


def _submit(engine, call: Call):
    """``engine.submit`` with its refusals as ``ApiError``."""
    try:
        return engine.submit(call.prompt, **call.options)
    except EngineOverloaded as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                       code="queue_full") from e
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    except RuntimeError as e:  # shut down, or failed
        raise ApiError(503, str(e), type="server_error", code="unavailable") from e


async def _json(request: Request, limit: int) -> Any:
    """The request's JSON body; 413 past ``limit`` bytes (read no further), 400 if not JSON."""
    too_large = ApiError(413, f"the request body exceeds {limit:,} bytes; send a shorter prompt "
                              f"(or start the server with a larger max_body_bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e


def create_app(engine, *, model_name: str, api_key: str | None = None,
               shutdown_timeout: float | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app serving ``engine`` as the model ``model_name``.

    The app starts the engine when the server starts and shuts it down when the server
    stops, after uvicorn's graceful shutdown has let the requests in flight finish (or
    cancelled them): ``engine.shutdown(drain=True, timeout=shutdown_timeout)``.

    Args:
      engine: a ``kvjax.serve.Engine`` (started here if it is not yet).
      model_name: the ``model`` requests name (another gets 404) and ``/v1/models`` lists.
      api_key: when set, every route but ``/health`` needs ``Authorization: Bearer KEY``
        (else 401).
      shutdown_timeout: seconds the engine's drain may take at shutdown (None: no limit).
      max_body_bytes: larger request bodies get 413 before they are read whole.
    """
    metrics = ServerMetrics(engine, model_name)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, drain=True, timeout=shutdown_timeout)

    app = FastAPI(title="kvjax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _answer(lambda e: e))
    app.add_exception_handler(HTTPException, _answer(  # unknown routes, wrong methods
        lambda e: ApiError(e.status_code, str(e.detail))))
    app.add_exception_handler(Exception, _answer(lambda e: ApiError(
        500, f"internal error: {type(e).__name__}: {e}", type="server_error")))
    guarded = [Depends(_bearer(api_key))] if api_key else []

    async def serve(request: Request, endpoint: Endpoint) -> Response:
        call = parse_call(await _json(request, max_body_bytes), endpoint, model_name)
        handle = _submit(engine, call)
        reply = _Reply(endpoint, f"{endpoint.id_prefix}-{uuid.uuid4().hex}", int(time.time()),
                       model_name, call.include_usage)

        def close():
            handle.cancel()  # a client gone or a shutdown's timeout; nothing once it ended
            metrics.observe(handle)

        if call.stream:
            return _EventStream(_events(reply, handle), close)
        try:
            text = await _text(request, handle)
        finally:
            close()
        if handle.finish_reason == "cancelled":
            raise CANCELLED
        return JSONResponse(reply.body(endpoint.object,
                                       [_choice(endpoint, text, handle.finish_reason)],
                                       usage=usage(handle)))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await serve(request, COMPLETIONS)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await serve(request, CHAT)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "kvjax",
                                            "max_model_len": engine.max_len}]}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def _answer(to_error: Callable[[Exception], ApiError]) -> Callable:
    """An exception handler answering ``to_error(exception)`` in OpenAI's shape."""
    async def handle(_request: Request, exception: Exception) -> JSONResponse:
        return to_error(exception).response()

    return handle


def _bearer(api_key: str) -> Callable:
    """A dependency that refuses (401) a request without ``Authorization: Bearer
    api_key``."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           type="authentication_error", code="invalid_api_key")

    return check


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread (tests, the load generator)::

        with BackgroundServer(create_app(engine, model_name="m")) as server:
            httpx.get(server.url + "/health")

    ``port=0`` takes a free port; ``url`` says which once started. Other keyword arguments go to
    ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown``).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **options):
        options.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.host = host
        self.url: str | None = None  # set by start()
        self._thread = threading.Thread(target=self.server.run, daemon=True,
                                        name="kvjax-serve")

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        """Starts serving; returns once the port is open (``RuntimeError`` if the server
        fails to start within ``timeout`` seconds)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see uvicorn's log)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float | None = None) -> None:
        """uvicorn's graceful shutdown (then the app's: the engine's), waited for."""
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
