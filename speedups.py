"""Speed-ups of the training step that keep its arithmetic (losses and gradients equal to the plain path within
rounding: tests/test_speedups.py). Which ones run is decided once per trainer by `choose` and applied by `apply`
(training.prepare_trainer); docs/performance.md has what each bought on an H200. Imports torch: import it inside
functions.

- liger: Liger-Kernel's Triton RMSNorm, SwiGLU (SiLU x up in one kernel, SiLU recomputed in backward) and RoPE, through
  transformers' own Liger integration. Its fused linear cross-entropy stays off: TRL already fuses the LM head
  (chunked log-probs on the answer tokens) and refuses Liger's, which would replace the model's forward. CUDA only.
- compile: regional torch.compile of each decoder layer (one compiled graph reused by every layer); fuses the
  elementwise work around the 4-bit matmuls (norms, RoPE, LoRA dropout/scale/add, SiLU x up): 40% fewer kernels and
  25% less GPU time per step, though a micro-batch of one 2,048-token row stays bound by the CPU's launching. CUDA
  only; the default there. A layer dynamo cannot compile runs eagerly (suppress_errors), so a new model type
  trains, only slower.
- tiled_mlp: the MLP runs over the tokens in tiles of `TILE_TOKENS` and recomputes each tile in backward, so the
  [tokens, intermediate] tensors exist for one tile at a time (a 32,768 x 11,008 bf16 intermediate is 688 MiB, and
  the MLP holds several). Opt-in only (see `choose`).

DISTILL_SLM_KERNELS overrides the choice: "auto" (default), "none", or a comma-separated list of the names above
(bench.py --kernels sets it to measure each on its own).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys

import torch

from fileio import UserError, note

KERNELS = ("liger", "compile", "tiled_mlp")
ENV = "DISTILL_SLM_KERNELS"
DEFAULT = ("compile",)  # on CUDA under "auto": -25% GPU time per step, +1% tok/s at 2048 x 1 x 8 (CPU-bound) in one
# H200 call, +43% / +57% for KD / DPO under 8 GiB; Liger -19% (docs/performance.md)
TILE_TOKENS = 4096  # tokens per MLP tile: 4,096 x 11,008 bf16 = 86 MiB per intermediate for the 3B shape
CUDA_ONLY = ("liger", "compile")


def parse(spec: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise UserError(f"{ENV}={spec}: unknown {', '.join(unknown)}; known: auto, none, {', '.join(KERNELS)}")
    return names


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401  (imports Triton)
        return True
    except Exception:
        return False


def choose(cuda: bool, spec: str | None = None) -> tuple[str, ...]:
    """The speed-ups to apply: `spec` (default: $DISTILL_SLM_KERNELS, else "auto") filtered to what this machine runs.
    auto = DEFAULT on CUDA, nothing on a CPU. tiled_mlp is never automatic: with activation offloading it measured
    2.5x slower and 1.6 GiB larger at 16,384 tokens (its recompute's saved tensors go through the offloading hooks)."""
    spec = spec if spec is not None else os.environ.get(ENV, "auto")
    if spec.strip() == "auto":
        names = DEFAULT if cuda else ()
    else:
        names = parse(spec)
    if not cuda and any(n in CUDA_ONLY for n in names):
        note(f"{', '.join(n for n in names if n in CUDA_ONLY)}: CUDA only, off on this device")
        names = tuple(n for n in names if n not in CUDA_ONLY)
    if "liger" in names and not liger_available():
        note("liger-kernel is not installed (pip install liger-kernel): RMSNorm/SwiGLU/RoPE stay PyTorch's")
        names = tuple(n for n in names if n != "liger")
    if "compile" in names and "tiled_mlp" in names:  # the tiled MLP's nested backward breaks the compiled graph
        names = tuple(n for n in names if n != "compile")
    return names


def decoder_layers(model):
    """The decoder layers of a (PEFT-wrapped) causal LM: base.model.layers for Llama/Qwen-style models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix, base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"{type(base).__name__}: no decoder layers found (model.layers) for the speed-ups")
    return base, layers


def apply(model, names) -> tuple[str, ...]:
    """Apply the chosen speed-ups in place (idempotent); returns what was applied."""
    if not names:
        return ()
    base, layers = decoder_layers(model)
    done = getattr(base, "_distill_slm_speedups", ())
    todo = [n for n in names if n not in done]
    if "liger" in todo:
        from transformers.integrations.liger import apply_liger_kernel
        apply_liger_kernel(base, {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                  "fused_linear_cross_entropy": False})
    if "tiled_mlp" in todo:
        for layer in layers:
            tile_mlp(layer.mlp)
    if "compile" in todo:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.suppress_errors = True  # a layer dynamo cannot compile falls back to eager
        for layer in layers:
            layer.compile()  # nn.Module.compile: the same code for every layer, so one graph serves all
    base._distill_slm_speedups = tuple(done) + tuple(todo)
    return base._distill_slm_speedups


# ----------------------------------------------------------------------------------------------------------------
# tiled MLP

def tile_mlp(mlp, tile_tokens: int = TILE_TOKENS) -> None:
    """Route mlp's forward through TiledMLP (tokens flattened, `tile_tokens` at a time)."""
    if getattr(mlp, "_tiled", False):
        return
    inner = mlp.forward

    def forward(x):
        return TiledMLP.apply(inner, x, tile_tokens, *[p for p in mlp.parameters() if p.requires_grad])

    mlp.forward, mlp._tiled = forward, True


class TiledMLP(torch.autograd.Function):
    """out = mlp(x), computed tile by tile without saving the intermediates; backward recomputes each tile under
    the forward's autocast and RNG state (same LoRA-dropout masks, tiles in the same order) and backpropagates it
    at once, accumulating the weights' gradients as autograd would (the approach of DeepSpeed/ALST's TiledMLP).
    The trainable parameters are passed only so autograd knows the output depends on them."""

    @staticmethod
    def forward(ctx, fn, x, tile_tokens, *params):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ctx.fn, ctx.tile, ctx.shape = fn, tile_tokens, shape
        ctx.device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device))
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            out = torch.cat([fn(t) for t in flat.split(tile_tokens)])
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, ctx.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat)
        enabled, dtype = ctx.autocast
        saved = _rng_state(x.device)
        _set_rng_state(x.device, ctx.rng)
        try:
            for start in range(0, flat.shape[0], ctx.tile):
                t = flat[start:start + ctx.tile].detach().requires_grad_(True)
                with torch.enable_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
                    out = ctx.fn(t)
                torch.autograd.backward(out, g[start:start + ctx.tile])
                dx[start:start + ctx.tile] = t.grad
        finally:
            _set_rng_state(x.device, saved)
        return (None, dx.reshape(ctx.shape), None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs

def _why(e: BaseException) -> str:
    """The innermost exception's first line and the last frames where it was raised (a failed capture's own error
    is only 'operation failed due to a previous error during capture')."""
    import traceback
    e = _innermost(e)
    frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]} at {' <- '.join(reversed(frames[-6:]))}"


