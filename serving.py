"""The serving machinery serve_creditmix.py wires into routes: model slots (one base per distinct base model, its
LoRA adapters attached by name), lanes (a micro-batcher with its own inference thread per task and base), the
admission gate (auth, body cap, request metrics) and the Prometheus metrics. Importing it loads nothing heavy.

Threads and what they share:
- one loader thread for the whole server: model loads run one after another, so heavy imports and
  from_pretrained never race (PRELOAD used to start several loads at once);
- one inference thread per lane = (task, base model): CreditMix scoring, CodeGen and IDP generation on one base run
  side by side, so a long generation does not hold up label scoring; the items of one lane are micro-batched;
- the base model is shared by its lanes. Each forward pass picks its adapter per row from a thread-local list
  (PEFT's mixed-adapter batches, `adapter_names`; "__base__" = adapters disabled), never from the model's "active
  adapter", so concurrent lanes cannot switch each other's adapters. Each LoRA layer computes such a batch from its
  adapters stacked into one tensor (compat.stacked_lora_batches; STACKED_LORA=0: PEFT's loop over the adapters).
  Attaching an adapter takes the base's write lock (no batch runs meanwhile).
- every forward pass first checks its batch's cancel flag (all of its clients left, or the server is stopping) and
  raises Cancelled: a generation stops within one decoding step.
"""
import asyncio
import contextlib
import copy
import hmac
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi.responses import JSONResponse

from fileio import UserError

log = logging.getLogger("uvicorn.error.serve_creditmix")
BASE = "__base__"  # PEFT's adapter name for "no adapter" rows in a mixed batch


class ApiError(Exception):
    """An error answered as {"error": message} with this status (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Cancelled(Exception):
    """Raised inside a forward pass whose batch nobody waits for any more (or when the server stops)."""


class ClientGone(Exception):
    pass


def error_response(status: int, message: str, headers: dict | None = None, openai: bool = False) -> JSONResponse:
    """{"error": message}; on the OpenAI routes the OpenAI shape {"error": {"message", "type", "code"}}."""
    if openai:
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# per-thread model call context: which adapter each row uses, and the batch's cancel flag

_ctx = threading.local()


@contextlib.contextmanager
def model_call(adapters: list[str] | None = None, cancel: threading.Event | None = None):
    """Within the block, forward passes in this thread use `adapters` per row (one name = every row) and raise
    Cancelled once `cancel` is set. Nested blocks restore the outer setting."""
    prev = getattr(_ctx, "adapters", None), getattr(_ctx, "cancel", None)
    _ctx.adapters = adapters if adapters is not None else prev[0]
    _ctx.cancel = cancel if cancel is not None else prev[1]
    try:
        yield
    finally:
        _ctx.adapters, _ctx.cancel = prev


def _rows(names: list[str], n: int) -> list[str]:
    """The adapter names for a batch of n rows: one name broadcast; a batch grown r-fold after its first pass
    (label continuations, num_return_sequences: repeat_interleave) repeats each name r times."""
    if len(names) == n:
        return names
    if len(names) == 1:
        return names * n
    if n % len(names) == 0:
        r = n // len(names)
        return [a for a in names for _ in range(r)]
    raise RuntimeError(f"{len(names)} adapter names for a batch of {n} rows")


def _check_cancel(module, args):
    cancel = getattr(_ctx, "cancel", None)
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def _lora_rows_hook(module, args, kwargs):
    names = getattr(_ctx, "adapters", None) or [BASE]
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    kwargs["adapter_names"] = _rows(names, x.shape[0])
    return args, kwargs


@contextlib.contextmanager
def _names_to_thread(*args, **kwargs):
    """What a PEFT model call does with `adapter_names` on the served model (compat.adapter_names_per_thread): they
    go to this thread's context, which the permanent per-layer hook reads."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        yield
        return
    with model_call(list(names)):
        yield


