"""Run directories and what they record: a training run's final save lands whole (final_save_dir, commit_run_dir)
or is refused when loaded (check_run_dir); run.json says what was run, on what and how it went (write_run_json);
evaluations are filed under the run (save_eval). compare_runs.py reads both.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from fileio import UserError, read_json_object, sha256_file, write_json


# ----------------------------------------------------------------------------------------------------------------
# run directories: complete or refused

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file names
FINAL_TMP_PREFIX = ".final-"  # the temporary folder inside a run dir where training writes the final save


def adapter_digests(run_dir: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} of the adapter weights in a run dir (what run.json records and the loader checks)."""
    d = Path(run_dir)
    return {n: sha256_file(d / n) for n in ADAPTER_WEIGHTS if (d / n).is_file()}


def is_training_run(run_dir: Path) -> bool:
    """Traces only this project's trainers leave: metrics.jsonl, Trainer checkpoints, an unfinished final save."""
    return (run_dir / "metrics.jsonl").is_file() or any(run_dir.glob("checkpoint-*")) or \
        any(run_dir.glob(FINAL_TMP_PREFIX + "*"))


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run dir whose final save did not finish: a training run must hold run.json, and the adapter weights
    must match the digest run.json records. A bare adapter folder (copied or downloaded, no traces of training) is
    loaded as it is."""
    run = run_dir / "run.json"
    if not run.is_file():
        if is_training_run(run_dir):
            raise UserError(f"{run_dir}: no run.json: the run's final save did not finish; rerun the training "
                            "command with --resume")
        return
    digests = read_json_object(run).get("adapter_sha256")
    if digests is None:
        return  # a run.json written before digests were recorded
    if not isinstance(digests, dict) or not digests:
        raise UserError(f"{run}: field 'adapter_sha256' must map the adapter weight files to their sha256")
    for name, want in digests.items():
        f = run_dir / name
        if not f.is_file() or sha256_file(f) != want:
            raise UserError(f"{f} does not match the sha256 in {run} (the final save was interrupted, or the "
                            "file was changed): rerun the training command with --resume")


def commit_run_dir(tmp: Path, run_dir: Path) -> None:
    """Move a finished save from `tmp` (inside run_dir) into run_dir: the old run.json goes first, every other file
    next, the new run.json last. Killed at any point, the run dir holds either the complete old run, or the old run
    without run.json, or the new files without run.json: check_run_dir refuses the last two."""
    import shutil
    (run_dir / "run.json").unlink(missing_ok=True)
    for f in sorted(tmp.iterdir()):
        if f.name == "run.json":
            continue
        target = run_dir / f.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(f, target)
    os.replace(tmp / "run.json", run_dir / "run.json")
    tmp.rmdir()


def final_save_dir(run_dir: str | os.PathLike) -> Path:
    """A fresh temporary folder inside run_dir for the final save (leftovers of an interrupted one removed)."""
    import shutil
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob(FINAL_TMP_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=FINAL_TMP_PREFIX, dir=run_dir))


# ----------------------------------------------------------------------------------------------------------------
# run record

def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "xgrammar"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    return None


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def peak_memory_gib() -> float | None:
    import torch
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def data_record(path) -> dict:
    p = Path(path)
    return {"path": str(p), "sha256": sha256_file(p)} if p.is_file() else {"path": str(p)}


def write_run_json(save_dir, *, script: str, method: str, args, base_model: str | None, data, metrics: dict,
                   started: float, task: str | None = None, extra: dict | None = None) -> dict:
    """run.json: what was run (arguments), on what (data hash, base model, versions, commit, device), and how it
    went (metrics, wall time, peak GPU memory). compare_runs.py reads it."""
    rec = {
        "script": script, "method": method, "task": task or guess_task(data),
        "base_model": base_model, "args": vars(args) if not isinstance(args, dict) else args,
        "data": data_record(data) if data else None,
        "versions": library_versions(), "git_commit": git_commit(), "device": device_name(),
        "started": _dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 1), "peak_mem_gib": peak_memory_gib(),
        "metrics": metrics, **(extra or {}),
    }
    if getattr(args, "sources", {}).get("file"):  # --config (cli.parse): the file and which keys came from where
        rec["config"] = args.sources
    write_json(Path(save_dir) / "run.json", rec)
    return rec


def guess_task(path) -> str | None:
    name = Path(str(path)).name.lower() if path else ""
    for task in ("creditmix", "idp", "codegen"):
        if task in name:
            return task
    return None


def eval_run_dir(spec: str, create: bool = True) -> Path:
    """Where an evaluation of `spec` is filed: the run dir itself, or runs/base-<slug> for a plain model (created
    with a run.json of method "base", so compare_runs.py lists base models beside the trained ones)."""
    p = Path(spec)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return p
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(spec.rstrip("/")).name or spec)
    run = Path(os.environ.get("DISTILL_SLM_RUNS", "runs")) / f"base-{slug}"
    if create and not (run / "run.json").is_file():
        write_json(run / "run.json", {"script": None, "method": "base", "task": None, "base_model": spec,
                                      "args": {}, "data": None, "versions": library_versions(), "metrics": {}})
    return run


def save_eval(spec: str, task: str, dataset, args, metrics: dict, script: str) -> Path:
    """File one evaluation under <run>/evals/<task>__<dataset-stem>__<date>.json; earlier ones are kept."""
    run = eval_run_dir(spec)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(str(dataset)).stem if dataset else "none"
    out = run / "evals" / f"{task}__{stem}__{stamp}.json"
    i = 1
    while out.exists():
        out, i = run / "evals" / f"{task}__{stem}__{stamp}-{i}.json", i + 1
    write_json(out, {"task": task, "script": script, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                     "model_dir": spec, "dataset": data_record(dataset) if dataset else None,
                     "args": vars(args) if not isinstance(args, dict) else args, "metrics": metrics,
                     **({"config": args.sources} if getattr(args, "sources", {}).get("file") else {})})
    return out
