"""The gradient-boosted tree on the CreditMix features: the reference a student has to beat, scored on the same
held-out split (rebuilt from --src as creditmix_prepare.py made it), and with --out the tree as a KD teacher: its
class probabilities on the training rows of a KD file, each from a tree that did not train on that row (stratified
--folds cross-fitting), written as a teacher cache for kd_train.py --teacher_cache (forward KL to the tree's
distribution over the three labels at the label token, alpha-mixed with the label's cross-entropy).

    python creditmix_tree.py --src ../shared/data/creditmix/creditmix_labeled.jsonl --features rich --data runs/data_cm20/creditmix_kd.jsonl
    python creditmix_tree.py --src ../shared/data/creditmix/creditmix_labeled.jsonl --features rich --data runs/data_cm20/creditmix_kd.jsonl --student smollm2-135m --idp_mode --out runs/cache_tree_cm20
    python kd_train.py --student smollm2-135m --teacher_cache runs/cache_tree_cm20 --data runs/data_cm20/creditmix_kd.jsonl --idp_mode --save_dir runs/cm20_kd_tree

The tree sees what the student's prompt says (the features text, parsed back: numbers, 'unknown' as missing, the
other columns as categories); scikit-learn's HistGradientBoostingClassifier, class-balanced.
"""
import json
from pathlib import Path

import numpy as np

import cli
import creditmix as cm
import kd_cache
from common import load_tokenizer
from fileio import UserError, check_output_dir, read_records_placed, user_errors, write_json
from kd_losses import add_kd_data_args, canonical_rows, load_schema
from models import resolve_model


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("source and split (the values given to creditmix_prepare.py)")
    g.add_argument("--src", required=True, help="seed JSON/JSONL, Kaggle CSV, or creditmix_labeled.jsonl")
    cm.add_split_args(g)
    g = p.add_argument_group("tree")
    g.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the teacher's probabilities")
    g = p.add_argument_group("teacher cache (--out; the KD file and encoding as given to kd_train.py)")
    add_kd_data_args(g)
    g.add_argument("--student", default="smollm2-135m", help="the student whose tokenizer the cache is for; "
                   + cli.MODEL_SPEC)
    g.add_argument("--max_len", type=int, default=1024, help="as kd_train.py --max_len (tokens per example)")
    g.add_argument("--shard_rows", type=int, default=256, help="rows per shard file")
    g.add_argument("--out", default=None, help="cache folder to write (created); without it only the tree's score")
    return cli.parse(p, argv)


def kd_rows_in_train(path: str, train_prompts: dict, src: str) -> tuple[list[dict], list[int]]:
    """The KD file's rows and, for each, its index among the rebuilt training rows; refuses a row that is not one
    (a validation row, or a file made with other --features / --seed)."""
    rows, where = [], []
    fields = ("input", "teacher_output")
    for place, r in read_records_placed(path, required=fields, nonempty=fields):
        if r["input"] not in train_prompts:
            raise UserError(f"{path}: {place}: field 'input' is not among the training rows rebuilt from {src}: make "
                            "the file with creditmix_prepare.py and the same --features, --seed and --val_per_class")
        rows.append(r)
        where.append(train_prompts[r["input"]])
    return rows, where


def label_token_ids(tok, dataset, rows: list[dict], path: str) -> list[int]:
    """Each label's token id as the KD rows' answers start with it (one token per label, distinct)."""
    ids = {}
    for i, (ex, r) in enumerate(zip(dataset, rows)):
        labels = np.asarray(ex["labels"][1:])
        first = int(labels[labels != -100][0])
        if r["teacher_output"] not in cm.LABELS:
            raise UserError(f"{path}: row {i + 1}: teacher_output {r['teacher_output']!r} is not one of "
                            f"{', '.join(cm.LABELS)}")
        if ids.setdefault(r["teacher_output"], first) != first:
            raise UserError(f"{path}: row {i + 1}: the label {r['teacher_output']!r} starts with another token than "
                            "in earlier rows: the tree's targets need one token per label")
    missing = [c for c in cm.LABELS if c not in ids]
    if missing or len(set(ids.values())) < len(cm.LABELS):
        raise UserError(f"{path}: every label needs rows, each starting with its own token (missing or shared: "
                        f"{', '.join(missing) or ids})")
    return [ids[c] for c in cm.LABELS]


def main(args):
    from sklearn.metrics import accuracy_score, f1_score

    from training import encode_rows
    cli.print_config("creditmix_tree", args)
    if args.out:
        check_output_dir(args.out, "--out")
    # load
    cols = cm.resolve_features(args.features)
    source, _ = cm.load_examples(args.src, cols)
    val, train = cm.split_balanced(source, args.seed, args.val_per_class, args.val_frac, args.train_rows)
    X, categorical, categories = cm.feature_matrix([r["features"] for r in train], cols)
    Xv, _, _ = cm.feature_matrix([r["features"] for r in val], cols, categories)
    y, yv = (np.array([cm.LABELS.index(r["label"]) for r in part]) for part in (train, val))
    # run: the reference
    pred = cm.tree(categorical, args.seed).fit(X, y).predict(Xv)
    summary = {"features": cols, "train_rows": len(train), "holdout_rows": len(val),
               "holdout_accuracy": round(float(accuracy_score(yv, pred)), 4),
               "holdout_macro_f1": round(float(f1_score(yv, pred, average="macro")), 4)}
    print(f"tree on {len(val)} held-out rows: accuracy {summary['holdout_accuracy']}, "
          f"macro-F1 {summary['holdout_macro_f1']}")
    if args.out:  # the teacher
        rows, where = kd_rows_in_train(args.data, {cm.prompt_for(r["features"]): i for i, r in enumerate(train)},
                                       args.src)
        if args.idp_mode:
            rows = canonical_rows(rows, "teacher_output", args.data, load_schema(args.schema))
        probs = cm.out_of_fold_probabilities(X, y, categorical, args.folds, args.seed)[where]
        summary["out_of_fold_accuracy"] = round(float((probs.argmax(1) == y[where]).mean()), 4)
        tok = load_tokenizer(resolve_model(args.student))
        dataset, _ = encode_rows(tok, rows, "input", "teacher_output", args.max_len, keep_whole=args.idp_mode,
                                 source=args.data)
        if len(dataset) != len(rows):
            raise UserError(f"--max_len {args.max_len} leaves out {len(rows) - len(dataset)} of {args.data}'s rows: "
                            "raise it (the cache must hold every row)")
        targets = kd_cache.label_targets(dataset, probs, label_token_ids(tok, dataset, rows, args.data))
        meta = kd_cache.cache_meta(f"gradient-boosted tree ({args.folds}-fold out of fold) on {args.src}", args.data,
                                   tok, dataset, temperature=1.0, shard_rows=args.shard_rows, top_k=len(cm.LABELS),
                                   encoding={"max_len": args.max_len, "idp_mode": args.idp_mode,
                                             "schema": args.schema})
        # save
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "meta.json", {**meta, "complete": False})
        for s in range(0, len(targets), args.shard_rows):
            kd_cache.write_shard(out, s // args.shard_rows, targets[s:s + args.shard_rows])
        kd_cache.finish(out, meta)
        summary.update(out=str(out), cached_rows=len(dataset))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
