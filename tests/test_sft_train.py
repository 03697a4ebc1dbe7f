import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

import common
import fileio
import models
import run_record
import sft_train
import training
from fileio import UserError
from conftest import exits_2


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


class KillAfterFirstCheckpoint(TrainerCallback):
    """Kills training right after its first checkpoint is saved."""

    def on_save(self, args, state, control, **kw):
        raise Killed()


def test_resume_continues_from_checkpoint(tmp_path, tiny_model_dir, creditmix_dir, monkeypatch):
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
            "--save_dir", str(tmp_path / "run"), "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    real = training.log_callbacks
    monkeypatch.setattr(sft_train, "log_callbacks", lambda d: real(d) + [KillAfterFirstCheckpoint()])
    with pytest.raises(Killed):
        sft_train.main(sft_train.parse_args(argv))
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(UserError, match="training did not finish"):
        models.resolve_model(str(tmp_path / "run"))

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


# ----------------------------------------------------------------------------------------------------------------
# a run directory is complete or refused



def sft_argv(tiny_model_dir, creditmix_dir, run, steps):
    return ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
            "--save_dir", str(run), "--max_steps", str(steps), "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--lr", "1e-3"]


def infer(run):
    import infer_creditmix
    return infer_creditmix.main(infer_creditmix.parse_args(["--model_dir", str(run), "--features", "Age: 30"]))


def test_run_json_records_the_adapter_digest(tiny_sft_run):
    run = json.loads((tiny_sft_run / "run.json").read_text())
    assert run["adapter_sha256"] == {"adapter_model.safetensors":
                                     fileio.sha256_file(tiny_sft_run / "adapter_model.safetensors")}
    assert not list(tiny_sft_run.glob(".final-*"))  # the temporary folder of the final save is gone


def test_resumed_run_killed_during_final_save_keeps_the_finished_run(tmp_path, tiny_model_dir, creditmix_dir,
                                                                     monkeypatch):
    run = tmp_path / "run"
    sft_train.main(sft_train.parse_args(sft_argv(tiny_model_dir, creditmix_dir, run, 2)))
    weights = (run / "adapter_model.safetensors").read_bytes()

    def killed():
        raise Killed()

    real = run_record.library_versions
    monkeypatch.setattr(run_record, "library_versions", killed)  # dies while the final save writes run.json
    with pytest.raises(Killed):
        sft_train.main(sft_train.parse_args(sft_argv(tiny_model_dir, creditmix_dir, run, 4) + ["--resume"]))
    monkeypatch.setattr(run_record, "library_versions", real)
    # the run dir still is the finished 2-step run: its weights are the ones its run.json describes
    assert json.loads((run / "run.json").read_text())["metrics"]["train_steps"] == 2
    assert (run / "adapter_model.safetensors").read_bytes() == weights
    assert models.resolve_model(str(run)).adapter == str(run)
    # and resuming again finishes (from checkpoint-4, which the killed run had saved)
    assert sft_train.main(sft_train.parse_args(sft_argv(tiny_model_dir, creditmix_dir, run, 4) + ["--resume"])
                          )["train_steps"] >= 4
    assert (run / "adapter_model.safetensors").read_bytes() != weights
    assert models.resolve_model(str(run)).adapter == str(run)


def test_run_killed_while_moving_the_final_save_into_place_is_refused(tmp_path, tiny_model_dir, creditmix_dir,
                                                                      monkeypatch, capsys):
    import os
    run = tmp_path / "run"
    real = os.replace

    def replace(src, dst):  # the kill comes after the weights moved, before run.json did
        if Path(dst) == run / "run.json":
            raise Killed()
        return real(src, dst)

    monkeypatch.setattr(run_record.os, "replace", replace)
    with pytest.raises(Killed):
        sft_train.main(sft_train.parse_args(sft_argv(tiny_model_dir, creditmix_dir, run, 2)))
    monkeypatch.setattr(run_record.os, "replace", real)
    assert (run / "adapter_model.safetensors").is_file() and not (run / "run.json").exists()
    line = exits_2(lambda: infer(run), capsys)
    assert f"{run}: no run.json: the run's final save did not finish" in line and "--resume" in line


def test_weights_that_do_not_match_run_json_are_refused(tmp_path, tiny_sft_run, capsys):
    import shutil

    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    shutil.copytree(tiny_sft_run, run)
    infer(run)  # the finished run loads
    capsys.readouterr()
    w = run / "adapter_model.safetensors"
    tensors = load_file(w)
    save_file({k: v + 1 for k, v in tensors.items()}, w)  # other weights beside the old run.json
    line = exits_2(lambda: infer(run), capsys)
    assert f"{w} does not match the sha256 in {run / 'run.json'}" in line
    w.write_bytes(w.read_bytes()[:1000])  # truncated
    assert "does not match the sha256" in exits_2(lambda: infer(run), capsys)


