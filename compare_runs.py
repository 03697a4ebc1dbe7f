"""Compare runs side by side: one table (method, base model, data, steps, wall time, peak memory and the task's
evaluation metrics) and a Markdown report with plots (training loss per run, metric bars, confusion matrices).

    python compare_runs.py runs/creditmix_* --task creditmix --out report/
    python compare_runs.py runs/base-smollm2-135m runs/creditmix_sft runs/creditmix_kd runs/creditmix_dpo
    python compare_runs.py runs/                  # every run under runs/: one table and one set of plots per task

Each argument is a run directory (it holds run.json) or a folder of run directories. For each run and dataset the
latest evaluation (evals/<task>__<dataset>__<date>.json) is shown, and which dataset it was; a run without one is
listed with what is missing. Runs of several tasks give one table per task (--task keeps one). A problem with one
run (no run.json, a truncated metrics.jsonl, an invalid eval file) is one line on stderr and in the report, and the
rest is still written; the exit code is 2 only when no run could be compared.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cli
from fileio import UserError, atomic_open, user_errors, write_json
from run_record import guess_task
from scoring import CALIBRATIONS

# Column header -> how to read it from an evaluation's "metrics" (a key path, or a function for alternatives).
TASK_COLUMNS = {
    "creditmix": [(f"{k} {cal}", ("calibrations", cal, key)) for cal in CALIBRATIONS
                  for k, key in (("acc", "accuracy"), ("F1", "macro_f1"))],
    "idp": [("JSON valid", ("json_valid_rate",)), ("schema valid", ("schema_valid_rate",)),
            ("field F1 micro", ("field_f1_micro",)), ("field F1 macro", ("field_f1_macro",))],
    "codegen": [("pass@1", lambda m: _num(m, "pass@1") if _num(m, "pass@1") is not None else _num(m, "pass@k", "1")),
                ("pass@10", lambda m: _num(m, "pass@10") if _num(m, "pass@10") is not None
                 else _num(m, "pass@k", "10"))],
}
OPTIONAL_COLUMNS = {"pass@10"}  # dropped from a table when no run has them
# The metric that names the best run of a task ("which playbook wins").
PRIMARY = {"creditmix": "F1 multi_null", "idp": "field F1 micro", "codegen": "pass@1"}
# Bar-chart panels: (title, [(legend label, column header)]).
PANELS = {
    "creditmix": [("accuracy", [(cal, f"acc {cal}") for cal in CALIBRATIONS]),
                  ("macro-F1", [(cal, f"F1 {cal}") for cal in CALIBRATIONS])],
    "idp": [("rate / F1", [(h, h) for h, _ in TASK_COLUMNS["idp"]])],
    "codegen": [("pass@k", [("pass@1", "pass@1"), ("pass@10", "pass@10")])],
}
METHOD_ORDER = {"base": 0, "sft": 1, "kd": 2, "dpo": 3}  # rows read base -> SFT -> KD -> DPO
RUN_COLUMNS = ["run", "method", "base model", "data", "steps", "wall time", "peak mem", "dataset", "n"]
EVAL_NAME = re.compile(r"^(?P<task>[^_].*?)__(?P<dataset>.+)__(?P<stamp>\d{8}-\d{6})(?:-(?P<i>\d+))?\.json$")
DASH = "–"


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    # data
    p.add_argument("runs", nargs="+", help="run directories (each holds run.json) or folders of run directories; "
                   "shell globs such as runs/creditmix_* expand to several")
    p.add_argument("--task", default=None, choices=sorted(TASK_COLUMNS),
                   help="keep only this task's runs and evaluations (default: all tasks, one table per task)")
    # output
    p.add_argument("--out", default="report", help="report folder: index.md, <task>_*.png and summary.json "
                   "are written there (default: report)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# reading runs

@dataclass
class Eval:
    path: Path
    task: str
    dataset: str            # the evaluated file's stem, e.g. creditmix_dataset
    sha256: str | None
    date: _dt.datetime
    metrics: dict


@dataclass
class Run:
    path: Path
    name: str
    info: dict              # run.json
    evals: list[Eval]       # the latest evaluation per (task, dataset)
    superseded: int = 0     # earlier evaluations of the same (task, dataset), not shown
    eval_files: int = 0     # readable evaluation files of any task
    curve: list[tuple[float, float]] = field(default_factory=list)  # (step, training loss)
    curve_source: str | None = None

    @property
    def method(self) -> str:
        return str(self.info.get("method") or DASH)

    def tasks(self) -> set[str]:
        own = self.info.get("task") or guess_task((self.info.get("data") or {}).get("path")) or guess_task(self.name)
        return {e.task for e in self.evals} | ({own} if own else set())


def _num(d, *keys):
    """A number at d[k1][k2]..., or None when a key is missing or the value is not a number (tolerant reader)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) else None


