"""Write IDP training and evaluation files: SFT {"input","output"}, KD {"input","teacher_output"}, DPO {"prompt",
"chosen","rejected"} from the train split, and a test file {"id","document","gold"} from the test split, plus the
JSON Schema the prompts show. Sources: SROIE receipts, FUNSD forms, any {"document"|"text","gold"} JSONL with your
own --schema, or --synthetic invoices (the README's data/idp_*.jsonl samples).

    python idp_prepare.py --synthetic --outdir data
    python idp_prepare.py --src ../shared/data/idp/sroie.jsonl --outdir data
    python idp_prepare.py --src my_docs.jsonl --schema my_schema.json --outdir data --prefix my_idp

The `input` is idp.idp_user_message(schema, document), the exact user turn infer_idp.py and eval_idp.py send, and
every target is json_grammar.canonical_json (compact, the schema's key order: the order the grammar generates).
A KD `teacher_output` is the gold JSON until you have a teacher's. A DPO `rejected` is the gold made wrong: a value
taken from another document, a required field dropped, the JSON cut off, or the JSON wrapped in chatter.
"""
import calendar
import datetime as dt
import random
from pathlib import Path

import cli
import fileio
import idp
import json_grammar as jg

SROIE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Receipt (SROIE fields)",
    "type": "object",
    "properties": {
        "company": {"type": "string", "description": "name of the company that issued the receipt, as printed"},
        "date": {"type": "string", "description": "date of the receipt, as printed"},
        "address": {"type": ["string", "null"],
                    "description": "the company's address as printed, lines joined with a space; null if absent"},
        "total": {"type": "string", "description": "total amount paid, digits as printed, without currency"},
    },
    "required": ["company", "date", "address", "total"],
    "additionalProperties": False,
}

FUNSD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Form key-value pairs (FUNSD)",
    "type": "object",
    "properties": {
        "fields": {"type": "array", "description": "every question on the form with its answer, top to bottom",
                   "items": {"type": "object", "properties": {"question": {"type": "string"},
                                                              "answer": {"type": "string"}},
                             "required": ["question", "answer"], "additionalProperties": False}},
    },
    "required": ["fields"],
    "additionalProperties": False,
}

CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR"]
INVOICE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Invoice",
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "description": "invoice number as printed, without a leading '#'"},
        "date": {"type": "string", "format": "date", "description": "invoice date, YYYY-MM-DD"},
        "vendor": {"type": "string", "description": "name of the company that issued the invoice"},
        "total": {"type": "number", "description": "total amount due"},
        "currency": {"type": "string", "enum": CURRENCIES, "description": "ISO 4217 currency code"},
        "due_date": {"type": "string", "format": "date", "description": "payment due date, YYYY-MM-DD, if stated"},
        "line_items": {
            "type": "array", "description": "one entry per billed line; empty if the invoice lists none",
            "items": {"type": "object",
                      "properties": {"description": {"type": "string"}, "quantity": {"type": "number"},
                                     "unit_price": {"type": ["number", "null"]}, "amount": {"type": "number"}},
                      "required": ["description", "quantity", "unit_price", "amount"],
                      "additionalProperties": False}},
    },
    "required": ["invoice_number", "date", "vendor", "total", "currency", "line_items"],
    "additionalProperties": False,
}


