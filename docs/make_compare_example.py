"""Make docs/compare_example.png, the README's picture of a compare_runs.py report, from FABRICATED runs (made-up
numbers in the real run-directory layout: run.json, metrics.jsonl, evals/*.json), so it needs no training.

    python docs/make_compare_example.py                                  # writes docs/compare_example.png
    python docs/make_compare_example.py --runs_dir /tmp/fake_runs --report /tmp/fake_report   # keep runs + report

The figures are the report's own PNGs (training loss, metric bars, confusion matrices) laid out on one page under
a banner that says they come from fabricated runs.
"""
from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from fileio import atomic_open, user_errors, write_json  # noqa: E402
import compare_runs  # noqa: E402

LABELS = ["Good", "Standard", "Bad"]
# run name -> (method, accuracy per calibration, steps, wall time s, peak GiB, loss start -> end); made-up values.
FAKE = {
    "base-smollm2-135m": ("base", {"multi_null": 0.36, "batch": 0.35, "none": 0.33}, None, None, None, None),
    "creditmix_sft": ("sft", {"multi_null": 0.86, "batch": 0.85, "none": 0.81}, 600, 1510, 3.4, (2.6, 0.35)),
    "creditmix_kd": ("kd", {"multi_null": 0.84, "batch": 0.84, "none": 0.80}, 600, 1725, 3.6, (3.1, 0.55)),
    "creditmix_dpo": ("dpo", {"multi_null": 0.79, "batch": 0.78, "none": 0.74}, 600, 2890, 4.9, (0.69, 0.21)),
}


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    # data
    p.add_argument("--runs_dir", default=None, help="where to write the fabricated runs (default: a temp folder, "
                   "deleted afterwards)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the fabricated curves and matrices")
    # output
    p.add_argument("--report", default=None, help="where compare_runs.py writes its report (default: a temp folder)")
    p.add_argument("--out", default=str(ROOT / "docs" / "compare_example.png"), help="the composed picture (PNG)")
    return p.parse_args(argv)


def confusion(acc: float, per_class: int, rng: random.Random) -> list[list[int]]:
    """A 3x3 matrix with `per_class` rows each and about `acc` on the diagonal."""
    cm = []
    for i in range(3):
        right = min(per_class, max(0, round(per_class * (acc + rng.uniform(-0.06, 0.06)))))
        wrong = per_class - right
        a = rng.randint(0, wrong)
        row = [a, wrong - a]
        row.insert(i, right)
        cm.append(row)
    return cm


def fabricate(runs_dir: Path, seed: int) -> list[Path]:
    rng = random.Random(seed)
    dirs = []
    for name, (method, accs, steps, wall, mem, loss) in FAKE.items():
        d = runs_dir / name
        data = None if method == "base" else {"path": f"data/creditmix_{method}.jsonl", "sha256": "0" * 64}
        write_json(d / "run.json", {
            "script": None if method == "base" else f"{method}_train.py", "method": method,
            "task": None if method == "base" else "creditmix",
            "base_model": "smollm2-135m", "args": {}, "data": data, "device": "NVIDIA H100 80GB HBM3 (fabricated)",
            "started": "2026-11-26T10:00:00", "wall_time_s": wall, "peak_mem_gib": mem,
            "metrics": {} if steps is None else {"train_loss": loss[1], "train_steps": steps}})
        if loss:
            with atomic_open(d / "metrics.jsonl") as f:
                for step in range(10, steps + 1, 10):
                    value = loss[1] + (loss[0] - loss[1]) * math.exp(-step / 120) + rng.gauss(0, 0.03)
                    f.write(json.dumps({"step": step, "epoch": step / steps, "loss": round(value, 4),
                                        "learning_rate": 2e-4 * (1 - step / steps)}) + "\n")
        per_class = 438  # the balanced real holdout's size per class (data/PROVENANCE.md)
        cals = {}
        for cal, acc in accs.items():
            cm = confusion(acc, per_class, rng)
            total = sum(map(sum, cm))
            f1s = []
            for i in range(3):
                tp, col, row = cm[i][i], sum(r[i] for r in cm), sum(cm[i])
                f1s.append(2 * tp / (col + row) if col + row else 0.0)
            cals[cal] = {"accuracy": sum(cm[i][i] for i in range(3)) / total, "macro_f1": sum(f1s) / 3,
                         "confusion_matrix": cm, "labels": LABELS}
        write_json(d / "evals" / "creditmix__creditmix_labeled__20261126-120000.json", {
            "task": "creditmix", "script": "eval_creditmix.py", "date": "2026-11-26T12:00:00",
            "model_dir": str(d), "dataset": {"path": "data/creditmix_labeled.jsonl", "sha256": "1" * 64},
            "args": {"val_per_class": per_class},
            "metrics": {"n": 3 * per_class, "val_per_class": per_class, "labels": LABELS, "calibrations": cals}})
        dirs.append(d)
    return dirs


def compose(figures: dict, out: Path) -> None:
    """The report's loss chart over its metric bars, beside its confusion matrices, under a banner."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure
    imgs = {k: mpimg.imread(str(p)) for (_, k), p in figures.items()}
    fig = Figure(figsize=(18, 12))
    gs = fig.add_gridspec(2, 2, width_ratios=[1.1, 1], height_ratios=[1, 1.5])
    for spec, kind in ((gs[0, 0], "loss"), (gs[1, 0], "metrics"), (gs[:, 1], "confusion")):
        ax = fig.add_subplot(spec)
        ax.imshow(imgs[kind])
        ax.set_axis_off()
    fig.suptitle("compare_runs.py report — FABRICATED example runs (made-up numbers, not results)", fontsize=16)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=80)


def main(args):
    # load
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(args.runs_dir or Path(tmp) / "runs")
        report = Path(args.report or Path(tmp) / "report")
        # run
        dirs = fabricate(runs_dir, args.seed)
        result = compare_runs.main(compare_runs.parse_args([str(d) for d in dirs] + ["--out", str(report)]))
        # save
        compose(result["figures"], Path(args.out))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
