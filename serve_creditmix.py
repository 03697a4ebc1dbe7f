"""Serve the CreditMix classifiers (and CodeGen / IDP models) over HTTP: FastAPI + uvicorn, one lazily loaded,
cached model per endpoint, concurrent requests micro-batched into one forward pass.

    uvicorn serve_creditmix:app --host 0.0.0.0 --port 8000
    MODEL_BASE=smollm2-135m MODEL_SFT=runs/creditmix_sft HF_HUB_OFFLINE=1 uvicorn serve_creditmix:app --host 127.0.0.1 --port 8000
    python serve_creditmix.py --host 127.0.0.1 --port 8000        # the same app, started by uvicorn.run

Endpoints: POST /infer/{base,sft,kd,dpo} {"features": "…"} -> the README's JSON (a list of strings -> a list of
answers); POST /generate/codegen; POST /extract/idp; GET /health, /models, /metrics (Prometheus). Configuration is
environment variables only (read once when the app is created; see ServeConfig.from_env and the README):
MODEL_BASE / MODEL_SFT / MODEL_KD / MODEL_DPO / MODEL_CODEGEN / MODEL_IDP pick the model behind each endpoint (any
spec common.resolve_model takes: hub id, folder, run dir, .gguf, smollm2-135m); MICRO_BATCHING, BATCH_WAIT_MS,
MAX_BATCH tune batching; API_KEY turns on bearer-token auth for everything but /health.

How a request flows: validate (one clear 4xx message) -> the endpoint's model is loaded once (an asyncio lock per
model; the load runs in a worker thread so the event loop keeps answering other endpoints and /health; a load
failure is a 503 on that endpoint only, retried after LOAD_RETRY_S) -> the request's items join the endpoint's
queue; a per-endpoint worker gathers items for up to BATCH_WAIT_MS (or MAX_BATCH items) and scores them as one batch
on the single inference thread -> each request gets its slice. A client that disconnects while waiting has its
future cancelled: its items are dropped from the batch if it has not started, and nothing waits on it.
"""
import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import DEFAULT_STUDENT, UserError, user_errors

# a child of uvicorn's logger, so its lines appear in uvicorn's output with the same format and level
log = logging.getLogger("uvicorn.error.serve_creditmix")

# endpoint name -> (task, environment variable, default model). The CreditMix defaults are the README's; the
# CodeGen / IDP ones are the README's training commands' --save_dir (runs/sft_code, runs/sft_idp).
ENDPOINTS = {
    "base": ("creditmix", "MODEL_BASE", DEFAULT_STUDENT),
    "sft": ("creditmix", "MODEL_SFT", "runs/creditmix_sft"),
    "kd": ("creditmix", "MODEL_KD", "runs/creditmix_kd"),
    "dpo": ("creditmix", "MODEL_DPO", "runs/creditmix_dpo"),
    "codegen": ("codegen", "MODEL_CODEGEN", "runs/sft_code"),
    "idp": ("idp", "MODEL_IDP", "runs/sft_idp"),
}
ROUTES = {"creditmix": "/infer/{name}", "codegen": "/generate/codegen", "idp": "/extract/idp"}
README_FEATURES = ("Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, "
                   "Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments")
