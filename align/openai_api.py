"""The HTTP side of `align serve`: OpenAI's chat completions API in front of a ChatEngine (FastAPI).

    GET  /v1/models                  the served names in OpenAI's list format (`base` last)
    GET  /v1/models/{name}           one of them
    POST /v1/chat/completions        model, messages, max_tokens (or max_completion_tokens), temperature,
                                     top_p, seed, n, stop, stream (+ stream_options.include_usage)
    GET  /health                     200 once the model is loaded (no key needed; it says nothing else)

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its HTTP
status: 400 a bad request (the field named in `param`; a conversation over the token limits has
code context_length_exceeded), 401 a missing or wrong API key, 404 an unknown model
(model_not_found) or path, 413 a body over limits.max_body_kb, 415 a body that is not JSON, 503
when limits.max_waiting requests already wait or the server is shutting down, 500 for anything
else, its traceback only in the server's log. On Ctrl-C an answer being generated stops at its next
token and is not sent as finished: a 503 (code server_shutting_down), or in a stream an error event;
so are the requests still waiting for it. A parameter this server does not implement (tools,
logprobs, ...) is a 400 naming it rather than silently ignored.

A browser page on another site cannot drive the endpoint: a JSON body needs a CORS preflight,
which is never granted; without an API key (loopback only) the Host header must be a loopback
address or localhost too, so a DNS-rebinding page cannot reach it by another name either.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from align.chat_engine import Busy, ChatEngine, Job, Params, RequestError, ShuttingDown
from align.serving import BASE, is_loopback

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS, MAX_STOP_CHARS = 4, 200  # OpenAI's own limit on stop sequences; a stop string longer than 200 is a mistake
# Accepted and ignored: they change nothing in the answer.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
# Accepted at their neutral value only; anything else is a 400 naming the parameter.
NEUTRAL = {"frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logprobs": (None, False),
           "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
           "tool_choice": (None, "none"), "function_call": (None, "none"), "response_format": (None, {"type": "text"})}
EMPTY = (None, "", [], {})  # a message field at one of these says nothing
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
         "stream"}


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def create_app(engine: ChatEngine, cfg, *, api_key: str | None = None, loopback: bool = True) -> FastAPI:
    """The OpenAI-compatible app on `engine`; `cfg` is the ServeStageConfig (its generation defaults and limits)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    limits, defaults = cfg.limits, cfg.generation
    running: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, str(err), param=err.param, code=err.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                              code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        # Starlette raises the error on after this answer, and uvicorn logs its traceback: on the server only.
        return error_response(500, "the server failed on this request; its log says why", kind="server_error")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": started, "owned_by": "align"}
        return card if name == BASE else {**card, "parent": BASE}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in engine.names()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> dict[str, Any]:
        if name not in engine.tokenizers:
            raise _unknown_model(name, engine)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_json(request, limits.max_body_kb * 1024)
        model, messages, params, stream, usage_in_stream = _parse(body, engine, limits, defaults)
        job = Job(model, [], params)
        try:
            # Counted in before the chat template and the tokenizer run, so a full queue is a 503 before
            # any stream starts, and a flood of big bodies is refused without tokenizing each one.
            engine.admit(job)
        except Busy as err:
            return error_response(503, str(err), kind="server_busy", code="server_busy")
        except ShuttingDown as err:
            return _shutting_down(err)
        try:
            await run_in_threadpool(engine.prepare, model, messages, params, job)
        except BaseException:
            engine.release(job)
            raise
        reply = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}
        if stream:
            return StreamingResponse(_stream(engine, job, reply, usage_in_stream, running),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # A client that goes away (its read timeout, Ctrl-C) stops its generation at the next token, as a stream's
        # does: one answer is generated at a time, and the openai client sends a timed-out request again.
        watcher = asyncio.create_task(_cancel_when_gone(request, job))
        try:
            result = await run_in_threadpool(engine.run, job)
        except ShuttingDown as err:  # it was cut off, or waited behind one that was: not a finished answer
            return _shutting_down(err)
        except Exception:
            # Answered here rather than by the app's handler: an error that leaves the endpoint makes
            # uvicorn close the connection, which a client reusing it would see as a network failure.
            log.exception("a completion failed")
            return error_response(500, "the server failed on this request; its log says why", kind="server_error")
        finally:
            watcher.cancel()
            engine.release(job)  # run() does; this covers a failure before it started
        return JSONResponse({
            **reply, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in result.choices],
            "usage": _usage(result)})

    app.add_middleware(Guard, api_key=api_key, loopback=loopback)
    return app


