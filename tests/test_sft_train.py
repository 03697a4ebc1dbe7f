import json

import pytest

import common
import sft_train
import training
from common import UserError


def test_smoke_writes_adapter_run_json_and_logs(tiny_sft_run, tiny_model_dir):
    names = {p.name for p in tiny_sft_run.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "run.json", "metrics.jsonl", "logs"} <= names
    assert "model.safetensors" not in names  # the adapter only, never the base weights
    run = json.loads((tiny_sft_run / "run.json").read_text())
    assert run["method"] == "sft" and run["task"] == "creditmix" and run["base_model"] == str(tiny_model_dir)
    assert run["metrics"]["train_steps"] == 2 and run["data"]["sha256"]
    assert run["args"]["lr"] == 1e-3 and "transformers" in run["versions"]
    assert [json.loads(line)["step"] for line in open(tiny_sft_run / "metrics.jsonl")][:2] == [1, 2]
    model, _, ms = common.load_model(str(tiny_sft_run))
    assert ms.adapter == str(tiny_sft_run) and type(model).__name__.startswith("Peft")


class Killed(Exception):
    pass


def test_resume_continues_from_checkpoint(tmp_path, tiny_model_dir, creditmix_dir, monkeypatch):
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
            "--save_dir", str(tmp_path / "run"), "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    from transformers import TrainerCallback

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed()

    real = training.log_callbacks
    monkeypatch.setattr(sft_train, "log_callbacks", lambda d: real(d) + [KillAfterFirstCheckpoint()])
    with pytest.raises(Killed):
        sft_train.main(sft_train.parse_args(argv))
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(UserError, match="training did not finish"):
        common.resolve_model(str(tmp_path / "run"))

    monkeypatch.setattr(sft_train, "log_callbacks", real)
    metrics = sft_train.main(sft_train.parse_args(argv + ["--resume"]))
    assert metrics["train_steps"] == 4
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # the resumed run did steps 3 and 4, not 1..4 again


def test_resume_without_checkpoint_is_refused(tmp_path, tiny_model_dir, creditmix_dir):
    with pytest.raises(UserError, match="no checkpoint"):
        sft_train.main(sft_train.parse_args(["--student", str(tiny_model_dir), "--data",
                                             str(creditmix_dir / "creditmix_sft.jsonl"), "--save_dir",
                                             str(tmp_path / "r"), "--resume"]))


def test_bad_data_is_one_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "Good"}\n{"input": "y"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: missing field 'output'"):
        sft_train.main(sft_train.parse_args(["--student", str(tiny_model_dir), "--data", str(bad),
                                             "--save_dir", str(tmp_path / "r")]))
    assert not (tmp_path / "r").exists()


def test_unknown_student_is_one_clear_error(tmp_path, creditmix_dir):
    with pytest.raises(UserError, match="unknown model 'nonsense'"):
        sft_train.main(sft_train.parse_args(["--student", "nonsense", "--data",
                                             str(creditmix_dir / "creditmix_sft.jsonl"), "--save_dir",
                                             str(tmp_path / "r")]))


@pytest.mark.parametrize("script", ["sft_train", "kd_train", "dpo_train"])
def test_memory_probe_step_leaves_no_trace(tmp_path, tiny_model_dir, creditmix_dir, monkeypatch, script):
    """--max_memory_gb probes micro-batches with real training steps before train() (on CUDA): the probe must run
    with every trainer and change nothing (same adapter as without it). Forced here on the CPU."""
    import importlib

    from safetensors.torch import load_file
    mod = importlib.import_module(script)
    data = {"sft_train": "creditmix_sft.jsonl", "kd_train": "creditmix_kd.jsonl", "dpo_train": "creditmix_dpo.jsonl"}
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / data[script]), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--lr", "1e-3",
            "--lora_dropout", "0", "--logging_steps", "1"]
    if script == "kd_train":
        argv += ["--teacher", str(tiny_model_dir)]
    probed = []

    def probe_then_train(trainer, args):
        ds = trainer.train_dataset
        training.probe_step(trainer, [ds[0], ds[1]])
        probed.append(all(p.grad is None for p in trainer.model.parameters()))

    mod.main(mod.parse_args(argv + ["--save_dir", str(tmp_path / "plain")]))
    monkeypatch.setattr(training, "fit_micro_batch", probe_then_train)
    mod.main(mod.parse_args(argv + ["--save_dir", str(tmp_path / "probed")]))
    assert probed == [True]
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "probed" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_max_minutes_stops_early_and_saves(tmp_path, tiny_model_dir, creditmix_dir, capsys):
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
            "--save_dir", str(tmp_path / "run"), "--max_steps", "50", "--max_minutes", "1e-9",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    metrics = sft_train.main(sft_train.parse_args(argv))
    assert metrics["train_steps"] == 1 and metrics["stopped_by_time_limit"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert "--max_minutes 1e-09 reached: stopped at step 1 of 50" in capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["metrics"]["stopped_by_time_limit"] is True