JSON_TYPE = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class ServeConfig:
    """Everything the server reads from the environment, with its defaults (the variable names are in from_env)."""
    models: dict[str, str] = field(default_factory=lambda: {n: d for n, (_, _, d) in ENDPOINTS.items()})
    quantize: str = "auto"             # QUANTIZE: auto = 4-bit NF4 on CUDA, plain weights on CPU (common.load_model)
    trust_remote_code: bool = False    # TRUST_REMOTE_CODE=1 allows model code from the hub
    micro_batching: bool = True        # MICRO_BATCHING=0: one forward pass per request (the load test's baseline)
    batch_wait_ms: float = 5.0         # BATCH_WAIT_MS: how long a batch waits for more requests after its first
    max_batch: int = 16                # MAX_BATCH: items per gathered batch and per forward pass
    max_queue: int = 1024              # MAX_QUEUE: items waiting per endpoint before new requests get a 503
    max_chars: int = 4000              # MAX_FEATURES_CHARS: cap on one feature string / prompt / document
    max_items: int = 64                # MAX_ITEMS: cap on the strings in one request's list
    max_body_bytes: int = 1 << 20      # MAX_BODY_BYTES: request bodies above this get a 413
    max_new_tokens_cap: int = 512      # MAX_NEW_TOKENS: upper bound of a generation request's max_new_tokens
    max_document_chars: int = 20000    # MAX_DOCUMENT_CHARS: cap on an IDP document
    idp_schema: str = "data/idp_schema.json"  # IDP_SCHEMA: the schema /extract/idp uses when a request sends none
    api_key: str | None = None         # API_KEY: when set, every endpoint but /health needs "Bearer <key>"
    load_retry_s: float = 30.0         # LOAD_RETRY_S: a failed model load is retried after this many seconds
    preload: list[str] = field(default_factory=list)  # PRELOAD: endpoints to load at startup ("all" or "base,sft")

    @classmethod
    def from_env(cls, env=None) -> "ServeConfig":
        env = os.environ if env is None else env

        def num(name, default, cast, lo):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                v = cast(raw)
            except ValueError:
                raise UserError(f"{name}={raw!r} is not a{'n integer' if cast is int else ' number'}") from None
            if v < lo:
                raise UserError(f"{name}={raw!r} must be at least {lo}")
            return v

        def flag(name, default):
            raw = env.get(name, "").strip().lower()
            if not raw:
                return default
            if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UserError(f"{name}={raw!r}: use 1 or 0")
            return raw in ("1", "true", "yes", "on")

        d = cls()
        quantize = env.get("QUANTIZE", "").strip() or d.quantize
        if quantize not in ("auto", "4bit", "none"):
            raise UserError(f"QUANTIZE={quantize!r}: choose auto, 4bit or none")
        preload = [p.strip() for p in env.get("PRELOAD", "").split(",") if p.strip()]
        preload = list(ENDPOINTS) if preload == ["all"] else preload
        unknown = [p for p in preload if p not in ENDPOINTS]
        if unknown:
            raise UserError(f"PRELOAD: unknown endpoint(s) {', '.join(unknown)}; known: all, {', '.join(ENDPOINTS)}")
        return cls(
            models={n: env.get(var, "").strip() or default for n, (_, var, default) in ENDPOINTS.items()},
            quantize=quantize,
            trust_remote_code=flag("TRUST_REMOTE_CODE", d.trust_remote_code),
            micro_batching=flag("MICRO_BATCHING", d.micro_batching),
            batch_wait_ms=num("BATCH_WAIT_MS", d.batch_wait_ms, float, 0),
            max_batch=num("MAX_BATCH", d.max_batch, int, 1),
            max_queue=num("MAX_QUEUE", d.max_queue, int, 1),
            max_chars=num("MAX_FEATURES_CHARS", d.max_chars, int, 1),
            max_items=num("MAX_ITEMS", d.max_items, int, 1),
            max_body_bytes=num("MAX_BODY_BYTES", d.max_body_bytes, int, 1024),
            max_new_tokens_cap=num("MAX_NEW_TOKENS", d.max_new_tokens_cap, int, 1),
            max_document_chars=num("MAX_DOCUMENT_CHARS", d.max_document_chars, int, 1),
            idp_schema=env.get("IDP_SCHEMA", "").strip() or d.idp_schema,
            api_key=env.get("API_KEY") or None,
            load_retry_s=num("LOAD_RETRY_S", d.load_retry_s, float, 0),
            preload=preload,
        )


# ----------------------------------------------------------------------------------------------------------------
# errors