def parse_args(argv=None):
    ap = cli.parser(__doc__.split("\n\n")[0])
    # data
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="sroie.jsonl, funsd.jsonl (../shared/data/idp/) or a {document|text, gold} JSONL")
    src.add_argument("--synthetic", action="store_true", help="generate synthetic invoices (data/idp_*.jsonl)")
    ap.add_argument("--dataset", default="auto", choices=["auto", "sroie", "funsd", "generic"],
                    help="how to read --src; auto: from the records' gold fields")
    ap.add_argument("--schema", help="JSON Schema for a generic --src (written to the outdir as <prefix>_schema.json)")
    ap.add_argument("--n", type=int, default=64, help="synthetic training documents")
    ap.add_argument("--n_test", type=int, default=16, help="synthetic test documents (another seed)")
    ap.add_argument("--seed", type=int, default=0, help="seed for synthetic documents and DPO corruptions")
    # output
    ap.add_argument("--outdir", default="data", help="folder for the written files")
    ap.add_argument("--prefix", help="file name prefix (default: idp for --synthetic, sroie_idp, funsd_idp, "
                                     "or the --src file's stem + _idp)")
    args = ap.parse_args(argv)
    if args.synthetic and (args.n < 2 or args.n_test < 0):
        ap.error("--n must be >= 2 and --n_test >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------------
# sources

def load_source(args) -> tuple[dict, list[dict], str, str]:
    """(schema, rows [{"id","split","document","gold"}], prefix, schema file name)."""
    placed = fileio.read_records_placed(args.src)  # [(place: "line N" of the file or "record N", record)]
    rows = [r for _, r in placed]
    kind = args.dataset
    if kind == "auto":
        g = rows[0].get("gold")
        kind = ("sroie" if isinstance(g, dict) and "company" in g else
                "funsd" if isinstance(g, dict) and "key_value_pairs" in g else "generic")
    out = []
    for n, (place, r) in enumerate(placed, 1):
        where = f"{args.src}: {place}"
        doc = idp.check_document(r.get("document", r.get("text")), where)
        gold = r.get("gold")
        if not isinstance(gold, dict):
            raise fileio.UserError(f"{where}: 'gold' must be a JSON object")
        if kind == "sroie":
            gold = {k: gold.get(k) for k in SROIE_SCHEMA["properties"]}  # the one receipt without address -> null
        elif kind == "funsd":
            gold = {"fields": [{"question": p["question"], "answer": p["answer"]}
                               for p in gold.get("key_value_pairs", [])]}
        out.append({"id": r.get("id", n), "split": r.get("split", "train"), "document": doc, "gold": gold})
    if kind == "generic":
        if not args.schema:
            raise fileio.UserError(f"{args.src}: not SROIE or FUNSD records: give the --schema their gold follows")
        schema = jg.load_schema(args.schema)
    else:
        schema = SROIE_SCHEMA if kind == "sroie" else FUNSD_SCHEMA
        jg.check_schema(schema, kind)
    validator = jg.make_validator(schema)
    for (place, _), r in zip(placed, out):
        err = next(iter(validator.iter_errors(r["gold"])), None)
        if err is not None:
            raise fileio.UserError(f"{args.src}: {place} (id {r['id']}): field 'gold' does not match the schema: "
                                   f"{err.message}")
    prefix = args.prefix or (f"{kind}_idp" if kind != "generic" else f"{Path(args.src).stem}_idp")
    return schema, out, prefix, f"{prefix.removesuffix('_idp')}_schema.json"


VENDORS = ["Bar LLC", "Acme Corp", "Northwind Traders", "Globex GmbH", "Initech Ltd", "Umbrella Supplies",
           "Stark Industries", "Wayne Enterprises", "Blue Harbor Consulting", "Kestrel Print & Copy",
           "Maple Leaf Logistics", "Sakura Design KK", "Zurich Precision AG", "Outback Tools Pty Ltd",
           "Mumbai Textiles Pvt Ltd", "Fjord Fisheries AS", "Café Lumière SARL", "Osaka Electronics"]
ITEMS = ["Consulting hours", "Website hosting (monthly)", "Printer paper A4", "Office chairs", "Software licence",
         "Delivery fee", "Design work", "USB-C cables", "Catering", "Translation services", "Maintenance visit",
         "Coffee beans 1kg", "Training workshop", "Cloud storage 1TB", "Legal review"]
SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}


def _date_text(d: dt.date, rng) -> str:
    style = rng.randrange(4)
    if style == 0:
        return d.isoformat()
    if style == 1:
        return f"{d.day} {calendar.month_abbr[d.month]} {d.year}"
    if style == 2:
        return f"{calendar.month_name[d.month]} {d.day}, {d.year}"
    return f"{d.day:02d}.{d.month:02d}.{d.year}"