def test_truncated_weights_of_a_bare_adapter_are_one_line(tmp_path, tiny_sft_run, capsys):
    bare = tmp_path / "adapter"  # a copied adapter folder: no run.json, no traces of training
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((tiny_sft_run / name).read_bytes())
    common.load_model(str(bare))
    w = bare / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    line = exits_2(lambda: common.load_model(str(bare)), capsys)
    assert f"cannot load the adapter in {bare}: SafetensorError" in line


@pytest.mark.parametrize("script, data", [("sft_train", "creditmix_sft.jsonl"), ("kd_train", "creditmix_kd.jsonl"),
                                          ("dpo_train", "creditmix_dpo.jsonl")])
@pytest.mark.parametrize("blocked", ["file", "read_only"])
def test_unwritable_save_dir_fails_before_the_model_loads(tmp_path, tiny_model_dir, creditmix_dir, monkeypatch,
                                                          capsys, script, data, blocked):
    import importlib

    from test_common import read_only_dir
    mod = importlib.import_module(script)
    if blocked == "file":
        save_dir = tmp_path / "run"
        save_dir.write_text("not a folder")
        message = f"--save_dir {save_dir} is a file, not a folder"
    else:
        save_dir = read_only_dir(tmp_path) / "run"
        message = f"--save_dir {save_dir}: cannot write in"

    def no_load(*a, **kw):
        raise AssertionError("the model loaded before the output path was checked")

    for name in ("load_student", "load_model", "read_records", "read_pairs"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, no_load)
    line = exits_2(lambda: mod.main(mod.parse_args(["--student", str(tiny_model_dir), "--data",
                                                    str(creditmix_dir / data), "--save_dir", str(save_dir)])), capsys)
    assert message in line


def test_adapter_config_names_a_base_another_machine_can_resolve(tmp_path, tiny_model_dir, creditmix_dir):
    """A base loaded by hub id (here from a local hub cache, offline) is recorded by that id in adapter_config.json,
    run.json keeps the local path, and plain PEFT (AutoPeftModelForCausalLM) and the project's loader load a copy of
    the adapter elsewhere, from the base's hub id."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    cache, rev = tmp_path / "hub", "0" * 40
    repo = cache / "models--someorg--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    argv = sft_argv(tiny_model_dir, creditmix_dir, run, 1)
    argv[1] = "someorg/tiny-llama"
    code = f"""
import shutil, sys
import common, sft_train
from peft import AutoPeftModelForCausalLM
sft_train.main(sft_train.parse_args({argv!r}))
import pathlib
pathlib.Path({str(elsewhere)!r}).mkdir()
for name in ("adapter_config.json", "adapter_model.safetensors"):
    shutil.copy(pathlib.Path({str(run)!r}) / name, {str(elsewhere)!r})
AutoPeftModelForCausalLM.from_pretrained({str(elsewhere)!r})
model, tok, ms = common.load_model({str(elsewhere)!r})
print("LOADED", ms.base_spec)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED someorg/tiny-llama" in r.stdout
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "someorg/tiny-llama"
    rec = json.loads((run / "run.json").read_text())
    assert rec["base_model"] == "someorg/tiny-llama" and rec["base_model_path"] == str(repo / "snapshots" / rev)


def test_local_folder_base_keeps_its_path(tiny_sft_run, tiny_model_dir):
    cfg = json.loads((tiny_sft_run / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert json.loads((tiny_sft_run / "run.json").read_text())["base_model_path"] == str(tiny_model_dir)


def test_embedded_base_is_recorded_as_its_alias(tmp_path, tiny_model_dir, creditmix_dir, monkeypatch):
    """A run on smollm2-135m names `smollm2-135m` in adapter_config.json (not this machine's cache path), so a
    copy of the adapter alone loads anywhere the project is installed, and PEFT loads it on that base. (The tiny
    model stands in for the embedded one's cache folder.)"""
    import shutil

    from peft import PeftModel
    monkeypatch.setattr(models, "embedded_model_dir", lambda: tiny_model_dir)
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    argv = sft_argv(tiny_model_dir, creditmix_dir, run, 1)
    argv[1] = "smollm2-135m"
    sft_train.main(sft_train.parse_args(argv))
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    rec = json.loads((run / "run.json").read_text())
    assert rec["base_model"] == "smollm2-135m" and rec["base_model_path"] == str(tiny_model_dir)
    elsewhere.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, elsewhere)
    model, _, ms = common.load_model(str(elsewhere))
    assert ms.base_spec == "smollm2-135m" and ms.base == str(tiny_model_dir)
    base, _, _ = common.load_model("smollm2-135m")
    assert type(PeftModel.from_pretrained(base, str(elsewhere))).__name__.startswith("Peft")
