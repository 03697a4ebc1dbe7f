"""CreditMix task helpers shared by creditmix_prepare.py, sft/kd/dpo data, infer, eval and the server: the prompt
template, the labels and content-free ("null") inputs, readers for the seed and Kaggle formats, the deterministic
balanced split that prepare and eval both rebuild, and the features as a table for the tree (creditmix_tree.py)."""
from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from fileio import UserError, need_file, read_records_placed, read_text

LABELS = ["Good", "Standard", "Bad"]
# The README's fixed-template classification ask ("Return only the label.").
TEMPLATE = ("Classify the customer's credit mix as Good, Standard or Bad.\n"
            "Customer: {features}\n"
            "Return only the label.")
# The README's six features, in its example's order (Kaggle column names).
README_FEATURES = ["Age", "Occupation", "Annual_Income", "Outstanding_Debt", "Credit_Utilization_Ratio",
                   "Payment_Behaviour"]
# Twenty cleaned features: every column but IDs, Name, SSN, Month, Type_of_Loan and the two targets
# (PROVENANCE.md's reference tree uses the same twenty).
RICH_FEATURES = ["Age", "Occupation", "Annual_Income", "Monthly_Inhand_Salary", "Num_Bank_Accounts",
                 "Num_Credit_Card", "Interest_Rate", "Num_of_Loan", "Delay_from_due_date", "Num_of_Delayed_Payment",
                 "Changed_Credit_Limit", "Num_Credit_Inquiries", "Outstanding_Debt", "Credit_Utilization_Ratio",
                 "Credit_History_Age", "Payment_of_Min_Amount", "Total_EMI_per_month", "Amount_invested_monthly",
                 "Payment_Behaviour", "Monthly_Balance"]
FEATURE_PRESETS = {"readme": README_FEATURES, "rich": RICH_FEATURES}
# Never in a prompt: personal data (Name, SSN) and the sibling target (Credit_Score).
FORBIDDEN = {"Name", "SSN", "Credit_Score", "Credit_Mix", "ID", "Customer_ID"}
# Content-free inputs for multi-null calibration (Zhao et al. 2021 use "N/A", "", "[MASK]"); the structured one
# keeps the feature layout so the prior also absorbs the template's pull.
NULL_FEATURES = ["N/A", "", "[MASK]", ", ".join(f"{c.replace('_', ' ')}: N/A" for c in README_FEATURES)]
# Values outside these ranges are the Kaggle set's injected noise (e.g. Age -500, Num_of_Loan -100): unknown.
PLAUSIBLE = {"Age": (14, 100), "Num_of_Loan": (0, 20), "Num_Bank_Accounts": (0, 20), "Num_Credit_Card": (0, 20),
             "Interest_Rate": (0, 40), "Num_of_Delayed_Payment": (0, 40), "Num_Credit_Inquiries": (0, 30),
             "Amount_invested_monthly": (0, 9999)}
UNKNOWN = "unknown"


TRAIN_ROWS = ("balanced", "all")


def add_split_args(p) -> None:
    """The flags that fix the held-out split: creditmix_prepare.py makes it, eval_creditmix.py rebuilds it from the
    same raw source with the same values."""
    p.add_argument("--features", default="readme",
                   help="Kaggle columns for the prompt: 'readme' (the README's six), 'rich' (twenty) or a "
                        "comma-separated list; ignored for the seed format")
    p.add_argument("--val_per_class", type=int, default=None,
                   help="validation rows per class (default: the whole balanced holdout if the source has one, "
                        "else --val_frac of the smallest class)")
    p.add_argument("--val_frac", type=float, default=0.1, help="validation share of the smallest class")
    p.add_argument("--seed", type=int, default=42, help="seed of the split and of DPO's rejected labels")
    p.add_argument("--train_rows", default="balanced", choices=TRAIN_ROWS,
                   help="training rows: 'balanced' (each class cut to the smallest one's count) or 'all' (every "
                        "training row, the source's label shares kept: eval_creditmix.py's fitted calibration "
                        "corrects the prior a student learns from them); validation is the same either way")


def prompt_for(features: str) -> str:
    return TEMPLATE.format(features=features)


def null_prompts() -> list[str]:
    return [prompt_for(f) for f in NULL_FEATURES]


def resolve_features(spec: str) -> list[str]:
    """--features: a preset (readme, rich) or a comma-separated list of Kaggle columns."""
    cols = FEATURE_PRESETS.get(spec) or [c.strip().replace(" ", "_") for c in spec.split(",") if c.strip()]
    bad = [c for c in cols if c in FORBIDDEN]
    if bad:
        raise UserError(f"--features: {', '.join(bad)} may not go into a prompt (personal data or a target)")
    unknown = [c for c in cols if c not in RICH_FEATURES + ["Type_of_Loan"]]
    if unknown:
        raise UserError(f"--features: unknown column(s) {', '.join(unknown)}; known: {', '.join(RICH_FEATURES)}")
    return cols