class ApiError(Exception):
    """An error answered as {"error": message} with this status (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> str:
    """One readable line out of pydantic's error list (FastAPI's default is a nested list of dicts)."""
    msgs = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        kind = e.get("type", "")
        if kind == "json_invalid":
            msgs.append(f"invalid JSON in the request body ({e.get('ctx', {}).get('error', e.get('msg'))})")
        elif not loc and kind in ("missing", "model_attributes_type", "dict_type"):
            msgs.append('the request body must be a JSON object, e.g. {"features": "Age: 23.0, …"}')
        elif kind == "missing":
            msgs.append(f"missing field '{'.'.join(loc)}'")
        elif kind == "extra_forbidden":
            msgs.append(f"unknown field '{'.'.join(loc)}'")
        elif kind == "value_error":  # our validators' messages already name the field
            msgs.append(str(e.get("ctx", {}).get("error", e.get("msg"))))
        else:
            msgs.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(dict.fromkeys(msgs))  # union types repeat a message per member


# ASCII whitespace only: Python's str.strip() also strips control characters such as \x1e that the OpenAPI
# pattern (ECMA regex) counts as content, and the two must agree on what "empty" means.
SPACE = " \t\n\r\f\v"
NOT_BLANK = r"[^ \t\n\r\f\v]"


def check_text(v: Any, name: str, cap: int, cap_var: str = "MAX_FEATURES_CHARS") -> str:
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    if len(v) > cap:
        raise ValueError(f"{name} is {len(v)} characters long; the cap is {cap} ({cap_var})")
    v = v.strip(SPACE)
    if not v:
        raise ValueError(f"{name} is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (an unpaired surrogate)") from None
    return v


def check_int(v: Any, name: str, lo: int, hi: int, cap_var: str) -> int:
    if isinstance(v, float) and v.is_integer():  # JSON Schema's "integer" includes 8.0
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi} ({cap_var}), got {v}")
    return v


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    return v


def check_texts(v: Any, name: str, cap: int, max_items: int) -> str | list[str]:
    """A non-empty string, or a non-empty list of them (at most max_items): stripped, each under the cap."""
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{name} is an empty list")
        if len(v) > max_items:
            raise ValueError(f"{name} holds {len(v)} strings; the cap is {max_items} per request (MAX_ITEMS)")
        return [check_text(x, f"{name}[{i}]", cap) for i, x in enumerate(v)]
    if not isinstance(v, str):
        got = JSON_TYPE.get(type(v), type(v).__name__)
        raise ValueError(f"{name} must be a string or a list of strings, got {got}")
    return check_text(v, name, cap)


# ----------------------------------------------------------------------------------------------------------------
# models

class Slot:
    """One model spec: loaded once (under an asyncio lock, in a worker thread), then cached with its CreditMix
    multi-null prior. A failed load is remembered and retried after cfg.load_retry_s."""

    def __init__(self, spec: str, cfg: ServeConfig, metrics):
        self.spec, self.cfg, self.metrics = spec, cfg, metrics
        self.lock = asyncio.Lock()
        self.state = "not loaded"   # not loaded | loading | loaded | error
        self.model = self.tok = self.ms = self.prior = None
        self.error: str | None = None
        self.failed_at = 0.0
        self.loads = 0              # completed loads (the tests check concurrent first requests give one)
        self.grammars = None        # IDP: json_grammar.GrammarCache for this tokenizer, made on first use
        self.load_seconds: float | None = None

    async def ensure(self, where: str) -> "Slot":
        if self.state == "loaded":
            return self
        if self.state == "error" and time.monotonic() - self.failed_at < self.cfg.load_retry_s:
            raise self.unavailable(where)
        async with self.lock:
            if self.state == "loaded":
                return self
            if self.state == "error" and time.monotonic() - self.failed_at < self.cfg.load_retry_s:
                raise self.unavailable(where)
            self.state = "loading"
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._load)
            except Exception as e:  # any load failure is this endpoint's 503, never the server's crash
                self.state, self.failed_at = "error", time.monotonic()
                first = str(e).splitlines()[0][:300] if str(e) else ""
                self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
                if not isinstance(e, UserError):
                    log.error("loading %s failed:\n%s", self.spec, traceback.format_exc())
                self.metrics.load_failures.labels(self.spec).inc()
                raise self.unavailable(where) from None
            self.load_seconds = round(time.perf_counter() - t0, 3)
            self.state, self.error = "loaded", None
            self.loads += 1
            self.metrics.loads.labels(self.spec).inc()
            log.info("loaded %s in %.1fs", self.spec, self.load_seconds)
            return self

    def unavailable(self, where: str) -> ApiError:
        retry = max(1, int(self.cfg.load_retry_s - (time.monotonic() - self.failed_at)))
        return ApiError(503, f"{where}: model '{self.spec}' is unavailable: {self.error} (retried in {retry}s)",
                        {"Retry-After": str(retry)})

    def _load(self) -> None:
        import creditmix as cm
        from common import load_model
        from scoring import prior_for

        p = Path(self.spec)
        looks_local = p.is_absolute() or self.spec.startswith(".") or Path(self.spec.split("/")[0]).is_dir()
        if "/" in self.spec and looks_local and not p.exists():
            # e.g. runs/creditmix_kd before KD was trained: say so instead of asking the hub for "runs/creditmix_kd"
            raise UserError(f"{p.resolve()} does not exist (train that run first, or point the endpoint's "
                            f"MODEL_* variable elsewhere)")
        model, tok, ms = load_model(self.spec, quantize=self.cfg.quantize, trust_remote_code=self.cfg.trust_remote_code)
        # the README's multi-null prior, computed once per model (4 content-free prompts, one small batch)
        prior = prior_for("multi_null", None, cm.null_scores(model, tok))
        self.model, self.tok, self.ms, self.prior = model, tok, ms, prior

    def describe(self) -> dict:
        d = {"model": self.spec, "state": self.state, "loads": self.loads, "load_seconds": self.load_seconds,
             "error": self.error}
        if self.ms is not None:
            d.update(base_model=self.ms.base_spec, adapter=self.ms.adapter,
                     device=str(next(self.model.parameters()).device))
        return d


# ----------------------------------------------------------------------------------------------------------------
# micro-batching

class MicroBatcher:
    """Gather the items of concurrent requests to one endpoint for up to `wait_s` (or `max_batch` items), run them
    as one call of `run(items) -> results` on the inference thread, hand each request its slice. One worker task
    per endpoint, so an endpoint's batches run one after another and grow under load."""

    def __init__(self, run: Callable[[list], list], executor, max_batch: int, wait_s: float, max_queue: int,
                 on_batch: Callable[[int], None]):
        self.run, self.executor, self.max_batch, self.wait_s = run, executor, max_batch, wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.waiting = 0  # items queued, not yet taken into a batch

    def submit(self, items: list) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self.waiting + len(items) > self.max_queue:
            raise ApiError(503, f"server busy: {self.waiting} items are waiting on this endpoint (MAX_QUEUE="
                                f"{self.max_queue}); retry shortly", {"Retry-After": "1"})
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._worker())
        fut = loop.create_future()
        self.queue.put_nowait((items, fut))
        self.waiting += len(items)
        return fut

    async def _next(self, timeout: float | None):
        item = await self.queue.get() if timeout is None else await _get_within(self.queue, timeout)
        if item is not None:
            self.waiting -= len(item[0])
        return item

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._next(None)]
            n, deadline = len(batch[0][0]), loop.time() + self.wait_s
            while n < self.max_batch:
                nxt = await self._next(max(0.0, deadline - loop.time()))
                if nxt is None:
                    break
                batch.append(nxt)
                n += len(nxt[0])
            live = [(items, fut) for items, fut in batch if not fut.done()]  # cancelled: the client left
            if not live:
                continue
            flat = [x for items, _ in live for x in items]
            self.on_batch(len(flat))
            try:
                out = await loop.run_in_executor(self.executor, self.run, flat)
            except Exception as e:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            i = 0
            for items, fut in live:
                if not fut.done():
                    fut.set_result(out[i:i + len(items)])
                i += len(items)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _get_within(queue: asyncio.Queue, timeout: float):
    """queue.get() or None after `timeout` s. Queue.get removes the item only after its wake-up, in the same step,
    so a timeout never loses one."""
    if not queue.empty():
        return queue.get_nowait()
    if timeout <= 0:
        return None
    try:
        async with asyncio.timeout(timeout):
            return await queue.get()
    except TimeoutError:
        return None