def _getter(spec):
    return spec if callable(spec) else (lambda m: _num(m, *spec))


def find_runs(paths: list[str], problems: list[str]) -> list[Path]:
    """Run directories among the arguments: a dir with run.json, or the run dirs directly inside a folder."""
    found, seen = [], set()

    def add(d: Path):
        if d.resolve() not in seen:
            seen.add(d.resolve())
            found.append(d)

    for arg in paths:
        p = Path(arg)
        if p.is_file() and p.name == "run.json":
            p = p.parent
        if not p.exists():
            problems.append(f"{arg}: no such directory")
        elif not p.is_dir():
            problems.append(f"{arg}: not a run directory (a file; expected a folder holding run.json)")
        elif (p / "run.json").is_file():
            add(p)
        else:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
            runs = [c for c in children if (c / "run.json").is_file()]
            if not runs:
                problems.append(f"{arg}: not a run (no run.json) and no run directories inside")
                continue
            for c in children:
                if c in runs:
                    add(c)
                else:
                    problems.append(f"{c}: not a run (no run.json): skipped")
    return found


def read_json_file(path: Path, problems: list[str], what: str):
    """json.load with a one-line problem (file:line) instead of an exception; None when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{e.lineno}: invalid JSON ({e.msg}): {what} skipped")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read ({e}): {what} skipped")
    return None


def read_evals(run_dir: Path, problems: list[str]) -> tuple[list[Eval], int, int]:
    """The latest evaluation per (task, dataset) in <run>/evals, the number of earlier ones, and all readable."""
    evals = []
    for f in sorted((run_dir / "evals").glob("*.json")):
        if f.name.startswith("."):
            continue  # a temp file of an evaluation being written
        rec = read_json_file(f, problems, "evaluation")
        if rec is None:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            problems.append(f"{f}: not an evaluation record (no 'metrics' object): skipped")
            continue
        m = EVAL_NAME.match(f.name)
        task = rec.get("task") or (m and m["task"]) or guess_task(f.name)
        if not task:
            problems.append(f"{f}: names no task (field 'task'): skipped")
            continue
        ds = rec.get("dataset") if isinstance(rec.get("dataset"), dict) else {}
        dataset = Path(str(ds["path"])).stem if ds.get("path") else (m["dataset"] if m else f.stem)
        key = _eval_time(rec, m, f)
        evals.append((key, Eval(f, str(task), dataset, ds.get("sha256"), key[0], rec["metrics"])))
    latest: dict[tuple[str, str], Eval] = {}
    for _, e in sorted(evals, key=lambda t: t[0]):
        latest[(e.task, e.dataset)] = e  # later ones replace earlier ones
    return list(latest.values()), len(evals) - len(latest), len(evals)


def _eval_time(rec: dict, m, f: Path) -> tuple:
    """Sort key of an evaluation: its 'date' field, else the file name's stamp, else the file's mtime; then the
    -N suffix that save_eval adds to evaluations within the same second."""
    date = None
    if isinstance(rec.get("date"), str):
        try:
            date = _dt.datetime.fromisoformat(rec["date"])
            if date.tzinfo is not None:
                date = date.astimezone().replace(tzinfo=None)
        except ValueError:
            date = None
    if date is None and m:
        date = _dt.datetime.strptime(m["stamp"], "%Y%m%d-%H%M%S")
    if date is None:
        date = _dt.datetime.fromtimestamp(f.stat().st_mtime)
    return date, int(m["i"] or 0) if m else 0, f.name


def read_curve(run_dir: Path, problems: list[str]) -> tuple[list[tuple[float, float]], str | None]:
    """Training loss per logged step: metrics.jsonl, else trainer_state.json's log_history (the run dir's, else its
    newest checkpoint's), else the TensorBoard events under logs/."""
    f = run_dir / "metrics.jsonl"
    if f.is_file():
        pts = _loss_points(_read_jsonl_tolerant(f, problems))
        if pts:
            return pts, "metrics.jsonl"
        problems.append(f"{f}: no 'loss' entries: trying trainer_state.json and logs/")
    states = [run_dir / "trainer_state.json"] + sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                                                       key=lambda s: _checkpoint_step(s.parent), reverse=True)
    for s in states:
        if s.is_file():
            state = read_json_file(s, problems, "training log")
            if isinstance(state, dict) and isinstance(state.get("log_history"), list):
                pts = _loss_points(state["log_history"])
                if pts:
                    return pts, str(s.relative_to(run_dir))
    if (run_dir / "logs").is_dir():
        pts = _tensorboard_loss(run_dir / "logs", problems)
        if pts:
            return pts, "logs/ (TensorBoard)"
    return [], None