def clean_value(col: str, value) -> str:
    """Clean one Kaggle value: strip the injected underscores, map garbage and sentinels to 'unknown', round
    long floats (tokens are the cost)."""
    if value is None:
        return UNKNOWN
    v = str(value).strip().strip("_")
    if not v or v.startswith("!@") or re.fullmatch(r"-?3{10,}", v) or (col == "Amount_invested_monthly" and v == "10000"):
        return UNKNOWN
    try:
        x = float(v)
    except ValueError:
        return v
    lo, hi = PLAUSIBLE.get(col, (None, None))
    if lo is not None and not lo <= x <= hi:
        return UNKNOWN
    return str(int(x)) if x.is_integer() and "." not in v else f"{x:.2f}".rstrip("0").rstrip(".")


def features_text(row: dict, cols: list[str]) -> str:
    return ", ".join(f"{c.replace('_', ' ')}: {clean_value(c, row.get(c))}" for c in cols)


def load_examples(path, cols: list[str]) -> tuple[list[dict], dict]:
    """Read a source into rows {"features", "label", "split"}. Formats: the README's seed (JSON list or JSONL of
    {"question","answer"}), a Kaggle-style CSV (Credit_Mix '_' = unknown: skipped and counted), or its JSONL twin
    with `label` and `source_split` (creditmix_labeled.jsonl). Returns (rows, report counts)."""
    p = need_file(path, "data file")
    report = Counter()
    rows = []
    if p.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(p), newline=""))
        missing = [c for c in cols + ["Credit_Mix"] if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(missing)}")
        for r in reader:
            label = (r["Credit_Mix"] or "").strip()
            if label in ("", "_"):
                report["skipped_unknown_label"] += 1
                continue
            if label not in LABELS:  # reader.line_num: the file's line where this row ends
                raise UserError(f"{p}:{reader.line_num}: Credit_Mix '{label}' is not one of {', '.join(LABELS)}")
            rows.append({"features": features_text(r, cols), "label": label, "split": None})
        return _check_classes(rows, p), dict(report)
    recs = read_records_placed(p)  # [(place: "line N" of the file or "record N", record)]
    first = recs[0][1]
    if "question" in first or "answer" in first:
        for where, r in recs:
            for f in ("question", "answer"):
                if not isinstance(r.get(f), str) or not r[f].strip():
                    raise UserError(f"{p}: {where}: missing or empty field '{f}'")
            if r["answer"].strip() not in LABELS:
                raise UserError(f"{p}: {where}: answer '{r['answer']}' is not one of {', '.join(LABELS)}")
            rows.append({"features": r["question"].strip(), "label": r["answer"].strip(), "split": None})
    elif "label" in first:
        for where, r in recs:
            label = r.get("label")
            if label in (None, "", "_"):
                report["skipped_unknown_label"] += 1
                continue
            if label not in LABELS:
                raise UserError(f"{p}: {where}: label '{label}' is not one of {', '.join(LABELS)}")
            missing = [c for c in cols if c not in r]
            if missing:
                raise UserError(f"{p}: {where}: missing field '{missing[0]}'")
            rows.append({"features": features_text(r, cols), "label": label, "split": r.get("source_split")})
    else:
        raise UserError(f"{p}: line 1: expected fields 'question' and 'answer' (seed format) or Kaggle columns "
                        "with 'label'")
    return _check_classes(rows, p), dict(report)


def _check_classes(rows: list[dict], p: Path) -> list[dict]:
    counts = Counter(r["label"] for r in rows)
    empty = [c for c in LABELS if counts[c] == 0]
    if empty:
        raise UserError(f"{p}: class {', '.join(empty)} has no examples; every label needs some")
    return rows


def _rank(seed: int, row: dict) -> str:
    return hashlib.sha256(f"{seed}\x00{row['features']}\x00{row['label']}".encode()).hexdigest()


