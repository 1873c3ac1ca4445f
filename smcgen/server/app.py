"""The OpenAI-compatible HTTP app: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health`` and ``/metrics`` over one :class:`smcgen.Engine`.

Errors follow OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a bad request is
a 400 naming the field (``param``) or saying why the engine cannot run it (too large for the KV
memory, say), an unknown model a 404, a full queue a 503, a request whose
particles all end at weight zero a 422, and an engine failure a 500; the server keeps serving
after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from smcgen.core.result import SMCResult
from smcgen.engine import Engine
from smcgen.potentials.errors import GrammarError
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.output import as_grammar
from smcgen.server.metrics import ServerMetrics
from smcgen.server.protocol import ChatCompletionRequest, CompletionRequest, SMCRequest
from smcgen.server.scheduler import QueueFull, Scheduler
from smcgen.streaming import StablePrefix

#: compiled grammars kept per server (keyed by their source), so a repeated schema is compiled once
GRAMMARS_KEPT = 64
#: how often a waiting request checks whether its client is still connected (seconds)
DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def _config_error(err: ValidationError, body: SMCRequest) -> APIError:
    """An SMCConfig validation error as a 400 naming the request field the client set."""

    def param_of(field: str) -> str:
        if field == "max_new_tokens":
            return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if field in ("target_temperature", "draft_temperature") and getattr(body, field) is None:
            return "temperature"  # set through temperature
        return field

    params = [param_of(_loc(e["loc"])) for e in err.errors()]
    # temperature sets two fields: one bad value would otherwise be reported twice
    problems = list(dict.fromkeys(f"{p}: {e['msg']}" for p, e in zip(params, err.errors())))
    return APIError(400, "; ".join(problems), param=params[0])


class ServerState:
    """What the app holds: the engine, its scheduler, the metrics and the compiled grammars."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int = 256, max_batch: int = 8):
        self.engine = engine
        self.model_name = model_name
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(engine, self.metrics, max_queue=max_queue, max_batch=max_batch)
        self._grammars: OrderedDict[tuple[str, str], GrammarPotential] = OrderedDict()

    def grammar(self, body: SMCRequest) -> GrammarPotential | None:
        """The bound grammar a request asks for (response_format, regex or grammar), compiled once per source."""
        asked = []
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_schema":
            asked.append(("json_schema", json.dumps(fmt.json_schema.schema_, sort_keys=False), "response_format"))
        elif fmt is not None and fmt.type == "json_object":
            asked.append(("json_schema", json.dumps({"type": "object"}), "response_format"))
        if body.regex is not None:
            asked.append(("regex", body.regex, "regex"))
        if body.grammar is not None:
            asked.append(("ebnf", body.grammar, "grammar"))
        if len(asked) > 1:
            raise APIError(400, f"give one output constraint, got {[a[2] for a in asked]}", param=asked[1][2])
        if not asked:
            return None
        kind, source, param = asked[0]
        hit = self._grammars.get((kind, source))
        if hit is not None:
            self._grammars.move_to_end((kind, source))
            return hit
        try:
            build = {
                "json_schema": lambda s: as_grammar(json.loads(s)),
                "regex": GrammarPotential.regex,
                "ebnf": GrammarPotential.ebnf,
            }[kind]
            g = self.engine.bind_grammar(build(source))
        except (GrammarError, ValueError, TypeError) as err:
            raise APIError(400, f"{param}: {err}", param=param) from None
        self._grammars[(kind, source)] = g
        while len(self._grammars) > GRAMMARS_KEPT:
            self._grammars.popitem(last=False)
        return g


def _finish_reason(result: SMCResult, eos: tuple[int, ...]) -> str:
    return "stop" if result.token_ids and result.token_ids[-1] in eos else "length"


def _smc_info(result: SMCResult) -> dict[str, Any]:
    """SMC diagnostics beside the OpenAI fields (clients that do not know them ignore them)."""
    ess = result.ess_history
    return {
        "engine": result.engine,
        "n_particles": result.n_particles,
        "n_alive": result.n_alive,
        "log_z": result.log_z,
        "ess_final": ess[-1] if ess else None,
        "ess_min": min(ess) if ess else None,
        "n_resamples": result.n_resamples,
        "n_steps": result.n_steps,
        "posterior": [[t, p] for t, p in result.posterior[:8]],
        "particle_tokens": result.particle_tokens,
        "elapsed_s": result.elapsed_s,
    }


