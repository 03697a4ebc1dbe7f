"""sft_train.py --cuda_graphs: the micro-step it captures (speedups.sft_micro_step through GraphedTrainingStep) gives
SFTTrainer's own loss and LoRA gradients, across accumulated micro-batches of different answer lengths; on a CPU the
flag trains eagerly and says so; what the captured step cannot do is refused in one line. The capture itself needs a
GPU: bench.py's sft_graph case compares graph and eager there (gpu/graphs.sh)."""
import argparse
import importlib
import json
import re

import pytest
import torch

import common
import compat
import fileio
import speedups
import training
from fileio import UserError
from conftest import exits_2, nonzero_lora_b

ROWS = [  # answers of 1, 5 and 14 words: the micro-batches' answer-token counts differ
    {"input": "Classify the credit mix of: Age 30, Outstanding Debt 1200.50", "output": "Good"},
    {"input": "Classify: Age 51", "output": "Standard, with a short reason"},
    {"input": "Explain the credit mix of: Age 22, Occupation Teacher, Outstanding Debt 80.00",
     "output": "Bad: the debt is high for the income, and two loans were delinquent last year so far"},
]


def _trainer(tiny_model_dir, tmp_path, dropout=0.0, attention="sdpa", pad_to=16):
    from trl import SFTConfig, SFTTrainer
    model, tok, _ = common.load_student(str(tiny_model_dir), lora_dropout=dropout)
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    torch.manual_seed(0)
    nonzero_lora_b(model)
    dataset, _ = training.encode_rows(tok, ROWS, "input", "output", 256)
    ns = argparse.Namespace(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=0)
    kw = training.trl_kwargs(ns, str(tmp_path))
    config = training.trl_config(SFTConfig, {**kw, "report_to": "none", "pad_to_multiple_of": pad_to})
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    compat.score_answer_tokens_only()  # as prepare_trainer sets it: TRL's step scores the answer tokens only
    return trainer