async def _cancel_when_gone(request: Request, job: Job) -> None:
    """Cancel `job` once its client has gone: with the body read, the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _shutting_down(err: ShuttingDown) -> JSONResponse:
    return error_response(503, str(err), kind="server_error", code="server_shutting_down")


def _unknown_model(name: str, engine: ChatEngine) -> RequestError:
    return RequestError(f"the model `{name[:100]}` does not exist here; served: {', '.join(engine.names())}",
                        param="model", code="model_not_found", status=404)


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refused once it passes `limit` bytes (413) without reading the rest."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(f"the body must be JSON with Content-Type: application/json (got {kind or 'none'!r})",
                           status=415)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body is {int(declared):,} bytes; this server takes at most {limit:,} "
                           "(limits.max_body_kb)", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the body is over {limit:,} bytes, this server's limit (limits.max_body_kb)",
                               status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: [[[[...]]]]
        raise RequestError(f"the body is not valid JSON ({err})") from None
    except ValueError:  # Python's limit on converting a string of digits to an int
        raise RequestError(f"the body is not valid JSON here: it holds a number of more than "
                           f"{sys.get_int_max_str_digits()} digits") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer (nor an error reply) can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the body holds a lone UTF-16 surrogate (such as \\ud800): not text") from None
    return body


def _parse(body: dict[str, Any], engine: ChatEngine, limits, defaults) -> tuple:
    """(model, messages, Params, stream, include usage in the stream) from a request body, or a RequestError."""
    for key, value in body.items():
        if key in KNOWN or key in IGNORED or value is None:  # null: unset, as clients that send every field write it
            continue
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                raise RequestError(f"{key} is not supported by this server (align serve)", param=key,
                                   code="unsupported_parameter")
            continue
        raise RequestError(f"unrecognized request argument: {key}", param=key, code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: required, the name of a served model (GET /v1/models lists them)", param="model")
    if model not in engine.tokenizers:
        raise _unknown_model(model, engine)
    messages = _messages(body.get("messages"))
    # OpenAI's newer name first; a null one (as clients that send every field write it) is unset.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    default = max_tokens is None
    if default:  # at most what the model's context leaves after the messages (ChatEngine.prepare)
        max_tokens = min(defaults.max_new_tokens, limits.max_tokens)
    elif not _int(max_tokens) or max_tokens < 1:
        raise RequestError(f"{key}: an integer >= 1, got {max_tokens!r}", param=key)
    elif max_tokens > limits.max_tokens:
        raise RequestError(f"{key}={max_tokens} is above this server's limit of {limits.max_tokens} "
                           "(limits.max_tokens)", param=key)
    temperature = _number(body, "temperature", defaults.temperature, 0, 2)
    top_p = _number(body, "top_p", defaults.top_p, 0, 1, low_open=True)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _int(n) or not 1 <= n <= limits.max_n:
        raise RequestError(f"n: an integer from 1 to {limits.max_n} (limits.max_n), got {n!r}", param="n")
    seed = body.get("seed")
    if seed is not None and (not _int(seed) or not -(2**63) <= seed < 2**64):
        raise RequestError(f"seed: a 64-bit integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop: a string or a list of up to {MAX_STOPS} non-empty strings of at most "
                           f"{MAX_STOP_CHARS} characters", param="stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"stream: true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options: an object such as {\"include_usage\": true}", param="stream_options")
    params = Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed, stop=stops,
                    default_max_tokens=default, max_tokens_key=key)
    return model, messages, params, stream, bool(options.get("include_usage"))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        low < value <= high if low_open else low <= value <= high)
    if not ok:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(f"{key}: a number in {span}, got {value!r}", param=key)
    return float(value)


def _messages(value: Any) -> list[dict[str, str]]:
    """OpenAI's messages as {role, content} strings for the chat template; text content parts are joined."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages: a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: an object with role and content", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"{where}.role: one of {', '.join(ROLES)} (tool calls are not supported), got {role!r}",
                               param=f"{where}.role")
        # A reply's message sent back as the openai package dumps it carries every field OpenAI defines,
        # null or empty (refusal, tool_calls, audio, ...): only a value is refused.
        extra = {k for k, v in message.items() if k not in ("role", "content", "name") and v not in EMPTY}
        if extra:
            raise RequestError(f"{where}: {', '.join(sorted(extra))} not supported (text messages only)",
                               param=f"{where}.{sorted(extra)[0]}")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                       "are supported", param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content: a string (or a list of text parts), got {type(content).__name__}",
                               param=f"{where}.content")
        out.append({"role": ROLES[role], "content": content})
    return out


