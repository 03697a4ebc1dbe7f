"""Evaluate a CreditMix classifier on a balanced validation split: accuracy, macro-F1, classification report and
confusion matrix for each calibration (multi_null, batch, none), all from one pass of raw label scores. Records the
best calibration (one of the three, or `fitted`: a prior and a temperature fitted on the split, chosen on its
cross-fitted accuracy), with a temperature fitted to its scores, beside the run (creditmix_calibration.json): that is
what `--calibration auto` in infer_creditmix.py and the server use. Its expected calibration error is printed
before and after the temperature (and after it on rows the temperature was not fitted to); the raw label scores are
saved beside it (creditmix_scores.json).

    python eval_creditmix.py --model_dir smollm2-135m --data data/creditmix_val.jsonl
    python eval_creditmix.py --model_dir runs/creditmix_sft --data data/creditmix_dataset.json --val_per_class 1500
    python eval_creditmix.py --model_dir runs/cm6_sft --data ../shared/data/creditmix/creditmix_labeled.jsonl --val_per_class 438

--data is either a validation file written by creditmix_prepare.py ({"input","output"}), or a raw source (seed
JSON, Kaggle CSV, creditmix_labeled.jsonl): then prepare's held-out split is rebuilt from the same --features and
--seed, and a row the evaluated run trained on is refused, never scored.
"""
import json
from collections import Counter

import numpy as np

import creditmix as cm
import cli
from common import load_model, world_size
from fileio import UserError, need_file, read_records, user_errors, write_json
from models import resolve_model
from run_record import data_record, eval_run_dir, save_eval
from scoring import CALIBRATION_FILE, CALIBRATIONS, FITTED, SCORES_FILE, choose_calibration, prior_for


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    cli.add_model_args(p)
    # data
    p.add_argument("--data", required=True, help="creditmix_val.jsonl, or a raw source to rebuild the split from")
    cm.add_split_args(p.add_argument_group(
        "split (a raw --data source: the values given to creditmix_prepare.py; a prepared file: --val_per_class keeps "
        "the first N of each class)"))
    p.add_argument("--limit", type=int, default=None, help="score only the first N per class (quick checks)")
    # run
    p.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass")
    # output
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    return cli.parse(p, argv)


def first_per_class(pairs: list[tuple[str, str]], n: int | None) -> list[tuple[str, str]]:
    if not n:
        return pairs
    seen = Counter()
    out = []
    for prompt, label in pairs:
        seen[label] += 1
        if seen[label] <= n:
            out.append((prompt, label))
    return out


def is_validation_file(path: str) -> bool:
    """A prepared file ({"input","output"} rows) rather than a raw source."""
    if not path.endswith(".jsonl"):
        return False
    need_file(path, "data file")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        return False  # read_records reports the line
    return isinstance(rec, dict) and "input" in rec and "output" in rec


def validation_rows(args) -> list[tuple[str, str]]:
    """(user prompt, label) pairs, balanced per class."""
    if is_validation_file(args.data):
        pairs = []
        for n, r in enumerate(read_records(args.data), 1):
            if r.get("output") not in cm.LABELS or not isinstance(r.get("input"), str):
                raise UserError(f"{args.data}: line {n}: needs 'input' and an 'output' in {', '.join(cm.LABELS)}")
            pairs.append((r["input"], r["output"]))
        pairs = first_per_class(pairs, args.val_per_class)
    else:
        rows, _ = cm.load_examples(args.data, cm.resolve_features(args.features))
        val, _ = cm.split_balanced(rows, args.seed, args.val_per_class, args.val_frac)
        pairs = [(cm.prompt_for(r["features"]), r["label"]) for r in val]
    return first_per_class(pairs, args.limit)


def training_overlap(model_dir: str, prompts: set[str]) -> tuple[int, str | None]:
    """How many validation prompts the evaluated run trained on (0 when its training file is unknown)."""
    ms = resolve_model(model_dir)
    if not ms.adapter:
        return 0, None
    try:
        run = json.loads(open(f"{ms.adapter}/run.json").read())
        path = run["data"]["path"]
        seen = {r.get("input") or r.get("prompt") for r in read_records(path)}
    except (OSError, KeyError, TypeError, ValueError, UserError):
        return 0, None
    return len(prompts & seen), path