def _money(x: float, cur: str, rng) -> str:
    s = f"{x:,.2f}" if rng.random() < 0.5 else f"{x:.2f}"
    if cur in SYMBOLS and rng.random() < 0.5:
        return f"{SYMBOLS[cur]}{s}"
    return f"{cur} {s}" if rng.random() < 0.7 else f"{s} {cur}"


def _price(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _num(x):
    """50.0 -> 50: the JSON a reader writes for a round amount."""
    return int(x) if x is not None and float(x).is_integer() else x


def synthetic_invoice(rng: random.Random, n: int) -> tuple[str, dict]:
    """One invented invoice: (document text, gold object). Amounts add up; dates print in several styles."""
    vendor, cur = rng.choice(VENDORS), rng.choice(CURRENCIES)
    number = rng.choice([f"INV{n + 1}", f"INV-{rng.randrange(1000, 99999):05d}", f"{rng.randrange(100, 9999)}",
                         f"A-{rng.randrange(2023, 2027)}-{rng.randrange(1, 999):03d}"])
    date = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(0, 365))
    due = date + dt.timedelta(days=rng.choice([14, 30, 45])) if rng.random() < 0.5 else None
    items = []
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        qty = rng.choice([1, 1, 2, 3, 5, 10])
        price = round(rng.choice([0.5, 1, 4.99, 12.5, 20, 45, 99.9, 150, 320]) * rng.choice([1, 1, 2]), 2)
        items.append({"description": rng.choice(ITEMS), "quantity": qty, "unit_price": price,
                      "amount": round(qty * price, 2)})
    total = round(sum(i["amount"] for i in items), 2) if items else float(rng.choice([50, 120, 89.5, 1200, 15.75]))
    if items and rng.random() < 0.3:
        items[-1]["unit_price"] = None  # printed without a unit price
    style = rng.randrange(3) if items else 0
    if style == 0:  # the README's one-liner
        doc = f"Invoice #{number} date {_date_text(date, rng)} from {vendor} total {_money(total, cur, rng)}."
        if items:
            listed = "; ".join(f"{i['quantity']} x {i['description']} {i['amount']:.2f}" for i in items)
            doc += f" Items: {listed}."
        if due:
            doc += f" Due {_date_text(due, rng)}."
    elif style == 1:  # a printed layout
        lines = [vendor.upper(), f"{rng.randrange(1, 300)} {rng.choice(['Main St', 'Harbour Rd', 'Ring 4'])}",
                 "", "INVOICE", f"Invoice No: {number}", f"Date: {_date_text(date, rng)}"]
        if due:
            lines.append(f"Due date: {_date_text(due, rng)}")
        lines += ["", "Description | Qty | Unit price | Amount"]
        lines += [f"{i['description']} | {i['quantity']} | {_price(i['unit_price'])} | {i['amount']:.2f}"
                  for i in items]
        lines += ["", f"TOTAL DUE: {_money(total, cur, rng)}", "Thank you for your business!"]
        doc = "\n".join(lines)
    else:  # an e-mail
        parts = ", ".join(f"{i['quantity']} x {i['description']} = {i['amount']:.2f}" for i in items)
        doc = (f"Hello,\nplease find attached invoice {number} from {vendor}, issued {_date_text(date, rng)}: {parts}. "
               f"Amount due: {_money(total, cur, rng)}" + (f", payable by {_date_text(due, rng)}." if due else ".")
               + "\nKind regards,\nAccounts team")
    if style != 1:  # only the printed layout shows unit prices
        for i in items:
            i["unit_price"] = None
    gold = {"invoice_number": number, "date": date.isoformat(), "vendor": vendor, "total": _num(total), "currency": cur}
    if due:
        gold["due_date"] = due.isoformat()
    gold["line_items"] = [{k: _num(v) if k != "description" else v for k, v in i.items()} for i in items]
    return doc, gold


# ----------------------------------------------------------------------------------------------------------------
# DPO corruptions

def _required_keys(schema: dict) -> list[str]:
    return list(schema.get("required", []))