def split_balanced(rows: list[dict], seed: int, val_per_class: int | None = None, val_frac: float | None = None,
                   train_rows: str = "balanced"):
    """The held-out split prepare writes and eval rebuilds. Each class is ordered by a seeded hash of its content
    (independent of file order), validation takes the first N of each class, so a smaller N is a subset of a larger
    one. With a source split (Kaggle holdout), validation comes from the holdout only. Training never holds a
    validation prompt; it is balanced to the smallest class (per-class cap = min class count), or with
    train_rows="all" keeps every row (on the real twenty features the tree scores 0.939 from all 7,927 training rows
    against 0.929 from the balanced 5,766; on six, 0.654 against 0.677). Returns (val_rows, train_rows)."""
    has_split = any(r["split"] for r in rows)
    pool_val = [r for r in rows if r["split"] in ("holdout", "test", "val", "validation")] if has_split else rows
    by_class = defaultdict(list)
    for r in pool_val:
        by_class[r["label"]].append(r)
    for c in LABELS:
        by_class[c].sort(key=lambda r: _rank(seed, r))
    smallest = min(len(by_class[c]) for c in LABELS)
    if val_per_class is None:
        val_per_class = smallest if has_split else max(1, int(round(smallest * (val_frac or 0.1))))
    if val_per_class > smallest:
        small = min(LABELS, key=lambda c: len(by_class[c]))
        raise UserError(f"--val_per_class {val_per_class} is larger than class '{small}' "
                        f"({smallest} rows{' in the holdout' if has_split else ''})")
    val = [r for c in LABELS for r in by_class[c][:val_per_class]]
    val_prompts = {r["features"] for r in val}
    pool_train = [r for r in rows if r["split"] == "train"] if has_split else rows
    train_by_class = defaultdict(list)
    for r in pool_train:
        if r["features"] not in val_prompts:
            train_by_class[r["label"]].append(r)
    for c in LABELS:
        train_by_class[c].sort(key=lambda r: _rank(seed, r))
    cap = min(len(train_by_class[c]) for c in LABELS)
    if cap == 0:
        raise UserError("no training rows left for some class after holding out validation: lower --val_per_class")
    train = [r for c in LABELS for r in train_by_class[c][:cap if train_rows == "balanced" else None]]
    random.Random(seed).shuffle(train)
    return val, train


def wrong_label(label: str, rng: random.Random) -> str:
    return rng.choice([c for c in LABELS if c != label])


def label_scores(model, tok, user_prompts: list[str], batch_size: int = 16, progress: bool = False,
                 adapter_names: list[str] | None = None):
    """Raw label scores [N, 3] for CreditMix user prompts, each wrapped in the chat template (adapter_names: see
    scoring.raw_label_scores)."""
    from common import chat_prompt
    from scoring import raw_label_scores
    prompts = [chat_prompt(tok, u) for u in user_prompts]
    return raw_label_scores(model, tok, prompts, LABELS, batch_size=batch_size, progress=progress,
                            adapter_names=adapter_names)


def null_scores(model, tok, batch_size: int = 16):
    """Raw label scores of the content-free prompts: their mean is the multi-null prior."""
    return label_scores(model, tok, null_prompts(), batch_size)


# ----------------------------------------------------------------------------------------------------------------
# the tree: the reference a student has to beat, and a teacher (creditmix_tree.py)

def feature_values(text: str, cols: list[str]) -> list[str] | None:
    """The values of `cols` in a features text made by features_text (None where the text does not match)."""
    names = [re.escape(c.replace("_", " ")) for c in cols]
    m = re.fullmatch(", ".join(f"{n}: (.*?)" for n in names), text)
    return list(m.groups()) if m else None


def _number(col: str, value: str) -> float | None:
    """A value as a number (Credit_History_Age '16 Years and 3 Months' in months; 'unknown' is NaN), else None."""
    if value == UNKNOWN:
        return float("nan")
    if col == "Credit_History_Age":  # a duration or nothing: never a category
        m = re.fullmatch(r"(\d+) Years and (\d+) Months", value)
        return float(int(m[1]) * 12 + int(m[2])) if m else float("nan")
    try:
        return float(value)
    except ValueError:
        return None


def feature_matrix(texts: list[str], cols: list[str], categories: dict | None = None):
    """(X [rows, cols] float, categorical mask, categories) from features texts: numbers as numbers, 'unknown' as
    missing, every other column's values as category codes (from `categories`, made from these texts when None;
    a value not in them is missing). For scikit-learn's HistGradientBoostingClassifier."""
    import numpy as np
    values = []
    for i, t in enumerate(texts):
        v = feature_values(t, cols)
        if v is None:
            raise UserError(f"row {i + 1}: the features text does not list {', '.join(cols)} in order: {t[:120]!r}")
        values.append(v)
    if categories is None:
        categories = {}
        for j, c in enumerate(cols):
            if any(_number(c, v[j]) is None for v in values):
                categories[c] = sorted({v[j] for v in values if v[j] != UNKNOWN})
    codes = {c: {v: float(k) for k, v in enumerate(vals)} for c, vals in categories.items()}

    def cell(c, v):
        x = codes[c].get(v) if c in codes else _number(c, v)
        return np.nan if x is None else x
    X = np.array([[cell(c, v[j]) for j, c in enumerate(cols)] for v in values], dtype=float)
    return X, np.array([c in codes for c in cols]), categories


def tree(categorical, seed: int):
    """The reference classifier: gradient-boosted trees, class-balanced, the categorical columns as categories."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    return HistGradientBoostingClassifier(class_weight="balanced", categorical_features=categorical, random_state=seed)


def out_of_fold_probabilities(X, y, categorical, folds: int, seed: int):
    """Each row's class probabilities [rows, len(LABELS)] from a tree that did not train on it (stratified
    `folds`-fold cross-fitting): a teacher's targets on its own training rows that are not just the labels."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    return cross_val_predict(tree(categorical, seed), X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                             method="predict_proba")