def _run(trainer, step, batches, num_items):
    """Each micro-step's returned loss and the accumulated LoRA gradients."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = len(batches)
    losses = [step(model, dict(b), num_items).clone() for b in batches]
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attention,counted", [("sdpa", True), ("sdpa", False), ("eager", True)])
def test_graph_micro_step_gives_sft_trainers_loss_and_gradients(tiny_model_dir, tmp_path, attention, counted):
    """Two accumulated micro-batches (2 rows padded to 16 tokens, then 1 row) with different answer lengths: each
    micro-step's loss and the summed gradients equal SFTTrainer.training_step's. counted: Trainer's
    num_items_in_batch (the accumulated batch's answer tokens); else each micro-batch's own count / accumulation."""
    trainer = _trainer(tiny_model_dir, tmp_path, attention=attention)
    ds = trainer.train_dataset
    batches = [trainer.data_collator([ds[0], ds[1]]), trainer.data_collator([ds[2]])]
    assert batches[0]["attention_mask"].eq(0).any()  # padding inside the first micro-batch
    answer_tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert abs(answer_tokens[0] - answer_tokens[1]) > 0.3 * max(answer_tokens)  # so the weighting matters
    _, num_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
    assert int(num_items) == sum(answer_tokens)
    num_items = num_items if counted else None
    trl_losses, trl_grads = _run(trainer, trainer.training_step, batches, num_items)
    tokens_before = trainer._total_train_tokens
    ours = speedups.GraphedTrainingStep(trainer, capture=False)
    our_losses, our_grads = _run(trainer, ours, batches, num_items)

    for a, b in zip(our_losses, trl_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert trl_grads.keys() == our_grads.keys() and any("lora_A" in n for n in trl_grads)
    for name in trl_grads:
        assert trl_grads[name].abs().max() > 0, name
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # TRL's num_tokens metric keeps counting the non-padding input tokens
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert trainer._total_train_tokens == tokens_before + real
    assert trainer._metrics["train"]["num_tokens"] == [trainer._total_train_tokens]


class _CaptureOutOfMemory:
    """Stands in for GraphedStep where the capture of a shape runs out of memory (as 16,384 tokens of the 3B shape
    under an 8 GiB cap do, with the eager warm-ups fitting); `raises` another error instead, once."""
    captures = [{"shapes": {"input_ids": [2, 16]}, "allocated_before_gib": 3.3}]

    def __init__(self, raises=None):
        self.calls, self.raises = 0, raises

    def __call__(self, **tensors):
        self.calls += 1
        raise self.raises or torch.OutOfMemoryError("CUDA graph capture ran out of memory (CUDA out of memory. Tried "
                                                    "to allocate 688.00 MiB); 3.3 GiB were allocated before it")


def test_a_capture_out_of_memory_trains_on_eagerly(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """When a capture runs out of memory the micro-batch still trains: the step says so in one NOTE, gives up its
    graphs and runs this and every later micro-step eagerly, with the loss and gradients of the eager step; run.json
    records why. Any other out-of-memory error is the user's to see."""
    monkeypatch.setattr(fileio, "_notes_said", set())
    trainer = _trainer(tiny_model_dir, tmp_path)
    ds = trainer.train_dataset
    batches = [trainer.data_collator([ds[0], ds[1]]), trainer.data_collator([ds[2]])]
    want_losses, want_grads = _run(trainer, speedups.GraphedTrainingStep(trainer, capture=False), batches, None)
    step = speedups.GraphedTrainingStep(trainer, capture=False)
    step.graphed = fake = _CaptureOutOfMemory()
    losses, grads = _run(trainer, step, batches, None)
    assert fake.calls == 1 and step.graphed is None  # the second micro-batch never tried a graph
    for a, b in zip(losses, want_losses):
        torch.testing.assert_close(a, b)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=name)
    err = capsys.readouterr().err
    assert "--cuda_graphs: CUDA graph capture ran out of memory" in err and "run eagerly from here on" in err
    trainer.training_step = step
    rec = training.graph_metrics(trainer)
    assert rec["cuda_graphs_eager_after"].startswith("CUDA graph capture ran out of memory")
    assert rec["cuda_graph_captures"] == _CaptureOutOfMemory.captures

    other = speedups.GraphedTrainingStep(trainer, capture=False)
    other.graphed = _CaptureOutOfMemory(raises=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 2 GiB"):
        other(trainer.model, dict(batches[0]))


def test_an_unpadded_micro_batch_runs_causal_sdpa_without_a_mask(tiny_model_dir, tmp_path, monkeypatch):
    """Nothing padded: the micro-step passes no mask and runs SDPA with is_causal (its flash kernel on a GPU), and
    still gives SFTTrainer's loss and gradients; the model's attention setting is back to sdpa afterwards."""
    trainer = _trainer(tiny_model_dir, tmp_path, pad_to=None)
    ds = trainer.train_dataset
    batches = [trainer.data_collator([ds[2]]), trainer.data_collator([ds[0]])]
    assert all(b["attention_mask"].all() for b in batches)
    _, num_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
    trl_losses, trl_grads = _run(trainer, trainer.training_step, batches, num_items)
    ours = speedups.GraphedTrainingStep(trainer, capture=False)
    assert "attention_mask" not in ours.tensors(batches[0], num_items)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    monkeypatch.setitem(AttentionInterface._global_mapping, speedups.CAUSAL_SDPA, spy)
    our_losses, our_grads = _run(trainer, ours, batches, num_items)
    assert seen and all(m is None for m in seen)
    assert trainer.model.config._attn_implementation == "sdpa"
    for a, b in zip(our_losses, trl_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_after_the_memory_probe_logs(tiny_model_dir, tmp_path):
    """--max_memory_gb's probe runs the trainer's own step (which records TRL's accuracy and entropy) before
    --cuda_graphs installs its step (which does not): the probe's metrics are gone, names included, so the logs do not
    average an empty list (a ZeroDivisionError in TRL's log at the first logging step)."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.args.logging_steps = 1
    compat.one_training_step(trainer, [trainer.train_dataset[0]])
    assert not trainer._metrics["train"]
    assert speedups.use_cuda_graphs(trainer, capture=False)
    trainer.train()
    assert any("loss" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_hidden_states_give_the_same_loss_and_gradients(tiny_model_dir, tmp_path, checkpointing):
    """--cuda_graphs --activation_offloading: the forward pass's saved [batch, tokens, hidden] tensors go to host
    buffers and come back for the backward pass. The micro-steps' losses and LoRA gradients equal the plain ones;
    with gradient checkpointing each decoder layer's input is among them; each input shape gets its buffers once
    and later steps reuse them in the same order (what a captured step replays)."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    model = trainer.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = trainer.train_dataset
    batches = [trainer.data_collator([ds[0], ds[1]]), trainer.data_collator([ds[2]])]
    _, num_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
    plain_losses, plain_grads = _run(trainer, speedups.GraphedTrainingStep(trainer, capture=False), batches, num_items)
    offloaded = speedups.GraphedTrainingStep(trainer, capture=False, offload=True)
    losses, grads = _run(trainer, offloaded, batches, num_items)
    for a, b in zip(losses, plain_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=0, msg=name)

    off = offloaded.micro.offload
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert set(off.buffers) == {tuple(b["input_ids"].shape) for b in batches}
    for key, slots in off.buffers.items():
        assert slots and all(tuple(b.shape) == (*key, hidden) for b in slots)
        assert len(slots) >= layers  # every layer's input (checkpointing) or more (each op's saved input)
    assert off.offloaded_bytes() > 0
    where = {k: [b.data_ptr() for b in v] for k, v in off.buffers.items()}
    again, _ = _run(trainer, offloaded, batches, num_items)
    assert {k: [b.data_ptr() for b in v] for k, v in off.buffers.items()} == where
    torch.testing.assert_close(again[0], losses[0], rtol=0, atol=0)


def test_the_ready_mask_is_transformers_own(tiny_model_dir):
    """sdpa: the bool mask transformers builds from a padded 2-D mask; eager: its additive form."""
    from transformers.masking_utils import sdpa_mask
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    ours = speedups.ready_causal_mask(attention, "sdpa", torch.float32)
    theirs = sdpa_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=attention.bool(),
                       allow_is_causal_skip=False)
    assert ours.shape == (2, 1, 6, 6) and torch.equal(ours, theirs.expand_as(ours))
    additive = speedups.ready_causal_mask(attention, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and torch.equal(additive == 0, ours)


def test_zero_grad_keeps_the_gradient_tensors(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[0]])
    model(**batch).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    speedups.keep_grads(model)
    model.zero_grad()  # what Trainer calls after each optimizer step
    assert all(p.grad is g and not g.any() for p, g in zip([p for p in model.parameters() if p.requires_grad], grads))
    model.zero_grad(set_to_none=True)  # the memory probe's explicit call still frees them
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)


