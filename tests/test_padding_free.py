"""--padding_free (training.py, sft_train.py): a micro-batch's rows concatenated into one sequence give the padded
batch's loss and LoRA gradients, rows never attend to each other, the run records it, and the trainers that cannot
take it refuse it."""
import json

import pytest
import torch

import common
import sft_train
import training
from conftest import exits_2, nonzero_lora_b


def _rows(n=4):
    """Rows of different lengths (the padded batch pads all but the longest)."""
    return [{"input": "Customer: " + ", ".join(f"F{k}: {k * 7}" for k in range(2 + 3 * i)), "output": ["Good", "Bad",
             "Standard", "Good"][i % 4]} for i in range(n)]


def _trainer(tiny_model_dir, tmp_path, padding_free: bool):
    from trl import SFTConfig, SFTTrainer
    args = sft_train.parse_args(["--student", str(tiny_model_dir), "--data", "unused.jsonl", "--save_dir",
                                 str(tmp_path / f"pf{int(padding_free)}"), "--per_device_train_batch_size", "4",
                                 "--lora_dropout", "0", "--report_to", "none"]
                                + (["--padding_free"] if padding_free else []))
    torch.manual_seed(0)
    model, tok, _ = common.load_student(str(tiny_model_dir), quantize="none", lora_dropout=0.0)
    nonzero_lora_b(model)
    dataset, _ = training.encode_rows(tok, _rows(), "input", "output", 512)
    trainer = SFTTrainer(model=model, args=training.trl_config(SFTConfig, training.trl_kwargs(args, args.save_dir)),
                         train_dataset=dataset, processing_class=tok)
    return trainer, dataset


def _loss_and_grads(trainer, rows):
    from compat import prepare_inputs
    model = trainer.model.train()
    batch = prepare_inputs(trainer, trainer.data_collator(rows))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return batch, loss.detach(), grads


def test_padding_free_batch_gives_the_padded_loss_and_lora_gradients(tiny_model_dir, tmp_path):
    padded, ds = _trainer(tiny_model_dir, tmp_path, padding_free=False)
    free, _ = _trainer(tiny_model_dir, tmp_path, padding_free=True)
    rows = [ds[i] for i in range(len(ds))]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) == len(rows)  # different lengths: the padded batch has padding
    b0, loss0, g0 = _loss_and_grads(padded, rows)
    b1, loss1, g1 = _loss_and_grads(free, rows)
    assert b0["input_ids"].shape == (4, max(lengths)) and "attention_mask" in b0
    assert b1["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in b1  # one row, nothing padded
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(tiny_model_dir, implementation):
    """Each row's logits in a packed sequence (TRL's padding-free collator: position_ids restarting per row, no
    attention mask) equal that row's logits alone: transformers detects the packing from position_ids and masks
    attention across rows. The same sequence with a plain causal mask (rows seeing the rows before them) differs,
    so the comparison can fail. use_cache=False, as in training (common.prepare_for_training): with a cache,
    transformers does not look for packed rows."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=implementation).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        causal = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
        alone = [model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]
    start = 0
    for r, logits in zip(rows, alone):
        torch.testing.assert_close(packed[start:start + len(r)], logits, rtol=1e-5, atol=1e-5)
        start += len(r)
    assert not torch.allclose(causal[5:14], alone[1], atol=1e-3)  # attending across rows would show


def _argv(tiny_model_dir, creditmix_dir, run):
    return ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
            "--save_dir", str(run), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--lr", "1e-3", "--lora_dropout", "0", "--logging_steps", "1",
            "--report_to", "none"]


def test_sft_train_padding_free_end_to_end_matches_padded(tmp_path, tiny_model_dir, creditmix_dir, capsys):
    """Same seed, same rows: the padding-free run trains to the padded run's loss, counts the same real tokens
    (no padding counted, and none of the rows' own <|im_end|> tokens, which are the pad token, left out) and
    records the flag in run.json."""
    sft_train.main(sft_train.parse_args(_argv(tiny_model_dir, creditmix_dir, tmp_path / "padded")))
    capsys.readouterr()
    sft_train.main(sft_train.parse_args(_argv(tiny_model_dir, creditmix_dir, tmp_path / "free") + ["--padding_free"]))
    assert "--padding_free with sdpa attention" in capsys.readouterr().err  # what it costs there, said
    padded, free = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("padded", "free"))
    assert free["args"]["padding_free"] is True and padded["args"]["padding_free"] is False
    assert free["metrics"]["train_steps"] == 2
    assert free["metrics"]["tokens_seen"] == padded["metrics"]["tokens_seen"] > 0
    assert free["metrics"]["train_loss"] == pytest.approx(padded["metrics"]["train_loss"], rel=1e-4)


def test_memory_probe_runs_on_a_padding_free_batch(tiny_model_dir, tmp_path):
    """--max_memory_gb's probe (training.probe_step, CUDA only in a run) collates the longest rows with the
    trainer's own collator: padding-free there too, and it leaves no gradients behind."""
    free, ds = _trainer(tiny_model_dir, tmp_path, padding_free=True)
    seen = []
    free.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    training.probe_step(free, [ds[0], ds[1]])
    assert seen == [(1, len(ds[0]["input_ids"]) + len(ds[1]["input_ids"]))]
    assert all(p.grad is None for p in free.model.parameters())


@pytest.mark.parametrize("script,data", [("kd_train", "creditmix_kd.jsonl"), ("dpo_train", "creditmix_dpo.jsonl")])
def test_trainers_without_padding_free_refuse_it(tmp_path, creditmix_dir, capsys, script, data):
    import importlib
    mod = importlib.import_module(script)
    args = mod.parse_args(["--data", str(creditmix_dir / data), "--save_dir", str(tmp_path / "r"), "--padding_free"])
    err = exits_2(lambda: mod.main(args), capsys)
    assert "--padding_free" in err and f"run {script}.py without it" in err
    assert not (tmp_path / "r").exists()