def _checkpoint_step(d: Path) -> int:
    tail = d.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _read_jsonl_tolerant(path: Path, problems: list[str]) -> list:
    """JSON lines, skipping unreadable ones with one problem line. Not fileio.read_records: that refuses the whole
    file at its first bad line, while a log cut mid-write (a killed run) still holds a good curve."""
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        problems.append(f"{path}: cannot read ({e})")
        return rows
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(lineno)
    if bad:
        where = "last line, truncated" if bad == [len(lines)] else f"line{'s' if len(bad) > 1 else ''} " + \
            ", ".join(map(str, bad[:5])) + (" …" if len(bad) > 5 else "")
        problems.append(f"{path}:{bad[0]}: invalid JSON ({where}): {len(bad)} line(s) skipped, "
                        f"{len(rows)} read")
    return rows


def _loss_points(records) -> list[tuple[float, float]]:
    """(step, loss) from Trainer log records; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for i, r in enumerate(records):
        if isinstance(r, dict) and _num(r, "loss") is not None:
            step = _num(r, "step")
            by_step[step if step is not None else float(i)] = _num(r, "loss")
    return sorted(by_step.items())


def _tensorboard_loss(logs: Path, problems: list[str]) -> list[tuple[float, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    by_step = {}
    for d in sorted({f.parent for f in logs.rglob("events.out.tfevents.*")}):
        try:
            acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
            tag = next((t for t in ("train/loss", "loss", "train_loss") if t in tags), None)
            for ev in acc.Scalars(tag) if tag else []:
                by_step[float(ev.step)] = float(ev.value)
        except Exception as e:  # a corrupt event file must not stop the report
            problems.append(f"{d}: unreadable TensorBoard events ({type(e).__name__}: {e})")
    return sorted(by_step.items())


def read_run(run_dir: Path, problems: list[str]) -> Run | None:
    info = read_json_file(run_dir / "run.json", problems, "run")
    if info is None:
        return None
    if not isinstance(info, dict):
        problems.append(f"{run_dir / 'run.json'}: expected a JSON object: run skipped")
        return None
    evals, superseded, n_files = read_evals(run_dir, problems)
    curve, source = read_curve(run_dir, problems)
    return Run(run_dir, run_dir.name, info, evals, superseded, n_files, curve, source)


# ----------------------------------------------------------------------------------------------------------------
# the table

def columns_for(task: str, evals: list[Eval]) -> list[tuple[str, object]]:
    if task in TASK_COLUMNS:
        cols = [(h, _getter(s)) for h, s in TASK_COLUMNS[task]]
    else:  # a task this script does not know: its top-level numeric metrics
        keys = sorted({k for e in evals for k, v in e.metrics.items() if k != "n" and _num(e.metrics, k) is not None})
        cols = [(k, _getter((k,))) for k in keys[:8]]
    return [(h, g) for h, g in cols
            if h not in OPTIONAL_COLUMNS or any(g(e.metrics) is not None for e in evals)]


def build_table(task: str, runs: list[Run]) -> dict:
    """One row per run and dataset of this task (the latest evaluation); a run without an evaluation on a dataset
    that others were evaluated on gets a row that says so."""
    evals = [e for r in runs for e in r.evals if e.task == task]
    datasets = sorted({e.dataset for e in evals})
    cols = columns_for(task, evals)
    rows = []
    for r in runs:
        mine = {e.dataset: e for e in r.evals if e.task == task}
        general = []
        if r.curve_source is None and r.method != "base":
            general.append("no training log")  # looked for metrics.jsonl, trainer_state.json, logs/
        for ds in datasets or [None]:
            e = mine.get(ds)
            missing = list(general)
            if e is None:
                missing.insert(0, f"no {task} evaluation on {ds}" if ds else
                               f"no {task} evaluation ({r.path / 'evals'} " +
                               ("has none of this task)" if r.eval_files else "is empty or missing)"))
            rows.append(_row(r, task, e, ds, cols, missing))
    rows.sort(key=lambda row: (row["dataset"] or "", METHOD_ORDER.get(row["method"], 9), row["run"]))
    return {"task": task, "columns": [h for h, _ in cols], "rows": rows, "datasets": datasets,
            "best": _best(task, rows)}


def _row(r: Run, task: str, e: Eval | None, ds: str | None, cols, missing: list[str]) -> dict:
    info, m = r.info, (e.metrics if e else {})
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    run_metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    steps = _num(run_metrics, "train_steps")
    if steps is None:
        steps = _num(run_metrics, "global_step")
    if steps is None and r.curve:
        steps = r.curve[-1][0]
    return {
        "run": r.name, "path": str(r.path), "method": r.method, "base_model": info.get("base_model"),
        "data": Path(str(data["path"])).name if data.get("path") else None,
        "steps": int(steps) if steps is not None else None,
        "wall_time_s": _num(info, "wall_time_s"), "peak_mem_gib": _num(info, "peak_mem_gib"),
        "dataset": ds, "eval_file": str(e.path) if e else None,
        "eval_date": e.date.isoformat(sep=" ", timespec="seconds") if e else None,
        "dataset_sha256": e.sha256 if e else None, "n": int(m["n"]) if _num(m, "n") is not None else None,
        "metrics": {h: g(m) for h, g in cols}, "missing": missing,
        "confusion": _confusions(m) if e else {},
    }


def _confusions(m: dict) -> dict:
    """{calibration: {"matrix", "labels"}} for the classifier evaluations (eval_creditmix.py's shape)."""
    out = {}
    cals = m.get("calibrations") if isinstance(m.get("calibrations"), dict) else {}
    for cal, c in cals.items():
        if not isinstance(c, dict) or not isinstance(c.get("confusion_matrix"), list):
            continue
        cm = c["confusion_matrix"]
        labels = c.get("labels") or m.get("labels") or [str(i) for i in range(len(cm))]
        ok = (all(isinstance(row, list) and len(row) == len(cm) for row in cm) and len(labels) == len(cm)
              and all(_num({"v": v}, "v") is not None for row in cm for v in row))
        if ok and cm:
            out[cal] = {"matrix": [[int(v) for v in row] for row in cm], "labels": [str(x) for x in labels]}
    return out


def _best(task: str, rows: list[dict]) -> list[dict]:
    """The best run per dataset by the task's primary metric."""
    key, out = PRIMARY.get(task), []
    for ds in sorted({r["dataset"] for r in rows if r["dataset"]}):
        scored = [r for r in rows if r["dataset"] == ds and key and r["metrics"].get(key) is not None]
        if scored:
            b = max(scored, key=lambda r: r["metrics"][key])
            out.append({"dataset": ds, "metric": key, "run": b["run"], "value": b["metrics"][key],
                        "steps": b["steps"], "wall_time_s": b["wall_time_s"], "peak_mem_gib": b["peak_mem_gib"]})
    return out


def fmt_duration(s: float | None) -> str:
    if s is None:
        return DASH
    s = int(round(s))
    return f"{s} s" if s < 60 else f"{s // 60}m {s % 60:02d}s" if s < 3600 else f"{s // 3600}h {s % 3600 // 60:02d}m"


def display_row(row: dict, columns: list[str]) -> list[str]:
    def f(v, spec="{:.3f}"):
        return DASH if v is None else spec.format(v)
    return [row["run"], row["method"], row["base_model"] or DASH, row["data"] or DASH, f(row["steps"], "{}"),
            fmt_duration(row["wall_time_s"]), f(row["peak_mem_gib"], "{:.2f} GiB"), row["dataset"] or DASH,
            f(row["n"], "{:.0f}")] + [f(row["metrics"][c]) for c in columns] + ["; ".join(row["missing"]) or ""]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|") or " "  # noqa: E731
    return "\n".join(["| " + " | ".join(map(esc, headers)) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def best_line(b: dict) -> str:
    cost = ", ".join(x for x in (f"{b['steps']} steps" if b["steps"] is not None else "",
                                 fmt_duration(b["wall_time_s"]) if b["wall_time_s"] is not None else "",
                                 f"{b['peak_mem_gib']:.2f} GiB peak" if b["peak_mem_gib"] is not None else "") if x)
    return f"best on {b['dataset']} by {b['metric']}: {b['run']} {b['value']:.3f}" + (f" ({cost})" if cost else "")


# ----------------------------------------------------------------------------------------------------------------
# plots: matplotlib's Figure object API renders PNGs with the Agg canvas, headless, without pyplot's global state

def save_png(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


def _label(row: dict, several_datasets: bool) -> str:
    return f"{row['run']}\n({row['dataset']})" if several_datasets and row["dataset"] else row["run"]


def plot_loss(task: str, runs: list[Run]):
    from matplotlib.figure import Figure
    curves = [r for r in runs if r.curve]
    if not curves:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for r in sorted(curves, key=lambda r: (METHOD_ORDER.get(r.method, 9), r.name)):
        steps, losses = zip(*r.curve)
        ax.plot(steps, losses, marker="." if len(steps) < 30 else None, label=f"{r.name} ({r.method})")
    ax.set(xlabel="step", ylabel="training loss", title=f"{task}: training loss per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_metrics(table: dict):
    from matplotlib.figure import Figure
    task, rows, several = table["task"], table["rows"], len(table["datasets"]) > 1
    panels = PANELS.get(task) or [("metrics", [(c, c) for c in table["columns"]])]
    panels = [(t, [(lab, h) for lab, h in series if h in table["columns"]]) for t, series in panels]
    panels = [(t, s) for t, s in panels if s]
    if not rows or not panels:
        return None
    n_series = max(len(s) for _, s in panels)
    fig = Figure(figsize=(max(6.0, 2.0 + len(rows) * (0.5 + 0.3 * n_series)), 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    x = range(len(rows))
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        for j, (lab, h) in enumerate(series):
            xs = [i - 0.4 + width * (j + 0.5) for i in x]
            vals = [row["metrics"].get(h) for row in rows]
            bars = ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=lab)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}" if v is not None else DASH, (b.get_x() + b.get_width() / 2, v or 0),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        for i, row in enumerate(rows):
            if row["eval_file"] is None:
                ax.text(i, 0.5, "not evaluated", ha="center", va="center", rotation=90, color="gray")
        ax.set_xticks(list(x), [_label(r, several) for r in rows], fontsize=8)
        ax.set(ylim=(0, 1.08), ylabel=title, title=f"{task}: {title} per run")
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_confusions(table: dict):
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay
    rows = [r for r in table["rows"] if r["confusion"]]
    if not rows:
        return None
    cals = [c for c in CALIBRATIONS if any(c in r["confusion"] for r in rows)]
    cals += sorted({c for r in rows for c in r["confusion"]} - set(cals))
    several = len(table["datasets"]) > 1
    fig = Figure(figsize=(3.3 * len(cals), 3.1 * len(rows)))
    axes = fig.subplots(len(rows), len(cals), squeeze=False)
    for i, row in enumerate(rows):
        for j, cal in enumerate(cals):
            ax = axes[i][j]
            if cal not in row["confusion"]:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no '{cal}'", ha="center", va="center", transform=ax.transAxes, color="gray")
                continue
            cm = row["confusion"][cal]
            ConfusionMatrixDisplay(confusion_matrix=np.array(cm["matrix"]), display_labels=cm["labels"]).plot(
                ax=ax, colorbar=False, cmap="Blues", values_format="d")
            acc = row["metrics"].get(f"acc {cal}")
            ax.set_title(f"{_label(row, several)}\n{cal}" + (f" · acc {acc:.3f}" if acc is not None else ""),
                         fontsize=9)
            if j:
                ax.set_ylabel("")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    # load
    problems: list[str] = []
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    runs = [r for r in (read_run(d, problems) for d in find_runs(args.runs, problems)) if r is not None]
    names = [r.name for r in runs]
    for r in runs:  # two runs with one folder name (a/run, b/run): name them by path
        if names.count(r.name) > 1:
            r.name = str(r.path)
    by_task: dict[str, list[Run]] = {}
    for r in runs:
        tasks = r.tasks()
        if not tasks:
            problems.append(f"{r.path}: run.json names no task and there is no evaluation: nothing to compare")
        elif args.task and args.task not in tasks:
            problems.append(f"{r.path}: a {'/'.join(sorted(tasks))} run, not {args.task}: skipped")
        for t in sorted(tasks):
            if not args.task or t == args.task:
                by_task.setdefault(t, []).append(r)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not by_task:
        why = f"no {args.task} run" if args.task and runs else "no readable run"
        raise UserError(f"nothing to compare: {why} among {' '.join(args.runs)}"
                        + (f" ({len(problems)} problem(s) above)" if problems else ""))
    if len(by_task) > 1:
        print("NOTE: these runs cover " + str(len(by_task)) + " tasks (" +
              ", ".join(f"{t}: {len(rs)} run{'s' * (len(rs) > 1)}" for t, rs in sorted(by_task.items())) +
              "): one table and one set of plots per task; --task keeps one", file=sys.stderr)

    # run
    tables = {t: build_table(t, rs) for t, rs in sorted(by_task.items())}
    for table in tables.values():
        for ds in table["datasets"]:
            shas = {r["dataset_sha256"] for r in table["rows"] if r["dataset"] == ds and r["dataset_sha256"]}
            if len(shas) > 1:
                problems.append(f"{table['task']} runs were evaluated on different contents of {ds} "
                                f"(sha256 differs): their numbers are not comparable")
                print(f"warning: {problems[-1]}", file=sys.stderr)
    figures = {}
    for t, table in tables.items():
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", t)
        for kind, fig in (("loss", plot_loss(t, by_task[t])), ("metrics", plot_metrics(table)),
                          ("confusion", plot_confusions(table))):
            if fig is not None:
                figures[(t, kind)] = (f"{slug}_{kind}.png", fig)
    for t, table in tables.items():
        headers = RUN_COLUMNS + table["columns"] + ["missing"]
        print(f"\n== {t}: {len({r['run'] for r in table['rows']})} run(s) ==")
        print(text_table(headers, [display_row(r, table["columns"]) for r in table["rows"]]))
        for b in table["best"]:
            print(best_line(b))

    # save: the PNGs first, index.md last, each written to a temp file and renamed into place
    for name, fig in figures.values():
        save_png(fig, out / name)
    write_json(out / "summary.json", {"tables": tables, "problems": problems})
    with atomic_open(out / "index.md") as f:
        f.write(render_index(args, tables, by_task, figures, problems))
    print(f"\nreport: {out / 'index.md'} ({len(figures)} plot(s))")
    return {"tables": tables, "problems": problems, "figures": {k: out / v[0] for k, v in figures.items()},
            "out": out}


def render_index(args, tables, by_task, figures, problems) -> str:
    now = _dt.datetime.now().isoformat(sep=" ", timespec="seconds")
    md = ["# Run comparison", "",
          f"`python compare_runs.py {' '.join(args.runs)}" + (f" --task {args.task}" if args.task else "") +
          f" --out {args.out}` on {now}. Per run and dataset the latest evaluation is shown; peak memory is the "
          "GPU's (`torch.cuda.max_memory_allocated`, – on CPU).", ""]
    for t, table in tables.items():
        headers = RUN_COLUMNS + table["columns"] + ["missing"]
        md += [f"## {t}", "", markdown_table(headers, [display_row(r, table["columns"]) for r in table["rows"]]), ""]
        md += [f"**{best_line(b)}**  " for b in table["best"]] + ([""] if table["best"] else [])
        for kind, alt in (("loss", "training loss per run"), ("metrics", f"{t} metrics per run"),
                          ("confusion", "confusion matrices")):
            if (t, kind) in figures:
                md += [f"![{alt}]({figures[(t, kind)][0]})", ""]
                if kind == "loss":
                    md += ["Each method's own training objective (cross-entropy for SFT, the KD mix for KD, the "
                           "preference loss for DPO): compare shapes and convergence, not levels across methods.", ""]
        if (t, "loss") not in figures:
            md += ["No training curves (no metrics.jsonl, trainer_state.json or TensorBoard logs/ in these runs).", ""]
        md += ["### Sources", ""]
        for r in by_task[t]:
            evs = [e for e in r.evals if e.task == t]
            ev = "; ".join(f"`{e.path}` ({e.dataset}, {e.date.isoformat(sep=' ', timespec='seconds')})" for e in evs)
            src = r.curve_source or ("none (a base model, not trained)" if r.method == "base" else "none found")
            md.append(f"- `{r.path}`: loss from {src}"
                      + (f" ({len(r.curve)} points)" if r.curve else "") + f"; evaluations: {ev or 'none'}"
                      + (f"; {r.superseded} earlier evaluation(s) not shown" if r.superseded else ""))
        md.append("")
    if problems:
        md += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(md)


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