def test_an_adapter_with_dropout_is_refused(tiny_model_dir, tmp_path):
    """A continued adapter keeps its own dropout whatever --lora_dropout says: the model is checked too."""
    trainer = _trainer(tiny_model_dir, tmp_path, dropout=0.05)
    with pytest.raises(UserError, match="LoRA dropout 0.05.*--lora_dropout 0"):
        speedups.use_cuda_graphs(trainer, capture=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_cuda_graphs_on_a_cpu_trains_eagerly_and_says_so(tiny_model_dir, creditmix_dir, tmp_path, capsys,
                                                          monkeypatch):
    import sft_train
    monkeypatch.setattr(fileio, "_notes_said", set())
    run = tmp_path / "run"
    metrics = sft_train.main(sft_train.parse_args([
        "--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"), "--save_dir",
        str(run), "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--logging_steps", "1", "--cuda_graphs", "--lora_dropout", "0", "--report_to", "none"]))
    assert "NOTE: --cuda_graphs: CUDA only; this run trains eagerly" in capsys.readouterr().err
    record = json.loads((run / "run.json").read_text())
    assert record["args"]["cuda_graphs"] is True and metrics["train_steps"] == 2 and metrics["tokens_per_s"] > 0
    assert "cuda_graphs" not in metrics["speedups"] and "cuda_graph_captures" not in metrics