GRAPH_WARMUP = 2  # eager calls per shape before the capture: the first compiles, the second checks for syncs


class GraphedStep:
    """A training micro-step fn(**tensors) -> loss (forward and backward; the gradients accumulate into .grad)
    captured once per input shape as a CUDA graph and replayed: the step's ~9,000 kernel launches and the Python,
    dispatcher and guard work around them (about 80% of a 2,048-token micro-batch of the 3B shape on an H200, which
    is busy only ~20% of the time: bench.py --profile) become one launch. The first `warmup` calls of a shape run
    eagerly (cuBLAS workspaces, compilation), the last of them with CUDA's sync debugging set to raise, so an op that
    waits for the GPU (.item(), boolean indexing, a copy to the CPU), which a capture cannot hold, is named with
    where it is called; the next call is captured and replayed. A shape seen fewer times (an epoch's short last
    micro-batch) only ever runs eagerly.
    Every shape's graph allocates from one memory pool: the graphs never run concurrently, and what outlives a replay
    is the loss, which the caller reads before the next replay (use_cuda_graphs clones it), and the .grad tensors,
    which live outside the pool. The caller keeps every .grad of `params` allocated (zero_grad(set_to_none=False)):
    the graphs write into those tensors, so a replay refuses to run if one was replaced. CUDA only; shapes must repeat
    (rows padded to fixed lengths) for the graphs to pay. `captures` records the memory around each capture (and what
was allocated at the first call, before any step: what the warm-ups and the optimizer left is the difference)."""

    def __init__(self, fn, warmup: int = GRAPH_WARMUP, params=()):
        self.fn, self.warmup, self.graphs, self.params = fn, warmup, {}, list(params)
        self.pool = None  # one private memory pool, shared by every shape's graph
        self.side = None  # the eager warm-ups' stream: one, so its cached blocks serve every warm-up
        self.captures: list[dict] = []
        self.first_call_allocated = None

    def __call__(self, **tensors):
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        entry = self.graphs.setdefault(key, {"seen": 0})
        if self.first_call_allocated is None:  # what was allocated before any step: the model, mostly
            self.first_call_allocated = torch.cuda.memory_allocated()
        if entry["seen"] < self.warmup:
            entry["seen"] += 1
            # on a side stream, as PyTorch's CUDA-graphs notes ask (lazy per-stream state is made before the capture)
            if self.side is None:
                self.side = torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.fn(**tensors) if entry["seen"] < self.warmup else self._no_syncs(tensors)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if "graph" not in entry:
            self._capture(entry, tensors)
        for k, v in tensors.items():
            entry["static"][k].copy_(v)
        if any(p.grad is not g for p, g in zip(self.params, entry["grads"])):
            raise RuntimeError("a .grad tensor the CUDA graph writes was freed or replaced since its capture "
                               "(zero_grad(set_to_none=True)?): the graph would write into freed memory")
        entry["graph"].replay()
        return entry["out"]

    def _capture(self, entry, tensors):
        static = {k: v.clone() for k, v in tensors.items()}
        # The eager warm-ups' freed blocks stay cached for the stream they ran on, where neither this stream nor the
        # graph's private pool can use them, and during a capture the allocator does not release cached blocks to
        # retry an allocation (cudaFree would break the capture): under a memory cap (--max_memory_gb) the capture
        # would run out of memory that eager training has. Give them back to the driver first.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:  # records the kernels; nothing runs until replay. thread_local: other threads' CUDA calls are legal
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.fn(**static)
        except RuntimeError as e:
            if isinstance(_innermost(e), torch.OutOfMemoryError):
                raise torch.OutOfMemoryError(f"CUDA graph capture ran out of memory ({_why(e)}); "
                                             f"{_gib(before[0])} GiB were allocated before it") from e
            raise RuntimeError(f"CUDA graph capture failed: {_why(e)}") from e
        entry.update(graph=graph, static=static, out=out, grads=[p.grad for p in self.params])
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        self.captures.append({"shapes": shapes, "allocated_at_first_step_gib": _gib(self.first_call_allocated),
                              "allocated_before_gib": _gib(before[0]),
                              "reserved_before_gib": _gib(before[1]),
                              "allocated_after_gib": _gib(torch.cuda.memory_allocated()),
                              "reserved_after_gib": _gib(torch.cuda.memory_reserved())})
        print(f"CUDA graph captured for {shapes}: GPU memory allocated {_gib(before[0])} -> "
              f"{_gib(torch.cuda.memory_allocated())} GiB", file=sys.stderr, flush=True)

    def _no_syncs(self, tensors):
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self.fn(**tensors)
        except RuntimeError as e:
            raise RuntimeError(f"this step cannot be captured as a CUDA graph: {_why(e)}") from e
        finally:
            torch.cuda.set_sync_debug_mode(prev)


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs in the SFT trainer (sft_train.py --cuda_graphs)