class ClientGone(Exception):
    pass


async def _until_disconnect(request: Request) -> None:
    # Once the body is read, uvicorn's receive() blocks until the client disconnects (or the response is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_unless_disconnected(request: Request, fut: asyncio.Future):
    """The result of `fut`, or ClientGone (with `fut` cancelled, so the batch skips it) if the client hangs up."""
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    finally:
        watcher.cancel()
    if fut in done:
        return fut.result()
    fut.cancel()
    raise ClientGone


# ----------------------------------------------------------------------------------------------------------------
# metrics

class Metrics:
    """Prometheus metrics in the app's own registry (several apps in one process, as in tests, do not clash)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
        disable_created_metrics()  # no *_created series: they double the output and dashboards do not use them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("serve_errors", "HTTP requests answered with status >= 400", ["endpoint", "status"],
                              registry=r)
        self.latency = Histogram("serve_request_latency_seconds", "request latency, receipt to response",
                                 ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_size = Histogram("serve_batch_size", "items per scored batch (one forward pass when it is at "
                                    "most MAX_BATCH)", ["endpoint"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.items = Counter("serve_items", "feature strings / prompts / documents processed", ["endpoint"],
                             registry=r)
        self.disconnects = Counter("serve_client_disconnects", "requests whose client left before the answer",
                                   ["endpoint"], registry=r)
        self.loads = Counter("serve_model_loads", "completed model loads", ["model"], registry=r)
        self.load_failures = Counter("serve_model_load_failures", "failed model loads", ["model"], registry=r)
        self.loaded = Gauge("serve_models_loaded", "models in memory", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class Gate:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which interferes with disconnect detection): request metrics,
    bearer-token auth when API_KEY is set, and a cap on the request body (read here, then replayed to the app)."""

    def __init__(self, app, cfg: ServeConfig, metrics: Metrics, known_paths: set[str]):
        self.app, self.cfg, self.metrics, self.known = app, cfg, metrics, known_paths
        self.expected = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.known else "other"
        t0, status = time.perf_counter(), [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted, path)
        finally:
            s = str(status[0] or 499)  # no response started: the client left first
            self.metrics.requests.labels(endpoint, s).inc()
            if int(s) >= 400:
                self.metrics.errors.labels(endpoint, s).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _handle(self, scope, receive, send, path):
        if self.expected is not None and path != "/health":
            headers = dict(scope["headers"])
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                why = "missing" if not got else "invalid"
                resp = error_response(401, f"{why} API key: send the header 'Authorization: Bearer <API_KEY>'",
                                      {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.cfg.max_body_bytes:
                resp = error_response(413, f"request body over {self.cfg.max_body_bytes} bytes (MAX_BODY_BYTES)")
                return await resp(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------------------------
# task functions (run on the inference thread, one batch at a time)

def score_creditmix(slot: Slot, features: list[str], batch_size: int) -> list[dict]:
    """The README's response JSON for each feature string: raw label scores, minus the multi-null prior."""
    import creditmix as cm
    from scoring import response
    raw = cm.label_scores(slot.model, slot.tok, [cm.prompt_for(f) for f in features], batch_size=batch_size)
    return [response(slot.spec, cm.LABELS, r, slot.prior) for r in raw]


def _groups(items: list, key: Callable) -> dict:
    """Indices of `items` grouped by key(item): one generate() call per group of identical settings."""
    out: dict = {}
    for i, x in enumerate(items):
        out.setdefault(key(x), []).append(i)
    return out


def run_codegen(slot: Slot, items: list[tuple], batch_size: int) -> list[dict]:
    """items: (task, max_new_tokens, plan_then_code). Greedy answers through codegen.answer, code extracted."""
    import codegen
    out: list = [None] * len(items)
    for (n, plan), idx in _groups(items, lambda x: (x[1], x[2])).items():
        answers = codegen.answer(slot.model, slot.tok, [items[i][0] for i in idx], plan_then_code=plan,
                                 plan_tokens=min(256, n), max_new_tokens=n, batch_size=batch_size)
        for i, a in zip(idx, answers):
            out[i] = {"model_name": slot.spec, "code": codegen.extract_code(a[0]["raw"]), "raw": a[0]["raw"],
                      "plan": a[0]["plan"]}
    return out


def run_idp(slot: Slot, items: list[tuple], batch_size: int) -> list:
    """items: (document, schema, compiled grammar, validator, max_new_tokens). Grammar-constrained greedy decoding
    through json_grammar.generate (one call per schema and budget), each output parsed and validated."""
    import idp
    import json_grammar as jg
    out: list = [None] * len(items)
    for (_, n), idx in _groups(items, lambda x: (id(x[2]), x[4])).items():
        schema, compiled, validator = items[idx[0]][1], items[idx[0]][2], items[idx[0]][3]
        limit = idp.input_token_limit(slot.model, slot.tok, 0, n)
        ok, prompts, cut = [], [], {}
        for i in idx:
            try:
                prompt, cut[i] = idp.document_prompt(slot.tok, schema, items[i][0], limit, quiet=True)
            except UserError as e:
                out[i] = ApiError(422, str(e))
                continue
            ok.append(i)
            prompts.append(prompt)
        if not ok:
            continue
        results, _ = jg.generate(slot.model, slot.tok, prompts, max_new_tokens=n, batch_size=batch_size,
                                 grammar=compiled, cache=slot.grammars, max_string_chars=IDP_MAX_STRING_CHARS)
        for i, r in zip(ok, results):
            c = jg.check_output(r["text"], validator)
            out[i] = {"model_name": slot.spec, "output": c["json"] if c["schema_valid"] else None,
                      "valid": c["schema_valid"], "error": c["error"], "budget_closed": r["budget_closed"],
                      "truncated": cut[i], "new_tokens": r["new_tokens"]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# the app

ERROR_BODY = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}


# infer_idp.py's defaults: strings closed at this many characters (by the decoder), maxItems for arrays
IDP_MAX_STRING_CHARS, IDP_MAX_ARRAY_ITEMS = 256, 32
GRAMMARS_KEPT = 64  # distinct request schemas compiled per model before the grammar cache is emptied


def _error_docs(*codes: int) -> dict:
    why = {401: "missing or wrong API key (when API_KEY is set)", 404: "no such endpoint",
           413: "request body too large", 415: "the body is not sent as application/json",
           422: "invalid request: the message says what is wrong",
           503: "the endpoint's model cannot be loaded, or the server is busy"}
    return {c: {"description": why[c], **ERROR_BODY} for c in codes}


class CodeGenAnswer(BaseModel):
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_CODEGEN)")
    code: str = Field(description="the Python code extracted from the answer (empty if there is none)")
    raw: str = Field(description="the model's whole answer")
    plan: str | None = Field(description="the plan written first, with plan_then_code; else null")


class IdpAnswer(BaseModel):
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_IDP)")
    output: dict | None = Field(description="the extracted JSON object, valid for the schema; null when not valid")
    valid: bool = Field(description="output parsed and validated against the schema (jsonschema)")
    error: str | None = Field(description="why the output is not valid, else null")
    budget_closed: bool = Field(description="the JSON was closed early to fit max_new_tokens")
    truncated: bool = Field(description="the document was cut at its end to fit the model's context")
    new_tokens: int = Field(description="tokens generated")


class CreditMixAnswer(BaseModel):
    """The README's response: calibrated scores = raw_scores - prior; probabilities = softmax(scores)."""
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_*)")
    prediction: str = Field(description="the label with the highest calibrated score")
    scores: dict[str, float] = Field(description="calibrated scores: raw_scores - prior")
    raw_scores: dict[str, float] = Field(description="mean log-probability per label token after the prompt")
    prior: dict[str, float] = Field(description="multi-null prior: mean raw score over content-free prompts")
    probabilities: dict[str, float] = Field(description="softmax over the calibrated scores")
    top2_margin: float = Field(description="best minus second-best calibrated score (a confidence signal)")


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """Build the app. With no config, read the environment (ServeConfig.from_env); nothing heavy happens here:
    models load on first use (or at startup for PRELOAD endpoints, in the background)."""
    if config is None:
        try:
            config = ServeConfig.from_env()
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    cfg = config
    metrics = Metrics()
    state: dict[str, Any] = {}  # built in the lifespan: executor, slots, batchers

    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_chars, pattern=NOT_BLANK)]

    class CreditMixRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"features": README_FEATURES}]})
        features: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=cfg.max_items)]] = Field(
            description=f"one customer's features, or a list of them (at most {cfg.max_items}, each at most "
                        f"{cfg.max_chars} characters); a list gets a list of answers in the same order")

        @field_validator("features", mode="before")
        @classmethod
        def _features(cls, v):
            return check_texts(v, "features", cfg.max_chars, cfg.max_items)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # One inference thread: batches (of all endpoints) run one at a time, each using all of torch's threads.
        state["executor"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        slots: dict[str, Slot] = {}
        for name, spec in cfg.models.items():  # endpoints naming the same model share one copy
            slots.setdefault(spec, Slot(spec, cfg, metrics))
        state["slots"] = {name: slots[spec] for name, spec in cfg.models.items()}
        state["batchers"] = {}
        log.info("serve_creditmix: %s; micro_batching=%s batch_wait_ms=%s max_batch=%s auth=%s",
                 ", ".join(f"{n}={s}" for n, s in cfg.models.items()), cfg.micro_batching, cfg.batch_wait_ms,
                 cfg.max_batch, "on" if cfg.api_key else "off")
        preload = [asyncio.create_task(_preload(n)) for n in cfg.preload]
        yield
        for t in preload:
            t.cancel()
        for b in state["batchers"].values():
            await b.close()
        state["executor"].shutdown(wait=False, cancel_futures=True)

    async def _preload(name: str):
        with contextlib.suppress(ApiError):
            await state["slots"][name].ensure(name)
            metrics.loaded.set(sum(s.state == "loaded" for s in set(state["slots"].values())))

    app = FastAPI(title="distill_slm serve_creditmix", version="1.0", lifespan=lifespan,
                  description="CreditMix calibrated label ranking (base/sft/kd/dpo), CodeGen generation and IDP "
                              "schema-constrained extraction over HTTP. See the README's serving section.")

    # ------------------------------------------------------------------ errors: one JSON shape, {"error": "…"}
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:  # FastAPI then sees no body at all
            return error_response(415, f"send the body as JSON with the header 'Content-Type: application/json' "
                                       f"(got {ctype or 'no Content-Type'})")
        return error_response(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path} (see GET /models for the endpoints)"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI: bytes that are not UTF-8
            return error_response(422, "invalid JSON in the request body (not UTF-8 text)")
        else:
            msg = str(exc.detail)
        return error_response(exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # ------------------------------------------------------------------ running one endpoint's work
    def batcher_for(name: str, run: Callable[[list], list], max_batch: int | None = None) -> MicroBatcher:
        if name not in state["batchers"]:
            path = route_of(name)
            state["batchers"][name] = MicroBatcher(
                run, state["executor"], max_batch or cfg.max_batch, cfg.batch_wait_ms / 1000, cfg.max_queue,
                on_batch=lambda n: metrics.batch_size.labels(path).observe(n))
        return state["batchers"][name]

    async def process(request: Request, name: str, items: list, run: Callable[[Slot, list], list],
                      batched: bool = True):
        """Load the endpoint's model (once), then run `run(slot, items)` on the inference thread, micro-batched
        with other requests to the same endpoint when batching is on and `batched`."""
        path = route_of(name)
        slot = await state["slots"][name].ensure(path)
        metrics.loaded.set(sum(s.state == "loaded" for s in set(state["slots"].values())))
        if cfg.micro_batching and batched:
            fut = batcher_for(name, lambda flat: run(slot, flat)).submit(items)
        else:
            metrics.batch_size.labels(path).observe(len(items))
            fut = asyncio.get_running_loop().run_in_executor(state["executor"], run, slot, items)
        try:
            out = await _wait_unless_disconnected(request, fut)
        except ClientGone:
            metrics.disconnects.labels(path).inc()
            raise
        except UserError as e:  # input the model cannot take (a check deeper than the request's)
            raise ApiError(422, str(e)) from None
        for x in out:  # a per-item failure (e.g. an IDP document that cannot fit) answers that request
            if isinstance(x, Exception):
                raise x
        metrics.items.labels(path).inc(len(items))
        return out

    def route_of(name: str) -> str:
        return ROUTES[ENDPOINTS[name][0]].format(name=name)

    # ------------------------------------------------------------------ CreditMix
    def creditmix_route(name: str):
        var = ENDPOINTS[name][1]

        async def infer(request: Request, body: CreditMixRequest):
            items = [body.features] if isinstance(body.features, str) else body.features
            out = await process(request, name, items, lambda slot, xs: score_creditmix(slot, xs, cfg.max_batch))
            return JSONResponse(out[0] if isinstance(body.features, str) else out)

        infer.__name__ = f"infer_{name}"
        app.post(f"/infer/{name}", tags=["creditmix"],
                 summary=f"CreditMix label (Good/Standard/Bad) with the {name} model ({var})",
                 response_model=Union[CreditMixAnswer, list[CreditMixAnswer]],
                 responses=_error_docs(401, 413, 415, 422, 503))(infer)

    for name, (task, _, _) in ENDPOINTS.items():
        if task == "creditmix":
            creditmix_route(name)

    # ------------------------------------------------------------------ CodeGen
    default_new = min(512, cfg.max_new_tokens_cap)

    class CodeGenRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"prompt": "Write a function that sorts a list.", "max_new_tokens": 256, "plan_then_code": False}]})
        prompt: Text = Field(description=f"the coding task (at most {cfg.max_chars} characters)")
        max_new_tokens: Annotated[int, Field(ge=1, le=cfg.max_new_tokens_cap)] = Field(
            default_new, description=f"token budget of the answer (and of the plan), at most {cfg.max_new_tokens_cap}")
        plan_then_code: bool = Field(False, description="write a short plan first, then code that follows it")

        @field_validator("prompt", mode="before")
        @classmethod
        def _prompt(cls, v):
            return check_text(v, "prompt", cfg.max_chars)

        @field_validator("max_new_tokens", mode="before")
        @classmethod
        def _budget(cls, v):
            return check_int(v, "max_new_tokens", 1, cfg.max_new_tokens_cap, "MAX_NEW_TOKENS")

        @field_validator("plan_then_code", mode="before")
        @classmethod
        def _plan(cls, v):
            return check_bool(v, "plan_then_code")

    @app.post("/generate/codegen", tags=["codegen"], response_model=CodeGenAnswer,
              summary="Python code for a task, greedy decoding capped at max_new_tokens (MODEL_CODEGEN)",
              responses=_error_docs(401, 413, 415, 422, 503))
    async def generate_codegen(request: Request, body: CodeGenRequest):
        items = [(body.prompt, body.max_new_tokens, body.plan_then_code)]
        out = await process(request, "codegen", items, lambda slot, xs: run_codegen(slot, xs, cfg.max_batch))
        return JSONResponse(out[0])

    # ------------------------------------------------------------------ IDP
    Doc = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_document_chars, pattern=NOT_BLANK)]

    class IdpRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"document": "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50.", "max_new_tokens": 256}]})
        document: Doc = Field(description=f"the document text (at most {cfg.max_document_chars} characters)")
        json_schema: dict | None = Field(None, alias="schema", description=(
            f"the JSON Schema the output must conform to (root type object); default: the server's IDP_SCHEMA "
            f"file ({cfg.idp_schema})"))
        max_new_tokens: Annotated[int, Field(ge=1, le=cfg.max_new_tokens_cap)] = Field(
            default_new, description=f"token budget of the reply, at most {cfg.max_new_tokens_cap}; the JSON is "
                                     "always closed within it")

        @field_validator("document", mode="before")
        @classmethod
        def _document(cls, v):
            return check_text(v, "document", cfg.max_document_chars, "MAX_DOCUMENT_CHARS")

        @field_validator("json_schema", mode="before")
        @classmethod
        def _schema(cls, v):
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"schema must be a JSON object, got {JSON_TYPE.get(type(v), type(v).__name__)}")
            return v

        @field_validator("max_new_tokens", mode="before")
        @classmethod
        def _budget(cls, v):
            return check_int(v, "max_new_tokens", 1, cfg.max_new_tokens_cap, "MAX_NEW_TOKENS")

    def default_schema() -> dict:
        import json_grammar as jg
        if "idp_schema" not in state:
            try:
                state["idp_schema"] = jg.load_schema(cfg.idp_schema)
            except UserError as e:
                raise ApiError(503, f"/extract/idp: the server's default schema is unusable ({e}); send a "
                                    "\"schema\" in the request or fix IDP_SCHEMA") from None
        return state["idp_schema"]

    @app.post("/extract/idp", tags=["idp"], response_model=IdpAnswer,
              summary="one JSON object per document, grammar-constrained by a JSON Schema and validated "
                      "(MODEL_IDP)",
              responses=_error_docs(401, 413, 415, 422, 503))
    async def extract_idp(request: Request, body: IdpRequest):
        import json_grammar as jg
        schema = body.json_schema
        if schema is None:
            schema = default_schema()
        else:
            try:
                jg.check_schema(schema, "schema")
            except UserError as e:
                raise ApiError(422, str(e)) from None
        slot = await state["slots"]["idp"].ensure("/extract/idp")
        if slot.grammars is None:
            async with slot.lock:
                if slot.grammars is None:
                    slot.grammars = await asyncio.to_thread(jg.GrammarCache, slot.tok,
                                                            vocab_size=slot.model.config.vocab_size)
        if len(slot.grammars._cache) >= GRAMMARS_KEPT:  # bound the memory many distinct request schemas take
            slot.grammars._cache.clear()
        try:  # compiled off the inference thread (a new schema takes ~1-2 s), cached per schema
            compiled = await asyncio.to_thread(slot.grammars.compile, schema, IDP_MAX_ARRAY_ITEMS)
        except UserError as e:
            raise ApiError(422, f"schema: {e}") from None
        if compiled.min_tokens > body.max_new_tokens:
            raise ApiError(422, f"max_new_tokens {body.max_new_tokens} is too small: the smallest valid JSON for "
                                f"this schema needs {compiled.min_tokens} tokens")
        items = [(body.document, schema, compiled, jg.make_validator(schema), body.max_new_tokens)]
        out = await process(request, "idp", items, lambda slot, xs: run_idp(slot, xs, cfg.max_batch))
        return JSONResponse(out[0])

    # ------------------------------------------------------------------ service endpoints
    @app.get("/health", tags=["service"], summary="liveness: 200 while the server runs (no auth)")
    async def health():
        return {"status": "ok"}

    @app.get("/models", tags=["service"], summary="each endpoint's model: spec, state, load count, error",
             responses=_error_docs(401))
    async def models():
        slots = state["slots"]
        return {"endpoints": {route_of(n): {"task": ENDPOINTS[n][0], "env": ENDPOINTS[n][1], **slots[n].describe()}
                              for n in ENDPOINTS},
                "micro_batching": cfg.micro_batching, "batch_wait_ms": cfg.batch_wait_ms,
                "max_batch": cfg.max_batch, "max_items": cfg.max_items, "max_chars": cfg.max_chars,
                "max_new_tokens_cap": cfg.max_new_tokens_cap, "max_document_chars": cfg.max_document_chars,
                "idp_schema": cfg.idp_schema}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}, **_error_docs(401)})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if cfg.api_key:  # document the auth so API clients (and schemathesis) send it
        def openapi():
            if app.openapi_schema is None:
                from fastapi.openapi.utils import get_openapi
                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http",
                                                                                     "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values():
                        op["security"] = [] if path == "/health" else [{"bearer": []}]
                app.openapi_schema = schema
            return app.openapi_schema
        app.openapi = openapi

    known = {"/health", "/models", "/metrics", "/docs", "/openapi.json"} | {route_of(n) for n in ENDPOINTS}
    app.add_middleware(Gate, cfg=cfg, metrics=metrics, known_paths=known)
    app.state.config, app.state.serve = cfg, state
    return app


app = create_app()


# ----------------------------------------------------------------------------------------------------------------
# python serve_creditmix.py: the same app under uvicorn.run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # run
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind: 127.0.0.1 = this machine only; 0.0.0.0 = every network interface")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level")
    p.add_argument("--no_access_log", action="store_true", help="do not log one line per request")
    return p.parse_args(argv)


def main(args):
    import uvicorn
    # load: nothing here; models load on first use (or PRELOAD)
    # run
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log)


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