def install_hooks(model, stacked_lora: bool = True) -> None:
    """Once per model and again after each adapter attach (new LoRA layers): the cancel check on the input
    embeddings (called once per forward pass), the per-thread adapter choice on every LoRA layer, and (stacked_lora)
    the stacked mixed-adapter LoRA forward, one batched product over all adapters per layer instead of PEFT's loop
    over the batch's adapters (both through compat.py: they replace private PEFT methods)."""
    emb = model.get_input_embeddings()
    if not getattr(emb, "_serve_cancel_hook", False):
        emb.register_forward_pre_hook(_check_cancel)
        emb._serve_cancel_hook = True
    from peft import PeftModel
    if isinstance(model, PeftModel):
        import compat
        compat.adapter_names_per_thread(model, _names_to_thread, _lora_rows_hook)
        compat.stacked_lora_batches(model, on=stacked_lora)


class RWLock:
    """Many batches (readers) or one adapter attach (writer); a waiting writer goes before new readers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers, self._writer, self._waiting = 0, False, 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ----------------------------------------------------------------------------------------------------------------
# model slots

@dataclass
class Base:
    """One loaded base model, shared by every endpoint whose model is it or an adapter trained on it."""
    key: str
    model: Any
    tok: Any
    adapters: dict[str, str] = field(default_factory=dict)   # adapter run dir -> PEFT adapter name
    tokenizers: dict[tuple, Any] = field(default_factory=dict)  # fingerprint -> the tokenizer endpoints share
    lock: RWLock = field(default_factory=RWLock)
    lane_toks: dict[tuple, Any] = field(default_factory=dict)  # (id of a shared tokenizer, lane) -> its copy
    precision: tuple[str, str] | None = None  # (precision, why): precision.choose_precision

    @property
    def peft(self) -> bool:
        return bool(self.adapters)

    def lane_tokenizer(self, tok, lane: str):
        """A copy of a tokenizer per lane thread: a fast tokenizer called with padding from two threads at once
        fails ("Already borrowed"), and generation code sets padding_side on it. Endpoints that share a tokenizer
        share its copies."""
        key = (id(tok), lane)
        if key not in self.lane_toks:
            self.lane_toks[key] = copy.deepcopy(tok)
        return self.lane_toks[key]


def tokenizer_fingerprint(tok) -> tuple:
    """Tokenizers equal in what scoring and prompting use: endpoints with equal fingerprints share one batch."""
    return (len(tok), tok.chat_template, tok.eos_token_id, tok.pad_token_id, type(tok).__name__)


class Slot:
    """What one endpoint's model spec needs: its base (shared), its adapter name (None = the base itself), its
    tokenizer, and (CreditMix only, computed on first use) the multi-null prior. Loaded once under an asyncio lock
    on the loader thread; a failed load is remembered and retried after load_retry_s."""

    def __init__(self, spec: str, slots: "ModelSlots"):
        self.spec, self.slots = spec, slots
        self.lock = asyncio.Lock()
        self.state = "not loaded"   # not loaded | loading | loaded | error
        self.base: Base | None = None
        self.adapter: str | None = None  # PEFT adapter name; None: the base model with adapters disabled
        self.tok = self.ms = self.prior = None
        self.error: str | None = None
        self.failed_at = 0.0
        self.loads = 0
        self.load_seconds: float | None = None
        self.extra: dict[str, Any] = {}  # per-task caches (e.g. IDP grammars), made on first use

    @property
    def model(self):
        return self.base.model if self.base else None

    @property
    def row_name(self) -> str:
        return self.adapter or BASE

    def lane_tokenizer(self, lane: str):
        return self.base.lane_tokenizer(self.tok, lane)

    async def ensure(self, where: str) -> "Slot":
        if self.state == "loaded":
            return self
        cfg = self.slots
        if self.state == "error" and time.monotonic() - self.failed_at < cfg.load_retry_s:
            raise self.unavailable(where)
        async with self.lock:
            if self.state == "loaded":
                return self
            if self.state == "error" and time.monotonic() - self.failed_at < cfg.load_retry_s:
                raise self.unavailable(where)
            self.state = "loading"
            t0 = time.perf_counter()
            try:
                fut = asyncio.get_running_loop().run_in_executor(cfg.loader, self.slots.load, self)
                await fut
            except Exception as e:  # any load failure is this endpoint's 503, never the server's crash
                self.state, self.failed_at = "error", time.monotonic()
                first = str(e).splitlines()[0][:300] if str(e) else ""
                self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
                if not isinstance(e, UserError):
                    log.error("loading %s failed:\n%s", self.spec, traceback.format_exc())
                cfg.metrics.load_failures.labels(self.spec).inc()
                raise self.unavailable(where) from None
            self.load_seconds = round(time.perf_counter() - t0, 3)
            self.state, self.error = "loaded", None
            self.loads += 1
            cfg.metrics.loads.labels(self.spec).inc()
            log.info("loaded %s in %.1fs, precision %s (%s)", self.spec, self.load_seconds,
                     *(self.base.precision or ("?", "?")))
            return self

    def unavailable(self, where: str) -> ApiError:
        retry = max(1, int(self.slots.load_retry_s - (time.monotonic() - self.failed_at)))
        return ApiError(503, f"{where}: model '{self.spec}' is unavailable: {self.error} (retried in {retry}s)",
                        {"Retry-After": str(retry)})

    def context(self) -> int:
        """The model's context window in tokens (max_position_embeddings; else the tokenizer's limit)."""
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        t = getattr(self.tok, "model_max_length", None)
        if n is None or (t is not None and t < n):
            n = t if t and t < 10 ** 8 else n  # tokenizers without a limit say 1e30
        return int(n or 2048)

    def describe(self) -> dict:
        d = {"model": self.spec, "state": self.state, "loads": self.loads, "load_seconds": self.load_seconds,
             "error": self.error}
        if self.ms is not None and self.base is not None:
            d.update(base_model=self.ms.base_spec, adapter=self.ms.adapter,
                     device=str(next(self.model.parameters()).device), shared_base=self.base.key,
                     precision=self.base.precision[0] if self.base.precision else None,
                     precision_reason=self.base.precision[1] if self.base.precision else None)
        return d


class ModelSlots:
    """Every endpoint's Slot (endpoints naming the same spec share one) and the bases they load onto."""

    def __init__(self, quantize: str, trust_remote_code: bool, load_retry_s: float, metrics: "Metrics",
                 max_memory_gb: float = 8.0, stacked_lora: bool = True):
        self.quantize, self.trust_remote_code, self.load_retry_s = quantize, trust_remote_code, load_retry_s
        self.max_memory_gb, self.stacked_lora = max_memory_gb, stacked_lora
        self.metrics = metrics
        self.slots: dict[str, Slot] = {}
        self.bases: dict[str, Base] = {}
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")

    def slot(self, spec: str) -> Slot:
        return self.slots.setdefault(spec, Slot(spec, self))

    def loaded_models(self) -> int:
        return len(self.bases)

    def load(self, slot: Slot) -> None:
        """On the loader thread: resolve the spec, load its base once, attach its adapter by name."""
        from common import load_model, load_tokenizer
        from models import align_special_tokens, resolve_model

        spec = slot.spec
        p = Path(spec)
        looks_local = p.is_absolute() or spec.startswith(".") or Path(spec.split("/")[0]).is_dir()
        if "/" in spec and looks_local and not p.exists():
            # e.g. runs/creditmix_kd before KD was trained: say so instead of asking the hub for "runs/creditmix_kd"
            raise UserError(f"{p.resolve()} does not exist (train that run first, or point the endpoint's "
                            f"MODEL_* variable elsewhere)")
        ms = resolve_model(spec)
        precision = self.precision_for(ms)
        key = f"{ms.base}|{precision[0]}"
        base = self.bases.get(key)
        if base is None:
            model, tok, _ = load_model(ms.base, trust_remote_code=self.trust_remote_code, precision=precision)
            base = Base(key, model, tok, precision=precision)
            base.tokenizers[tokenizer_fingerprint(tok)] = tok
            install_hooks(model, self.stacked_lora)
            self.bases[key] = base
        tok = base.tok
        if ms.adapter:
            tok = load_tokenizer(ms, self.trust_remote_code)
            align_special_tokens(tok)
            tok = base.tokenizers.setdefault(tokenizer_fingerprint(tok), tok)
            name = base.adapters.get(str(Path(ms.adapter).resolve()))
            if name is None:
                name = self.attach(base, ms.adapter)
            slot.adapter = name
        slot.base, slot.tok, slot.ms = base, tok, ms

    def precision_for(self, ms) -> tuple[str, str]:
        """The precision rule of the scripts (precision.choose_precision: an adapter on the base precision it was
        trained on, a base in bf16 where it fits MAX_MEMORY_GB), with one exception so endpoints keep sharing one copy
        of a base (one batch across adapters): under QUANTIZE=auto a base endpoint takes the precision of a copy
        already loaded, else of an endpoint whose adapter is on that base."""
        from models import resolve_model
        from precision import decide_precision
        if ms.adapter or self.quantize != "auto":
            return decide_precision(ms, self.quantize, max_memory_gb=self.max_memory_gb)
        for key, base in self.bases.items():
            if key.rsplit("|", 1)[0] == ms.base and base.precision:
                return base.precision[0], f"shares the copy loaded for its adapters ({base.precision[1]})"
        for spec in self.slots:
            try:
                other = resolve_model(spec)
            except Exception:  # that endpoint's own load reports it
                continue
            if other.adapter and other.base == ms.base:
                p = decide_precision(other, self.quantize, max_memory_gb=self.max_memory_gb)
                return p[0], f"shares one copy with the adapter of {spec} ({p[1]})"
        return decide_precision(ms, self.quantize, max_memory_gb=self.max_memory_gb)

    def attach(self, base: Base, adapter_dir: str) -> str:
        """Attach a LoRA run to the shared base under a new name (PEFT load_adapter); no batch runs meanwhile."""
        from peft import PeftModel
        name = f"adapter{len(base.adapters)}"  # PEFT names become module keys: no dots or slashes from paths
        with base.lock.write():
            try:
                if not base.adapters:
                    base.model = PeftModel.from_pretrained(base.model, adapter_dir, adapter_name=name)
                else:
                    base.model.load_adapter(adapter_dir, adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise UserError(f"cannot load the adapter in {adapter_dir}: {str(e).splitlines()[0][:200]}") from None
            base.model.eval()
            install_hooks(base.model, self.stacked_lora)
            base.adapters[str(Path(adapter_dir).resolve())] = name
        log.info("attached %s to %s as %s", adapter_dir, base.key.split("|")[0], name)
        return name

    def close(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# lanes: micro-batching onto one inference thread per (task, base)

@dataclass
class Job:
    items: list
    tokens: int
    fut: asyncio.Future


class Lane:
    """Gather the items of concurrent requests for up to `wait_s` (or `max_batch` items, or `max_tokens` tokens),
    run them as one call of `run(items, cancel) -> results` on this lane's own thread, hand each request its slice.
    A request's items stay together in one batch. A batch whose requests have all gone is cancelled mid-run."""

    def __init__(self, name: str, task: str, run: Callable[[list], list], max_batch: int, max_tokens: int,
                 wait_s: float, max_queue: int, stopping: threading.Event, metrics: "Metrics",
                 on_batch: Callable[[list], None]):
        self.name, self.kind, self.run, self.max_batch, self.max_tokens = name, task, run, max_batch, max_tokens
        self.wait_s, self.max_queue, self.stopping, self.metrics, self.on_batch = wait_s, max_queue, stopping, \
            metrics, on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lane-{name}")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.waiting = 0  # items queued, not yet taken into a batch

    def submit(self, items: list, tokens: int, batched: bool = True) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self.waiting + len(items) > self.max_queue:
            raise ApiError(503, f"server busy: {self.waiting} items are waiting for this model's {self.kind} batches "
                                f"(MAX_QUEUE={self.max_queue}); retry shortly", {"Retry-After": "1"})
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._worker())
        fut = loop.create_future()
        self.queue.put_nowait((Job(items, tokens, fut), batched))
        self.waiting += len(items)
        return fut

    async def _next(self, timeout: float | None):
        item = await self.queue.get() if timeout is None else await _get_within(self.queue, timeout)
        if item is not None:
            self.waiting -= len(item[0].items)
        return item

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        held = None
        while True:
            first, batched = held or await self._next(None)
            held = None
            batch, n, tok = [first], len(first.items), first.tokens
            deadline = loop.time() + self.wait_s
            while batched and n < self.max_batch and tok < self.max_tokens:
                nxt = await self._next(max(0.0, deadline - loop.time()))
                if nxt is None:
                    break
                if not nxt[1] or n + len(nxt[0].items) > self.max_batch or tok + nxt[0].tokens > self.max_tokens:
                    held = nxt  # starts the next batch
                    break
                batch.append(nxt[0])
                n, tok = n + len(nxt[0].items), tok + nxt[0].tokens
            live = [j for j in batch if not j.fut.done()]  # cancelled: the client left
            if not live:
                continue
            flat = [x for j in live for x in j.items]
            self.on_batch(flat)
            self.metrics.lane_batch.labels(self.kind).observe(len(flat))
            cancel = threading.Event()

            def gone(_f, live=live, cancel=cancel):
                if all(j.fut.cancelled() for j in live):
                    cancel.set()

            for j in live:
                j.fut.add_done_callback(gone)
            try:
                out = await loop.run_in_executor(self.executor, self._call, flat, cancel)
            except Exception as e:
                if isinstance(e, Cancelled):
                    self.metrics.cancelled.labels(self.kind).inc()
                for j in live:
                    if not j.fut.done():
                        j.fut.set_exception(e)
                continue
            i = 0
            for j in live:
                if not j.fut.done():
                    j.fut.set_result(out[i:i + len(j.items)])
                i += len(j.items)

    def _call(self, flat: list, cancel: threading.Event) -> list:
        if self.stopping.is_set():
            raise Cancelled()
        stop_too = _Either(cancel, self.stopping)
        with model_call(cancel=stop_too):
            return self.run(flat)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)