GRAPH_ATTENTION = ("sdpa", "eager")  # attention implementations that take the ready 4-D mask below


def ready_causal_mask(attention_mask, implementation: str, dtype):
    """The 4-D mask [batch, 1, query, key] that transformers would build from a 2-D padding mask: causal and over the
    real keys; bool (True = attend) for SDPA, additive (0 / dtype's minimum) for eager attention. transformers takes
    a 4-D mask as given. Why ready: its is_tracing() counts a CUDA stream capture as tracing, so while a step is
    captured it skips the checks it makes eagerly (no mask at all when nothing is padded, which itself waits for the
    GPU) and builds another mask, which the compiled decoder layers were not compiled for: they would recompile
    inside the capture. With this mask the warm-up and the capture take the same path."""
    n = attention_mask.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril() & \
        attention_mask.bool()[:, None, None, :]
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


CAUSAL_SDPA = "sdpa_causal"


@contextlib.contextmanager
def causal_sdpa(config):
    """The model's attention as SDPA with is_causal and no mask, for a micro-batch with nothing padded: SDPA then
    runs its flash-attention kernel, which takes no mask (with the ready 4-D mask it runs the memory-efficient one:
    33% of a captured 4 x 2,048-token step of the 3B shape on an H200, bench.py --profile). transformers makes that
    choice itself only when it is not tracing, and it counts a CUDA graph capture as tracing (ready_causal_mask).
    Registered as its own implementation with transformers' AttentionInterface and no mask function, for which
    create_causal_mask builds no mask; set on the config for the forward only (compiled layers recompile once for
    it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if CAUSAL_SDPA not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(CAUSAL_SDPA, sdpa_attention_forward)
    before = config._attn_implementation
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before


class HiddenStateOffload(torch.autograd.graph.saved_tensors_hooks):
    """--cuda_graphs --activation_offloading: the [batch, tokens, hidden] tensors the forward pass saves for the
    backward pass (with gradient checkpointing: each decoder layer's input, which is all the checkpoints keep, and the
    final norm's) go to host memory and come back when the backward pass needs them, as Unsloth's offloaded
    checkpointing does. 2048 tokens of the 3B shape: 36 x 8 MiB. A captured step can hold such copies where TRL's
    activation offloading cannot (it allocates pinned memory per tensor, on its own streams, with events the CPU
    waits on): here the copies run on the step's own stream into page-locked buffers allocated once per input shape,
    in the eager warm-ups, and reused in the same order by every step and replay of that shape, so the capture records
    only the copies. On the same stream they do not overlap the compute: they cost their PCIe time. Tensors that are
    not hidden states (masks, rotary tables, logits) stay where they are."""

    def __init__(self, hidden_size: int):
        self.hidden, self.buffers, self.slots, self.i, self.shape = hidden_size, {}, [], 0, None
        super().__init__(self.pack, self.unpack)

    def step(self, key: tuple):
        """Before a micro-step's forward pass on input_ids of shape `key`: that shape's buffers, from the first."""
        self.slots, self.i, self.shape = self.buffers.setdefault(key, []), 0, (*key, self.hidden)
        return self

    def pack(self, t):
        if tuple(t.shape) != self.shape or not t.is_floating_point() or isinstance(t, torch.nn.Parameter):
            return t
        if self.i == len(self.slots):
            if t.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("activation offloading: a tensor to offload that the warm-ups did not have")
            self.slots.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda))
        buf = self.slots[self.i]
        self.i += 1
        buf.copy_(t, non_blocking=True)
        return buf, t.device

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        buf, device = packed
        return buf.to(device, non_blocking=True, copy=True)

    def offloaded_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for slots in self.buffers.values() for b in slots)


def sft_micro_step(model, bf16: bool, offload: bool = False):
    """fn(input_ids, attention_mask, labels, divisor) -> detached loss: SFTTrainer's micro-step (its compute_loss and
    Trainer's training_step) with nothing in it that waits for the GPU, so it can be captured: TRL's fused LM head
    over every position (no boolean indexing), loss = summed answer-token NLL / divisor (compat.sft_loss_divisor: a
    tensor, so the accumulated batch's token count can change between replays), backward inside. Runs eagerly as
    well (the CPU tests compare it with SFTTrainer.training_step). bf16: the trainer's autocast; the weight-cast
    cache is off in any case, as a capture requires (PyTorch's CUDA-graphs notes; accelerate's autocast around the
    model's forward inherits the setting). offload: the forward pass's saved hidden states in host memory
    (HiddenStateOffload, as micro.offload)."""
    from compat import scoring_every_position
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    dtype = model.get_input_embeddings().weight.dtype
    offloader = HiddenStateOffload(model.config.hidden_size) if offload else None

    def micro(input_ids, labels, divisor, attention_mask=None):
        causal = attention_mask is None and implementation == "sdpa"  # nothing padded: SDPA's is_causal, no mask
        mask = None if causal else ready_causal_mask(
            torch.ones_like(input_ids) if attention_mask is None else attention_mask, implementation, dtype)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False), \
                scoring_every_position(), causal_sdpa(model.config) if causal else contextlib.nullcontext(), \
                offloader.step(tuple(input_ids.shape)) if offloader else contextlib.nullcontext():
            out = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
        loss = -out.log_probs.sum() / divisor  # as TRL's compute_loss: outside the autocast
        loss.backward()
        return loss.detach()

    micro.offload = offloader
    return micro


class GraphedTrainingStep:
    """Stands in for trainer.training_step(model, inputs, num_items_in_batch): sft_micro_step, through a GraphedStep
    (capture=True) or eagerly; returns the detached loss Trainer's training_step returns (the same scaling) and keeps
    TRL's token count. TRL's entropy and mean_token_accuracy are not computed: each waits for the GPU."""

    def __init__(self, trainer, capture: bool, offload: bool = False):
        self.trainer = trainer
        self.micro = sft_micro_step(trainer.model, bool(trainer.args.bf16), offload=offload)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.graphed = GraphedStep(self.micro, params=params) if capture else None
        self.eager_after = None  # why the graphs gave way to eager micro-steps (a capture that ran out of memory)
        self.dropped_captures: list[dict] = []

    def tensors(self, inputs: dict, num_items_in_batch=None) -> dict:
        """The micro-step's inputs from a prepared batch; no attention mask where nothing is padded (its own graph:
        causal_sdpa). Telling which waits for the GPU once per micro-step, outside the captured step."""
        from compat import sft_loss_divisor
        ids, labels = inputs["input_ids"], inputs["labels"]
        attention = inputs.get("attention_mask")
        out = dict(input_ids=ids, labels=labels, divisor=sft_loss_divisor(self.trainer, labels, num_items_in_batch))
        if attention is not None and not bool(attention.all()):
            out["attention_mask"] = attention
        return out

    def __call__(self, model, inputs, num_items_in_batch=None):
        from compat import count_sft_tokens, prepare_inputs
        model.train()
        batch = self.tensors(prepare_inputs(self.trainer, inputs), num_items_in_batch)
        failed = None
        try:  # the graph's loss tensor is rewritten by the next replay (of any shape: one pool): the loop gets a copy
            loss = self.graphed(**batch).clone() if self.graphed else self.micro(**batch)
        except torch.OutOfMemoryError as e:
            if "CUDA graph capture" not in str(e):
                raise
            failed = str(e).splitlines()[0]
        if failed:  # outside the handler: the failed capture's frames, and the tensors they hold, went with it
            self.give_up_graphs(failed)
            loss = self.micro(**batch)  # the same micro-step as the warm-ups of this shape, which fitted
        mask = batch.get("attention_mask")  # none: nothing padded (tensors)
        count_sft_tokens(self.trainer, batch["input_ids"].numel() if mask is None else int(mask.sum()))
        return loss

    def give_up_graphs(self, why: str) -> None:
        """A capture ran out of memory where the eager warm-ups of its shape fitted (a graph's pool holds its
        intermediate tensors for good, which eager steps free and reuse: at 16,384 tokens of the 3B shape under 8 GiB
        only eager fits): every micro-step from here on runs eagerly, the same arithmetic and offloading, and the
        graphs and their pool are freed for it."""
        note(f"--cuda_graphs: {why}; the micro-steps run eagerly from here on (same loss, slower; a smaller "
             "--per_device_train_batch_size keeps the graphs)")
        self.dropped_captures, self.eager_after, self.graphed = self.graphed.captures, why, None
        gc.collect()
        torch.cuda.empty_cache()

    def record(self) -> dict:
        """run.json's record: each captured shape with the GPU memory around its capture, and why the step went
        eager, if it did (nothing for a step that never captured: capture=False)."""
        if self.graphed:
            return {"cuda_graph_captures": self.graphed.captures}
        return {"cuda_graph_captures": self.dropped_captures, "cuda_graphs_eager_after": self.eager_after} \
            if self.eager_after else {}


def keep_grads(model) -> None:
    """model.zero_grad() zeroes the .grad tensors in place instead of freeing them: Trainer calls model.zero_grad()
    after every optimizer step (set_to_none=True by default), and a captured step writes into the .grad tensors that
    existed when it was captured. An explicit zero_grad(set_to_none=True) still frees them (the memory probe's)."""
    model.zero_grad = functools.partial(type(model).zero_grad, model, set_to_none=False)


def use_cuda_graphs(trainer, capture: bool | None = None, offload: bool = False) -> bool:
    """--cuda_graphs: the trainer's micro-step becomes GraphedTrainingStep. capture=None: captured on CUDA; on a CPU
    one note and the trainer's own step stays (eager). capture=False: GraphedTrainingStep runs eagerly (bench.py's
    BENCH_GRAPH=0, the CPU tests). offload (--activation_offloading): the saved hidden states in host memory
    (HiddenStateOffload). Refuses what the captured step does not reproduce. True if installed."""
    if capture is None:
        if not torch.cuda.is_available():
            note("--cuda_graphs: CUDA only; this run trains eagerly")
            return False
        capture = True
    model, args = trainer.model, trainer.args
    dropout = sorted({m.p for name, m in model.named_modules() if "lora_dropout" in name
                      and isinstance(m, torch.nn.Dropout) and m.p > 0})
    if dropout:
        raise UserError(f"--cuda_graphs: the adapter has LoRA dropout {dropout[0]:g}, which a captured step does not "
                        "draw anew; train with --lora_dropout 0")
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation not in GRAPH_ATTENTION:
        raise UserError(f"--cuda_graphs: attention {implementation} is not supported (needs "
                        f"{' or '.join(GRAPH_ATTENTION)})")
    if getattr(args, "padding_free", False) or getattr(args, "loss_type", "nll") != "nll" \
            or getattr(trainer, "aux_loss_enabled", False) or trainer.compute_loss_func is not None:
        raise UserError("--cuda_graphs: only SFT's plain loss (no padding-free batches, DFT loss or MoE router loss)")
    trainer.training_step = GraphedTrainingStep(trainer, capture, offload)
    keep_grads(model)
    note("--cuda_graphs: the micro-steps run as CUDA graphs; mean_token_accuracy and entropy are not logged (each "
         "waits for the GPU, which a captured step cannot)" if capture else
         "the CUDA-graph micro-step runs eagerly; mean_token_accuracy and entropy are not logged")
    return True