def test_sft_train_runs_the_graphed_step_with_offloading_end_to_end(tiny_model_dir, creditmix_dir, tmp_path,
                                                                    monkeypatch):
    """sft_train.py --cuda_graphs --activation_offloading as on a GPU (the graphed step with host-memory hidden
    states, logging every step), its micro-steps run eagerly here: it trains, logs and records. The memory probe
    before it needs CUDA: test_training_after_the_memory_probe_logs runs it."""
    import functools
    import sft_train
    monkeypatch.setattr(speedups, "use_cuda_graphs", functools.partial(speedups.use_cuda_graphs, capture=False))
    run = tmp_path / "run"
    metrics = sft_train.main(sft_train.parse_args([
        "--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"), "--save_dir",
        str(run), "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--logging_steps", "1", "--cuda_graphs", "--activation_offloading", "--lora_dropout", "0",
        "--report_to", "none"]))
    assert metrics["train_steps"] == 3 and "cuda_graphs" in metrics["speedups"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in logged) == 3 and not any("mean_token_accuracy" in r for r in logged)
    assert (run / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("script,flags,msg", [
    ("kd_train", ["--teacher", "TINY"], "only sft_train.py runs its micro-step as a CUDA graph"),
    ("dpo_train", [], "only sft_train.py runs its micro-step as a CUDA graph"),
    ("sft_train", [], r"--cuda_graphs needs --lora_dropout 0 \(got 0.05\)"),
])
def test_what_a_captured_step_cannot_do_is_refused_in_one_line(script, flags, msg, tiny_model_dir, creditmix_dir,
                                                                 tmp_path, capsys):
    mod = importlib.import_module(script)
    data = {"sft_train": "creditmix_sft.jsonl", "kd_train": "creditmix_kd.jsonl", "dpo_train": "creditmix_dpo.jsonl"}
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / data[script]), "--save_dir",
            str(tmp_path / "run"), "--cuda_graphs"] + [str(tiny_model_dir) if f == "TINY" else f for f in flags]
    line = exits_2(lambda: mod.main(mod.parse_args(argv)), capsys)
    assert re.search(msg, line), line
    assert not (tmp_path / "run").exists()  # refused before anything loads or is written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_a_captured_step_replays_the_eager_loss_and_gradients(tiny_model_dir, tmp_path, offload):
    """On a GPU (4-bit, bf16 autocast): after two eager warm-ups and the capture, replays of other batches of the
    same shape give the eager micro-step's loss and LoRA gradients; a .grad freed since the capture is refused.
    offload: with gradient checkpointing, the layers' inputs copied to pinned host memory inside the graph."""
    trainer = _trainer(tiny_model_dir, tmp_path, pad_to=128)
    model, ds = trainer.model, trainer.train_dataset
    if offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "preserve_rng_state": False})
    speedups.keep_grads(model)
    eager = speedups.GraphedTrainingStep(trainer, capture=False)
    graphed = speedups.GraphedTrainingStep(trainer, capture=True, offload=offload)
    batches = [trainer.data_collator([ds[0], ds[1]]), trainer.data_collator([ds[2], ds[0]])]
    assert batches[0]["input_ids"].shape == batches[1]["input_ids"].shape == (2, 128)
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = 1
    for _ in range(speedups.GRAPH_WARMUP + 1):  # eager warm-ups, then the capture (and its first replay)
        model.zero_grad()
        graphed(model, dict(batches[0]))
    assert len(graphed.graphed.captures) == 1
    for b in batches:
        model.zero_grad()
        want = eager(model, dict(b))
        want_grads = {n: p.grad.clone() for n, p in lora}
        model.zero_grad()
        got = graphed(model, dict(b))
        # the same kernels on the same inputs (bench's sft_graph measured them equal); the margin covers kernels
        # that accumulate with atomics. Stale inputs or a graph writing elsewhere would be far off.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        for n, p in lora:
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-3, atol=1e-5, msg=n)
    assert len(graphed.graphed.captures) == 1  # replayed, not captured again
    if offload:
        assert graphed.micro.offload.offloaded_bytes() > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="freed or replaced since its capture"):
        graphed(model, dict(batches[0]))