class _Either:
    """is_set() of either event (the batch's own cancel flag or the server's stop flag)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


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


async def _until_disconnect(request) -> None:
    # Once the body is read, uvicorn's receive() blocks until the client disconnects (or the response is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_unless_gone(request, fut: asyncio.Future, stopping: asyncio.Event | None = None):
    """The result of `fut`; ClientGone (with `fut` cancelled, so its batch skips or stops it) if the client hangs
    up; a 503 if the server starts stopping first."""
    watchers = {asyncio.ensure_future(_until_disconnect(request))}
    stop = asyncio.ensure_future(stopping.wait()) if stopping is not None else None
    if stop is not None:
        watchers.add(stop)
    try:
        done, _ = await asyncio.wait({fut} | watchers, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    finally:
        for w in watchers:
            w.cancel()
    if fut in done:
        return fut.result()
    fut.cancel()
    if stop is not None and stop in done:
        raise ApiError(503, "the server is shutting down; retry (on another instance)", {"Retry-After": "5"})
    raise ClientGone


# ----------------------------------------------------------------------------------------------------------------
# metrics and the admission gate

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
        self.lane_batch = Histogram("serve_lane_batch_size", "items per batch of a lane (one task on one base; "
                                    "the CreditMix endpoints of one base share a lane)", ["lane_task"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.cancelled = Counter("serve_batches_cancelled", "batches stopped mid-run: every client left, or the "
                                 "server is stopping", ["lane_task"], registry=r)
        self.items = Counter("serve_items", "feature strings / prompts / documents processed", ["endpoint"],
                             registry=r)
        self.disconnects = Counter("serve_client_disconnects", "requests whose client left before the answer",
                                   ["endpoint"], registry=r)
        self.loads = Counter("serve_model_loads", "completed model loads", ["model"], registry=r)
        self.load_failures = Counter("serve_model_load_failures", "failed model loads", ["model"], registry=r)
        self.loaded = Gauge("serve_models_loaded", "base models in memory (adapters share them)", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def bearer_token(header: bytes) -> bytes | None:
    """The token of an 'Authorization: Bearer <token>' header; the scheme is case-insensitive (RFC 9110 11.1)."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class Gate:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which interferes with disconnect detection): request metrics,
    bearer-token auth when api_key is set, and a cap on the request body (read here, then replayed to the app)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics, known_paths: set[str]):
        self.app, self.max_body_bytes, self.metrics, self.known = app, max_body_bytes, metrics, known_paths
        self.expected = api_key.encode() if api_key else None

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
        openai = path.startswith("/v1/")
        if self.expected is not None and path != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            token = bearer_token(got)
            if token is None or not hmac.compare_digest(token, self.expected):
                why = "missing" if not got else "invalid"
                resp = error_response(401, f"{why} API key: send the header 'Authorization: Bearer <API_KEY>'",
                                      {"WWW-Authenticate": "Bearer"}, openai=openai)
                return await resp(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                resp = error_response(413, f"request body over {self.max_body_bytes} bytes (MAX_BODY_BYTES): send "
                                           "fewer or shorter items per request", openai=openai)
                return await resp(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