def corrupt(gold: dict, schema: dict, pool: list[dict], rng: random.Random) -> tuple[str, str]:
    """(rejected text, kind): a plausible wrong answer for DPO. Kinds cycle through wrong_value (a field's value
    from another document: valid JSON, wrong content), missing_field (schema-invalid), truncated (invalid JSON) and
    chatty (JSON wrapped in prose and a fence, which strict parsing rejects)."""
    good = jg.canonical_json(gold, schema)
    kinds = ["wrong_value", "missing_field", "truncated", "chatty"]
    for kind in rng.sample(kinds, len(kinds)):
        if kind == "wrong_value":
            keys = [k for k, v in gold.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
            rng.shuffle(keys)
            for k in keys:
                others = [p[k] for p in pool if p.get(k) not in (None, gold[k]) and type(p.get(k)) is type(gold[k])]
                if others:
                    return jg.canonical_json({**gold, k: rng.choice(others)}, schema), kind
        elif kind == "missing_field":
            keys = [k for k in _required_keys(schema) if k in gold]
            if keys:
                k = rng.choice(keys)
                return jg.canonical_json({a: b for a, b in gold.items() if a != k}, schema), kind
        elif kind == "truncated" and len(good) > 8:
            return good[:rng.randrange(len(good) // 2, len(good) - 1)], kind
        elif kind == "chatty":
            return f"Sure! Here is the extracted data:\n```json\n{good}\n```", kind
    return good[:-1], "truncated"


def training_rows(schema: dict, rows: list[dict], rng: random.Random):
    golds = [r["gold"] for r in rows]
    sft, kd, dpo = [], [], []
    for r in rows:
        message = idp.idp_user_message(schema, r["document"])
        target = jg.canonical_json(r["gold"], schema)
        rejected, kind = corrupt(r["gold"], schema, golds, rng)
        sft.append({"id": r["id"], "input": message, "output": target})
        kd.append({"id": r["id"], "input": message, "teacher_output": target})
        dpo.append({"id": r["id"], "prompt": message, "chosen": target, "rejected": rejected, "rejected_kind": kind})
    return sft, kd, dpo


def main(args):
    out = Path(args.outdir)
    fileio.check_output_dir(out, "--outdir")  # the file names depend on the source; write_outputs checks each
    # load
    rng = random.Random(args.seed)
    if args.synthetic:
        schema, prefix, schema_name = INVOICE_SCHEMA, args.prefix or "idp", "idp_schema.json"
        jg.check_schema(schema, "invoice schema")
        train = [dict(zip(("document", "gold"), synthetic_invoice(rng, i)), id=f"synthetic-{i + 1:04d}")
                 for i in range(args.n)]
        test_rng = random.Random(args.seed + 1)
        test = [dict(zip(("document", "gold"), synthetic_invoice(test_rng, i)), id=f"synthetic-test-{i + 1:04d}")
                for i in range(args.n_test)]
        fileio.note("--synthetic: the invoices are invented by idp_prepare.py (demo data, not real documents)")
    else:
        schema, rows, prefix, schema_name = load_source(args)
        train = [r for r in rows if r["split"] == "train"]
        test = [r for r in rows if r["split"] == "test"]
        other = len(rows) - len(train) - len(test)
        if not train:
            raise fileio.UserError(f"{args.src}: no records with split 'train' to train on")
        if other:
            fileio.note(f"{other} records with a split other than train/test are left out")

    # run
    sft, kd, dpo = training_rows(schema, train, rng)
    test_rows = [{"id": r["id"], "document": r["document"], "gold": r["gold"]} for r in test]

    # save: all files or none
    files = {schema_name: schema, f"{prefix}_sft.jsonl": sft, f"{prefix}_kd.jsonl": kd, f"{prefix}_dpo.jsonl": dpo}
    if test_rows:
        files[f"{prefix}_test.jsonl"] = test_rows
    counts = fileio.write_outputs({out / name: obj for name, obj in files.items()})
    written = {name: counts[str(out / name)] for name in files}
    for name, n in written.items():
        print(f"{out / name}: {n} {'schema' if name.endswith('.json') else 'records'}")
    return written


if __name__ == "__main__":
    with fileio.user_errors():
        main(parse_args())
