"""Balance CreditMix classes and write the SFT / KD / DPO training files plus a held-out validation file.

    python creditmix_prepare.py --src data/creditmix_dataset.json --outdir data
    python creditmix_prepare.py --src ../shared/data/creditmix/creditmix_labeled.jsonl --outdir runs/data_cm6
    python creditmix_prepare.py --src ../shared/data/creditmix/kaggle_credit_score_subset.csv --features rich --outdir runs/data_cm20

Sources: the README's seed format ({"question": features, "answer": Good|Standard|Bad}, JSON list or JSONL), a
Kaggle-style credit CSV (dirty values cleaned; Name, SSN and Credit_Score never reach a prompt; Credit_Mix "_" rows
skipped and counted), or creditmix_labeled.jsonl (its `source_split` holdout becomes the validation split).
Writes creditmix_{sft,kd,dpo}.jsonl (balanced: per-class cap = smallest class; --train_rows all keeps every
training row), creditmix_val.jsonl (balanced, no prompt shared with training) and creditmix_prepare.json (what was
done). eval_creditmix.py rebuilds the same validation split from the same --src, --features and --seed.
"""
import random
from collections import Counter
from pathlib import Path

import creditmix as cm
import cli
from fileio import check_output_file, sha256_file, user_errors, write_outputs


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # data
    p.add_argument("--src", required=True, help="seed JSON/JSONL, Kaggle CSV, or creditmix_labeled.jsonl")
    cm.add_split_args(p)
    # output
    p.add_argument("--outdir", default="data", help="folder for the creditmix_*.jsonl files")
    return p.parse_args(argv)


# What main() writes into --outdir: all of them or none.
OUTPUTS = ["creditmix_sft.jsonl", "creditmix_kd.jsonl", "creditmix_dpo.jsonl", "creditmix_val.jsonl",
           "creditmix_prepare.json"]


def training_files(train: list[dict], seed: int) -> dict[str, list[dict]]:
    """The README's three formats from the training rows; DPO's rejected is a wrong label."""
    rng = random.Random(seed)
    prompts = [cm.prompt_for(r["features"]) for r in train]
    return {
        "creditmix_sft.jsonl": [{"input": p, "output": r["label"]} for p, r in zip(prompts, train)],
        "creditmix_kd.jsonl": [{"input": p, "teacher_output": r["label"]} for p, r in zip(prompts, train)],
        "creditmix_dpo.jsonl": [{"prompt": p, "chosen": r["label"], "rejected": cm.wrong_label(r["label"], rng)}
                                for p, r in zip(prompts, train)],
    }


def main(args):
    out = Path(args.outdir)
    for name in OUTPUTS:  # before anything is read
        check_output_file(out / name)
    # load
    cols = cm.resolve_features(args.features)
    rows, report = cm.load_examples(args.src, cols)
    # run
    val, train = cm.split_balanced(rows, args.seed, args.val_per_class, args.val_frac, args.train_rows)
    files = training_files(train, args.seed)
    files["creditmix_val.jsonl"] = [{"input": cm.prompt_for(r["features"]), "output": r["label"],
                                     "features": r["features"]} for r in val]
    # save
    summary = {"src": str(args.src), "src_sha256": sha256_file(args.src), "features": cols, "seed": args.seed,
               "val_per_class": len(val) // len(cm.LABELS), "train_rows": args.train_rows,
               "train_counts": {c: sum(r["label"] == c for r in train) for c in cm.LABELS},
               "source_counts": dict(Counter(r["label"] for r in rows)), **report}
    write_outputs({**{out / name: recs for name, recs in files.items()}, out / "creditmix_prepare.json": summary})
    skipped = f", skipped {report['skipped_unknown_label']} rows with unknown Credit_Mix" if report else ""
    counts = summary["train_counts"]
    per_class = counts["Good"] if len(set(counts.values())) == 1 else ", ".join(f"{c} {n}" for c, n in counts.items())
    print(f"{len(rows)} labelled rows{skipped}; per class: {per_class} train, "
          f"{summary['val_per_class']} validation -> {', '.join(str(out / n) for n in files)}")
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
