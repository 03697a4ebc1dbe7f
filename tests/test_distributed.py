"""Data-parallel training: two CPU processes (gloo) against one, same effective batch. On CPUs, accelerate's own
launcher needs MPI for several processes, so the test starts them with torchrun, which sets the same environment
(RANK, WORLD_SIZE, LOCAL_RANK) that `accelerate launch --num_processes N` sets on GPUs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_train(flags: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """sft_train.py in one process, or in nproc under torchrun, sharing the tests' cache of the embedded model."""
    env = {**os.environ,
           "DISTILL_SLM_CACHE": os.environ.get("DISTILL_SLM_CACHE", str(Path.home() / ".cache/distill_slm"))}
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.run([*launch, "sft_train.py", *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def test_two_processes_match_one(tmp_path, tiny_model_dir, creditmix_dir):
    flags = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
             "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--lora_dropout", "0", "--lr", "1e-3", "--logging_steps", "1", "--seed", "0"]
    one = sft_train([*flags, "--save_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = sft_train([*flags, "--save_dir", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # accumulation 2 over 2 processes -> 1 each: the same 4 rows per optimizer step as the single process
    assert "NOTE" not in two.stderr or "not a multiple" not in two.stderr
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["metrics"]["train_steps"] == 2 and run["world_size"] == 2
    logged = [json.loads(line)["step"] for line in open(tmp_path / "two" / "metrics.jsonl") if '"loss"' in line]
    assert logged == [1, 2]  # rank 0 alone writes the logs
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"2-process adapter differs from 1-process by {worst}"
    moved = max((a[k]).abs().max().item() for k in a if "lora_B" in k)
    assert moved > 0  # both runs really trained (LoRA B starts at zero)


def test_time_limit_stops_every_rank_at_the_same_step(tmp_path, tiny_model_dir, creditmix_dir):
    flags = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
             "--max_steps", "50", "--max_minutes", "1e-9", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "2", "--save_dir", str(tmp_path / "two")]
    two = sft_train(flags, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["metrics"]["train_steps"] == 1 and run["metrics"]["stopped_by_time_limit"]
