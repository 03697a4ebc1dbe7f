"""Trainer callbacks the trainers attach: metrics.jsonl, a time limit, the KD record and the DPO reward summary.

Imports transformers at import time: import it inside functions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from common import world_size


class MetricsJsonl(TrainerCallback):
    """<save_dir>/metrics.jsonl: one line per log (training and evaluation), appended across resumes."""

    def __init__(self, save_dir: str):
        self.path = Path(save_dir) / "metrics.jsonl"

    def on_log(self, targs, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class TimeLimit(TrainerCallback):
    """Stops training (at a step boundary, so the adapter is saved as usual) once `minutes` have passed."""

    def __init__(self, minutes: float):
        self.minutes, self.stopped, self.t0 = minutes, False, time.time()

    def on_train_begin(self, targs, state, control, **kw):
        self.t0 = time.time()

    def on_step_end(self, targs, state, control, **kw):
        stop = time.time() - self.t0 > self.minutes * 60
        if world_size() > 1:  # every rank must stop at the same step, or the others wait forever in a collective
            import torch
            import torch.distributed as dist
            flag = torch.tensor([int(stop)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_training_stop = self.stopped = True


class KDRecord(TrainerCallback):
    """Keeps the last logged kd_loss / ce_loss in `record` and, at the end of training, the held-out KL (`held`:
    model -> heldout_kl's dict): train_and_save reads `record` after training, so it lands in run.json's metrics."""

    def __init__(self, record: dict, held=None):
        self.record, self.held = record, held

    def on_log(self, targs, state, control, logs=None, **kw):
        for k in ("kd_loss", "ce_loss"):
            if logs and k in logs:
                self.record[f"final_{k}"] = round(logs[k], 6)

    def on_train_end(self, targs, state, control, model=None, **kw):
        if self.held is not None:
            after = self.held(model)
            self.record.update(kl_after=after["kl"], kl_first_token_after=after["kl_first_token"])


class RewardSummary(TrainerCallback):
    """Fills `summary` with summarize(log_history) when training ends, before train_and_save writes run.json."""

    def __init__(self, summary: dict, summarize):
        self.summary, self.summarize = summary, summarize

    def on_train_end(self, targs, state, control, **kw):
        self.summary.update(self.summarize(state.log_history))


class StepTimes(TrainerCallback):
    """bench.py's timer: the wall-clock time at the end of every optimizer step, after `sync` (waits for the GPU)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def on_step_end(self, targs, state, control, **kw):
        self.sync()
        self.times.append(time.perf_counter())

    def seconds_per_step(self, skip_last: bool = False, untimed: int = 1) -> float:
        """Mean time per step after the first `untimed` (the warm-up); skip_last: without the last (a profiled
        step)."""
        t = self.times[:-1] if skip_last else self.times
        return (t[-1] - t[untimed - 1]) / (len(t) - untimed)


class ProfileStep(TrainerCallback):
    """bench.py --profile: torch.profiler over optimizer step `step` (0-based), CPU and CUDA activity; `prof` and
    `wall` (seconds, after `sync`) are set once it ends."""

    def __init__(self, step: int, sync):
        self.step, self.sync, self.prof, self.wall, self._t = step, sync, None, None, None

    def on_step_begin(self, targs, state, control, **kw):
        if state.global_step == self.step and self.prof is None:
            import torch
            self.sync()
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                           if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self._t = time.perf_counter()

    def on_step_end(self, targs, state, control, **kw):
        if self.prof is not None and self.wall is None and state.global_step == self.step + 1:
            self.sync()
            self.wall = time.perf_counter() - self._t
            self.prof.__exit__(None, None, None)