def _stream(engine: ChatEngine, job, reply: dict[str, Any], usage: bool, running: set) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role, the text as it grows, each choice's
    finish_reason, the usage (when asked for), then [DONE]. A client that goes away stops the generation.

    The generation starts here, before the response does: the job is counted in (ChatEngine.admit) and
    only ChatEngine.run counts it out, so it must run even if the client is gone before the first byte.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_text(index: int, piece: str) -> None:  # called from the generating thread
        loop.call_soon_threadsafe(queue.put_nowait, ("text", index, piece))

    async def generate() -> None:
        try:
            queue.put_nowait(("done", await run_in_threadpool(engine.run, job, on_text)))
        except Exception as err:  # reported in the stream: its status line has long been sent
            if not isinstance(err, ShuttingDown):
                log.error("a streamed completion failed", exc_info=err)
            queue.put_nowait(("error", err))
        finally:
            engine.release(job)

    task = asyncio.create_task(generate())
    running.add(task)
    task.add_done_callback(running.discard)
    return _events(job, reply, usage, queue)


# A stream waiting this long for its next piece sends an SSE comment: a request queued behind others gets no
# bytes for minutes otherwise, and a client's read timeout (httpx's, the Playground's 120 s) ends it.
KEEPALIVE_S = 10.0


async def _events(job, reply: dict[str, Any], usage: bool, queue: asyncio.Queue) -> AsyncIterator[str]:
    chunk = {**reply, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if usage else {}

    def event(choices: list[dict[str, Any]]) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    try:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(job.params.n)])
        while True:
            try:
                kind, *rest = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:  # queued behind other requests (one generation at a time), or a slow token:
                yield ": waiting\n\n"  # an SSE comment, which clients skip, so their read timeouts do not fire
                continue
            if kind == "text":
                index, piece = rest
                yield event([{"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
            elif kind == "done":
                (result,) = rest
                yield event([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                             for c in result.choices])
                if usage:
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': _usage(result)})}\n\n"
                break
            else:
                (err,) = rest
                failed = (error_body(str(err), kind="server_error", code="server_shutting_down")
                          if isinstance(err, ShuttingDown)
                          else error_body("the server failed on this request; its log says why", kind="server_error"))
                yield f"data: {json.dumps(failed)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or all is sent): a generation still running stops now


class Guard:
    """Before any route: the API key (when one is set; `/health` is open) and, without a key, a loopback
    Host header (DNS rebinding). Pure ASGI, so streamed responses pass through untouched."""

    def __init__(self, app, *, api_key: str | None, loopback: bool):
        key = (api_key or "").strip()  # as api_key() reads it, and as the client's token is compared
        self.app, self.key, self.loopback = app, key.encode() if key else None, loopback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        problem = None
        if self.key is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not given:
                problem = (401, "no API key: send the header `Authorization: Bearer <key>`", "invalid_api_key")
            elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                problem = (401, "incorrect API key", "invalid_api_key")
        elif self.loopback:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            # The addresses the server may listen on without a key (127.0.0.2 too), and localhost: no other name.
            if not is_loopback(name):
                problem = (400, f"Host {host!r}: this server (no API key) answers only to a loopback name such as "
                                "127.0.0.1 or localhost", None)
        if problem:
            status, message, code = problem
            await error_response(status, message, code=code)(scope, receive, send)
            return
        await self.app(scope, receive, send)