def create_app(engine: Engine, model_name: str, *, max_queue: int = 256, max_batch: int = 8) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (what clients pass as ``model``)."""
    state = ServerState(engine, model_name, max_queue=max_queue, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        yield
        await state.scheduler.stop()

    app = FastAPI(title="smcgen", lifespan=lifespan)
    app.state.smcgen = state

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        param = _loc(errors[0]["loc"]) if errors else None
        message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors) or "invalid request body"
        return APIError(400, message, param=param).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def resolve(body: SMCRequest, prompts: list[Any]) -> list[Any]:
        """Validate every prompt and the settings (4xx naming the field)."""
        if body.model != state.model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {state.model_name!r}",
                param="model",
                code="model_not_found",
            )
        overrides = body.smc_overrides()
        grammar = await run_in_threadpool(state.grammar, body)
        resolved = []
        for p in prompts:
            try:
                resolved.append(await run_in_threadpool(functools.partial(engine.resolve, p, grammar, **overrides)))
            except ValidationError as err:
                raise _config_error(err, body) from None
            except ValueError as err:  # GrammarError too: a JSON schema's shortest document exceeds max_tokens
                msg = str(err)
                too_long = "max_new_tokens" in msg and ("prompt (" in msg or isinstance(err, GrammarError))
                param = (
                    "max_tokens" if too_long else ("messages" if isinstance(body, ChatCompletionRequest) else "prompt")
                )
                raise APIError(400, msg, param=param) from None
        return resolved

    async def run(body: SMCRequest, prompts: list[Any], request: Request) -> tuple[list[SMCResult], int]:
        """Validate, queue and wait; a client that disconnects while waiting cancels its queued request.

        Returns the results and the number of prompt tokens."""
        resolved = await resolve(body, prompts)
        try:
            futures = [state.scheduler.submit(r) for r in resolved]
        except QueueFull as err:
            raise APIError(503, str(err), code="queue_full") from None
        state.metrics.in_flight += len(futures)
        gathered = asyncio.gather(*futures)
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    gathered.cancel()
                    raise APIError(499, "client disconnected")
            results = outcome(gathered)
        finally:
            state.metrics.in_flight -= len(futures)
        return results, sum(len(r.ids) for r in resolved)

    def outcome(done: asyncio.Future) -> Any:
        """The result(s) of a finished future, or the APIError its failure maps to."""
        try:
            results = done.result()
        except APIError:
            raise
        except ValueError as err:  # the engine cannot run this request (e.g. its KV pages do not fit)
            raise APIError(400, f"the engine cannot run this request: {err}", code="request_not_runnable") from None
        except Exception as err:  # noqa: BLE001 - any engine failure is a 500; the server goes on
            raise APIError(500, f"the engine failed: {type(err).__name__}: {err}", code="engine_error") from None
        if any(r.dead for r in (results if isinstance(results, list) else [results])):
            raise APIError(
                422,
                "every particle ended at weight zero (no output satisfies the constraint within "
                "max_tokens); raise max_tokens or n_particles",
                param="max_tokens",
                code="all_particles_dead",
            )
        return results

    async def streamed(endpoint: str, body: SMCRequest, prompt: Any, chat: bool) -> StreamingResponse:
        """``stream: true``: server-sent events in OpenAI's chunk format, each chunk the text that became
        stable (the live particles' common prefix: never taken back; see smcgen.streaming), then the
        rest of the answer with its finish reason, then ``[DONE]``. Errors before the first byte are
        answered as usual; an engine error later is sent as an ``error`` event."""
        t0 = time.perf_counter()
        (resolved,) = await resolve(body, [prompt])
        loop = asyncio.get_running_loop()
        prefix = StablePrefix(engine.target.tokenizer)
        deltas: asyncio.Queue[str] = asyncio.Queue()

        def on_step(sequences: list[list[int]], alive: list[bool]) -> None:  # the engine's thread
            delta = prefix.update(sequences, alive)
            if delta:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        try:
            future = state.scheduler.submit(resolved, on_step=on_step)
        except QueueFull as err:
            raise APIError(503, str(err), code="queue_full") from None
        state.metrics.in_flight += 1
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                kind = "text_completion"
            body = {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            status = 200
            try:
                yield chunk(None if chat else "", first=True)
                while not future.done():
                    getter = asyncio.ensure_future(deltas.get())
                    await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield chunk(getter.result())
                    else:
                        getter.cancel()
                while not deltas.empty():  # steps queued before the result
                    yield chunk(deltas.get_nowait())
                try:
                    result = outcome(future)
                except APIError as err:
                    status = err.status
                    kind = "invalid_request_error" if err.status < 500 else "server_error"
                    error = {"message": err.message, "type": kind, "param": err.param, "code": err.code}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                yield chunk(prefix.finish(result.text), _finish_reason(result, engine.target.eos_token_ids))
                yield "data: [DONE]\n\n"
            finally:
                if not future.done():
                    future.cancel()  # the client went away: a queued request is skipped
                state.metrics.in_flight -= 1
                state.metrics.request_done(endpoint, status, time.perf_counter() - t0)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def timed(endpoint: str, handler) -> JSONResponse:
        t0 = time.perf_counter()
        status = 200
        try:
            return JSONResponse(await handler())
        except APIError as err:
            status = err.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            state.metrics.request_done(endpoint, status, time.perf_counter() - t0)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "stream: true takes one prompt", param="prompt")
            return await streamed("completions", body, prompts[0], chat=False)

        async def handle() -> dict[str, Any]:
            if not prompts:
                raise APIError(400, "prompt is empty", param="prompt")
            results, n_prompt = await run(body, prompts, request)
            eos = engine.target.eos_token_ids
            completion = sum(len(r.token_ids) for r in results)
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": state.model_name,
                "choices": [
                    {
                        "index": i,
                        "text": r.text,
                        "logprobs": None,
                        "finish_reason": _finish_reason(r, eos),
                        "smc": _smc_info(r),
                    }
                    for i, r in enumerate(results)
                ],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": completion,
                    "total_tokens": n_prompt + completion,
                },
            }

        return await timed("completions", handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        if body.stream:
            return await streamed("chat_completions", body, messages, chat=True)

        async def handle() -> dict[str, Any]:
            (result,), n_prompt = await run(body, [messages], request)
            eos = engine.target.eos_token_ids
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": state.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": None,
                        "finish_reason": _finish_reason(result, eos),
                        "smc": _smc_info(result),
                    }
                ],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": len(result.token_ids),
                    "total_tokens": n_prompt + len(result.token_ids),
                },
            }

        return await timed("chat_completions", handle)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": state.model_name, "object": "model", "created": int(state.metrics.started), "owned_by": "smcgen"}
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": state.model_name,
            "engine": "generic" if engine.engine_reason else "native",
            "engine_reason": engine.engine_reason,
            "queue_depth": state.scheduler.depth,
            "requests_in_flight": state.metrics.in_flight,
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        state.metrics.queue_depth = state.scheduler.depth
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