def sharded(score, prompts: list[str]):
    """Score prompts split across processes (one process: all of them). Returns the [N, 3] scores on the main
    process, None elsewhere."""
    if world_size() == 1:
        return score(prompts)
    from accelerate import PartialState
    from accelerate.utils import gather_object
    state = PartialState()
    with state.split_between_processes(prompts) as part:
        mine = score(part)
    rows = gather_object([mine])  # one array per process, in rank order
    return np.concatenate(rows) if state.is_main_process else None


def metrics_for(y_true: list[str], y_pred: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=cm.LABELS, average="macro", zero_division=0)), 4),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=cm.LABELS).tolist(),
        "classification_report": classification_report(y_true, y_pred, labels=cm.LABELS, output_dict=True,
                                                        zero_division=0),
    }


def main(args):
    from sklearn.metrics import classification_report

    # load
    pairs = validation_rows(args)
    overlap, train_file = training_overlap(args.model_dir, {p for p, _ in pairs})
    if overlap:
        raise UserError(f"{overlap} of {len(pairs)} validation rows are in this run's training file {train_file}: "
                        "creditmix_prepare.py held out fewer rows; rerun it with --val_per_class "
                        f"{args.val_per_class or 'N'} (and the same --seed/--features), then retrain")
    model, tok, lms = load_model(args.model_dir, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                               max_memory_gb=args.max_memory_gb)
    # run: under `accelerate launch`, each process scores a contiguous shard; gathered back in order
    raw = sharded(lambda part: cm.label_scores(model, tok, part, args.batch_size, progress=True),
                  [p for p, _ in pairs])
    if raw is None:
        return None  # not the main process
    nulls = cm.null_scores(model, tok)
    y_true = [y for _, y in pairs]
    results, reports = {}, {}
    for mode in CALIBRATIONS:
        pred = [cm.LABELS[i] for i in np.argmax(raw - prior_for(mode, raw, nulls), 1)]
        results[mode] = metrics_for(y_true, pred)
        reports[mode] = classification_report(y_true, pred, labels=cm.LABELS, digits=3, zero_division=0)
    chosen = choose_calibration(raw, nulls, np.array([cm.LABELS.index(y) for y in y_true]))
    metrics = {"n": len(pairs), "val_per_class": dict(Counter(y_true)), "labels": cm.LABELS,
               "calibrations": results, "chosen_calibration": chosen, "precision": lms.precision[0]}
    # save
    print(f"\n{args.model_dir} on {args.data}: {len(pairs)} rows {dict(Counter(y_true))}")
    print(f"{'calibration':<12} {'accuracy':>9} {'macro_f1':>9}")
    for mode in CALIBRATIONS:
        print(f"{mode:<12} {results[mode]['accuracy']:>9.4f} {results[mode]['macro_f1']:>9.4f}")
    print(f"{FITTED:<12} {chosen['accuracy'][FITTED]:>9.4f}         -   (a prior and temperature fitted on each half, "
          "scored on the other)")
    for mode in CALIBRATIONS:
        print(f"\n[{mode}] classification_report\n{reports[mode]}")
        print(f"[{mode}] confusion_matrix (rows: true {cm.LABELS}, cols: predicted)")
        print("\n".join("  " + " ".join(f"{v:>6}" for v in row) for row in results[mode]["confusion_matrix"]))
    print(f"\ncalibration for --calibration auto (infer_creditmix.py, the server): {chosen['calibration']}, "
          f"temperature {chosen['temperature']}: expected calibration error {chosen['ece_before']} -> "
          f"{chosen['ece_after']} ({chosen['ece_after_heldout']} with each half's calibration fitted on the other; "
          f"{chosen['ece_floor']} for perfectly calibrated probabilities on {len(pairs)} rows)")
    saved = save_eval(args.model_dir, "creditmix", args.data, args, metrics, "eval_creditmix.py")
    where = eval_run_dir(args.model_dir)
    write_json(where / CALIBRATION_FILE,
               {**chosen, "model_dir": args.model_dir, "data": data_record(args.data), "picked_by": "eval_creditmix.py"})
    write_json(where / SCORES_FILE, {"labels": cm.LABELS, "y": y_true, "raw": np.round(raw, 5).tolist(),
                                     "null_raw": np.round(nulls, 5).tolist(), "data": data_record(args.data)})
    if args.out:
        write_json(args.out, metrics)
    print(f"\nsaved {saved}")
    return metrics


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
