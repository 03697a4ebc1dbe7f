"""IDP helpers shared by infer_idp.py, eval_idp.py and idp_prepare.py: the one user message (schema + document +
instruction) that training rows and inference both use, document reading and fitting into the context, evaluation
records, and field-level metrics (exact match raw, normalised and canonical, micro/macro F1)."""
from __future__ import annotations

import datetime
import json
import re
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path

from common import chat_prompt
from fileio import UserError, note, read_records

INSTRUCTION = ("Extract the information from the document below as one JSON object that conforms to the JSON Schema. "
               "Reply with the JSON object only. Use null where the schema allows it and the document does not say.")


def add_decoding_args(ap, batch_help: str = "documents generated together") -> None:
    """The decoding flags infer_idp.py and eval_idp.py share (# run group)."""
    ap.add_argument("--max_new_tokens", type=int, default=512,
                    help="token budget of each reply; constrained JSON is always closed within it")
    ap.add_argument("--max_input_tokens", type=int, default=0,
                    help="prompt tokens allowed; a longer document is truncated at its end with a NOTE "
                         "(0 = model context minus --max_new_tokens)")
    ap.add_argument("--max_string_chars", type=int, default=256,
                    help="a string value is closed once it has this many characters, where the schema allows "
                         "(a soft bound kept by the decoder, not added to the schema; 0 = unbounded)")
    ap.add_argument("--max_items", type=int, default=32,
                    help="maxItems given to arrays without one, in the grammar only (0 = unbounded)")
    ap.add_argument("--batch_size", type=int, default=8, help=batch_help)
    ap.add_argument("--unconstrained", action="store_true",
                    help="plain greedy decoding without the grammar (output still validated), for comparison")


def check_decoding_args(ap, args) -> None:
    """The decoding flags' bounds (argparse's own error: usage and exit 2)."""
    for k in ("max_new_tokens", "batch_size"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1")


def schema_text(schema: dict) -> str:
    """The schema as the prompt shows it: compact, keys in the file's order (that order is the output's order)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def idp_user_message(schema: dict, document: str) -> str:
    """The user turn for one extraction: instruction, schema, document. idp_prepare.py writes it as the `input` of
    SFT/KD rows (and the `prompt` of DPO rows), infer_idp.py and eval_idp.py wrap it with common.chat_prompt, so a
    model is trained on exactly the prompt it is served."""
    return f"{INSTRUCTION}\n\nJSON Schema:\n{schema_text(schema)}\n\nDocument:\n{document}"


def read_document_file(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"document file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read document file {p} as UTF-8 text: {e}") from None
    return check_document(text, str(p))


def check_document(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: the document is empty")
    return text


def fit_document(tok, schema: dict, document: str, max_input_tokens: int, where: str = "document",
                 quiet: bool = False) -> tuple[str, bool]:
    """(document, truncated): the document cut at the end (with a NOTE unless quiet) so that the whole prompt fits
    max_input_tokens. Receipts and invoices put the fields that matter near the top; a user who needs the end
    should split the document."""
    def n_prompt(doc: str) -> int:
        return len(tok(chat_prompt(tok, idp_user_message(schema, doc)), add_special_tokens=False)["input_ids"])

    total = n_prompt(document)
    if total <= max_input_tokens:
        return document, False
    room = max_input_tokens - n_prompt("")
    if room <= 0:
        raise UserError(f"the prompt without any document already has {n_prompt('')} tokens, more than the "
                        f"{max_input_tokens} input tokens allowed: shorten the schema or raise --max_input_tokens")
    ids = tok(document, add_special_tokens=False)["input_ids"]
    keep = min(room, len(ids))
    while keep > 0:
        cut = tok.decode(ids[:keep])
        if n_prompt(cut) <= max_input_tokens:
            break
        keep -= max(1, (n_prompt(cut) - max_input_tokens))
    if not quiet:
        note(f"{where}: the prompt has {total} tokens, more than the {max_input_tokens} input tokens allowed; the "
             f"document is truncated to its first {keep} of {len(ids)} tokens", once=False)
    return tok.decode(ids[:keep]), True


def document_prompt(tok, schema: dict, document: str, max_input_tokens: int, where: str = "document",
                    quiet: bool = False) -> tuple[str, bool]:
    """(chat prompt, truncated): the extraction prompt for `document`, cut by fit_document to fit."""
    text, cut = fit_document(tok, schema, document, max_input_tokens, where, quiet)
    return chat_prompt(tok, idp_user_message(schema, text)), cut


# ----------------------------------------------------------------------------------------------------------------
# evaluation records

def _gold(r: dict, where: str):
    for k in ("gold", "output", "teacher_output", "chosen"):
        if k in r:
            g = r[k]
            if isinstance(g, str):
                try:
                    g = json.loads(g)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: field '{k}' is not a JSON string ({e.msg})") from None
            if not isinstance(g, dict):
                raise UserError(f"{where}: field '{k}' must be a JSON object (or a string holding one)")
            return g
    raise UserError(f"{where}: no gold answer: expected 'gold' (object), 'output' or 'teacher_output' (JSON string)")


def read_eval_records(path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Evaluation rows as [{"id", "document" or "message", "gold"}]. Accepted records: {"document"|"text", "gold"}
    (idp_prepare.py's test files, and ../shared/data/idp/sroie.jsonl itself with --split test), or SFT/KD/DPO rows
    whose `input`/`prompt` is already the user message and whose `output`/`teacher_output`/`chosen` is the gold."""
    rows = read_records(path)
    if split:
        if not any("split" in r for r in rows):
            raise UserError(f"{path}: --split {split} given but the records have no 'split' field")
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise UserError(f"{path}: no records with split '{split}'")
    if limit:
        rows = rows[:limit]
    out = []
    for n, r in enumerate(rows, 1):
        where = f"{path}: record {n}" + (f" (id {r['id']})" if "id" in r else "")
        rec = {"id": r.get("id", n), "gold": _gold(r, where)}
        if "document" in r or "text" in r:
            rec["document"] = check_document(r.get("document", r.get("text")), where)
        elif isinstance(r.get("input", r.get("prompt")), str) and r.get("input", r.get("prompt")).strip():
            rec["message"] = r.get("input", r.get("prompt"))
        else:
            raise UserError(f"{where}: expected a 'document' (or 'text') field, or an 'input' user message")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# field metrics

def leaves(obj, prefix: str = "") -> dict[str, list]:
    """Leaf values by field path: nested keys joined with '.', list positions collapsed to '[]' (line items are
    compared as multisets, whatever their order). Empty values (null, "") are no extraction and are left out."""
    out: dict[str, list] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            for f, vals in leaves(v, f"{prefix}.{k}" if prefix else str(k)).items():
                out.setdefault(f, []).extend(vals)
    elif isinstance(obj, list):
        for v in obj:
            for f, vals in leaves(v, f"{prefix}[]").items():
                out.setdefault(f, []).extend(vals)
    elif obj is not None and obj != "":
        out[prefix or "$"] = [obj]
    return out


MODES = ("raw", "normalized", "canonical")


def _text(v) -> str:
    return " ".join(unicodedata.normalize("NFKC", str(v)).split()).casefold()


def value_key(v, mode: str, field: str = "") -> str:
    """Raw: the JSON value as written ("50" and 50 differ). Normalised: strings NFKC, case-folded, whitespace
    collapsed; numbers as floats (50 == 50.0). Canonical: normalised, except that a date field's value that
    parse_date reads is its ISO date and an amount field's value that parse_amount reads is its decimal (see
    canonical_value); field is the leaf path, e.g. "date" or "line_items[].amount"."""
    if mode == "raw":
        return json.dumps(v, ensure_ascii=False)
    if mode == "canonical":
        c = canonical_value(v, field)
        if c is not None:
            return c
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(float(v))
    return _text(v)


def field_kind(field: str) -> str | None:
    """"date" for a field whose last name is or ends in 'date' (date, invoice_date); "amount" for one whose last name
    contains total, amount, price or tax (total, subtotal, line_items[].amount); else None."""
    name = field.rsplit(".", 1)[-1].replace("[]", "").casefold()
    if name.endswith("date"):
        return "date"
    if any(w in name for w in ("total", "amount", "price", "tax")):
        return "amount"
    return None


def canonical_value(v, field: str) -> str | None:
    """The canonical form of a date or amount field's value (ISO date, decimal), or None where the field is neither
    or the value does not parse unambiguously (it is then compared as normalised text)."""
    kind = field_kind(field)
    if kind == "date" and isinstance(v, str):
        return parse_date(v)
    if kind == "amount":
        return parse_amount(v)
    return None


# SROIE's receipts are Malaysian: day before month, two-digit years are 20YY. Hand-written rather than
# dateutil.parser because that guesses: it fills missing parts from a default date and swaps day and month where the
# day-first reading is invalid ("12/28/2017"), while the metric must leave anything it cannot read one way as text.
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                      "dec"), 1)}
_MONTH_NAMES = {**_MONTHS, "sept": 9, "january": 1, "february": 2, "march": 3, "april": 4, "june": 6, "july": 7,
                "august": 8, "september": 9, "october": 10, "november": 11, "december": 12}
_MON = "(?P<mon>" + "|".join(sorted(_MONTH_NAMES, key=len, reverse=True)) + r")\.?"
_YEAR = r"(?P<y>\d{4}|\d{2})"
_DATE_FORMATS = [re.compile(x) for x in (
    r"(?P<y>\d{4})(?P<sep>[-/.])(?P<m>\d{1,2})(?P=sep)(?P<d>\d{1,2})",  # 2018-12-25, 2018/02/22
    rf"(?P<d>\d{{1,2}})(?P<sep>[-/.])(?P<m>\d{{1,2}})(?P=sep){_YEAR}",  # 25/12/2018, 12-01-19, 11.02.18, 5/3/2018
    rf"(?P<d>\d{{1,2}})(?P<sep>[-/. ]?){_MON}(?P=sep) ?{_YEAR}",  # 25 DEC 2018, 24-MAR-2018, 02/JAN/2017, 28 MAR 18
    rf"{_MON} (?P<d>\d{{1,2}}),? {_YEAR}",  # OCT 3, 2016
    r"(?P<y>(?:19|20)\d\d)(?P<m>\d\d)(?P<d>\d\d)",  # 20180304
    r"(?P<d>\d\d)(?P<m>\d\d)(?P<y>(?:19|20)\d\d)",  # 25032018
)]


def parse_date(s: str) -> str | None:
    """s as an ISO date (YYYY-MM-DD) where it reads as exactly one calendar date under SROIE's convention (day first,
    two-digit years 20YY, ISO and year-first YYYY/MM/DD, English month names), else None. The whole string must be
    the date (one pair of enclosing parentheses allowed): "25/12/2018 10:30", "12/28/2017" (no 28th month) and
    "31/02/2018" give None. (Should two formats ever read one string as different dates, that is None too.)"""
    t = _text(s)
    if t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    found = set()
    for fmt in _DATE_FORMATS:
        m = fmt.fullmatch(t)
        if not m:
            continue
        g = m.groupdict()
        year = int(g["y"]) + (2000 if len(g["y"]) == 2 else 0)
        month = _MONTH_NAMES[g["mon"]] if g.get("mon") else int(g["m"])
        try:
            found.add(datetime.date(year, month, int(g["d"])))
        except ValueError:  # no such day or month
            pass
    return found.pop().isoformat() if len(found) == 1 else None


# a currency before or after the number, a sign before either; thousands separators only in the one reading that is
# unambiguous (1,234.50: comma groups of three followed by a decimal point); "1,234" and "12,50" are left as text
_AMOUNT = re.compile(r"(?P<s1>[-+]?) ?(?P<pre>rm|myr|\$)? ?(?P<s2>[-+]?) ?"
                     r"(?P<num>\d{1,3}(?:,\d{3})+\.\d+|\d+(?:\.\d+)?|\.\d+) ?(?P<post>rm|myr)?")


def parse_amount(v) -> str | None:
    """v as a decimal with two places ("RM 1,007.50" -> "1007.50", "$8.2" and 8.2 -> "8.20"; more places are kept:
    "9.005"), where it reads unambiguously as one amount (see _AMOUNT), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        t = repr(v)
        sign = ""
    elif isinstance(v, str):
        m = _AMOUNT.fullmatch(_text(v))
        if not m or (m["s1"] and m["s2"]) or (m["pre"] and m["post"]):
            return None
        t, sign = m["num"].replace(",", ""), m["s1"] or m["s2"]
    else:
        return None
    try:
        d = Decimal(t)
        if not d.is_finite():
            return None
        d = -d if sign == "-" else d
        q = d.quantize(Decimal("0.01"))
    except InvalidOperation:  # more digits than the context holds
        return None
    q = q if q == d else d
    return format(abs(q) if q == 0 else q, "f")


def _f1(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def field_metrics(preds: list, golds: list[dict]) -> dict:
    """Field-level scores of predicted objects (None or a non-object counts as no fields) against gold objects.
    Per field and document the values form a multiset: exact match = the multisets are equal (both empty counts),
    true positives = their intersection. Micro F1 pools all fields' counts; macro F1 averages the per-field F1 over
    fields that have a gold value somewhere. (Multiset matching per field, so counts are kept by hand rather than
    with scikit-learn's label-array F1.) Every score is given raw, normalised and canonical (see value_key);
    canonical_parsed counts, per date and amount field, the gold and predicted values canonical mode read as a
    date or amount."""
    if len(preds) != len(golds):
        raise ValueError("preds and golds differ in length")
    out = {"n": len(golds)}
    pred_leaves = [leaves(p) if isinstance(p, dict) else {} for p in preds]
    gold_leaves = [leaves(g) for g in golds]
    parsed: dict[str, dict[str, int]] = {}
    for side, docs in (("gold", gold_leaves), ("pred", pred_leaves)):
        for fields in docs:
            for f, vs in fields.items():
                if field_kind(f):
                    c = parsed.setdefault(f, {"gold": 0, "gold_values": 0, "pred": 0, "pred_values": 0})
                    c[side] += sum(canonical_value(v, f) is not None for v in vs)
                    c[f"{side}_values"] += len(vs)
    out["canonical_parsed"] = dict(sorted(parsed.items()))
    for mode in MODES:
        per = []
        for pl, gl in zip(pred_leaves, gold_leaves):
            per.append(({f: Counter(value_key(v, mode, f) for v in vs) for f, vs in pl.items()},
                        {f: Counter(value_key(v, mode, f) for v in vs) for f, vs in gl.items()}))
        gold_fields = sorted({f for _, gl in per for f in gl})
        all_fields = sorted(set(gold_fields) | {f for pl, _ in per for f in pl})
        counts = {f: [0, 0, 0] for f in all_fields}  # tp, n_pred, n_gold
        em = {f: 0 for f in gold_fields}
        doc_em = 0
        for pl, gl in per:
            for f in all_fields:
                pc, gc = pl.get(f, Counter()), gl.get(f, Counter())
                c = counts[f]
                c[0] += sum((pc & gc).values())
                c[1] += sum(pc.values())
                c[2] += sum(gc.values())
                if f in em and pc == gc:
                    em[f] += 1
            doc_em += all(pl.get(f, Counter()) == gl.get(f, Counter()) for f in all_fields)
        n = max(len(golds), 1)
        field_f1 = {f: _f1(*counts[f])[2] for f in gold_fields}
        tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
        p, r, f1 = _f1(tp, n_pred, n_gold)
        out.setdefault("field_exact_match", {})[mode] = {f: em[f] / n for f in gold_fields}
        out.setdefault("field_f1", {})[mode] = field_f1
        out.setdefault("exact_match", {})[mode] = sum(em.values()) / (n * len(gold_fields)) if gold_fields else 0.0
        out.setdefault("doc_exact_match", {})[mode] = doc_em / n
        out.setdefault("micro_precision", {})[mode] = p
        out.setdefault("micro_recall", {})[mode] = r
        out.setdefault("micro_f1", {})[mode] = f1
        out.setdefault("macro_f1", {})[mode] = sum(field_f1.values()) / len(field_f1) if field_f1 else 0.0
    return out


def load_extractor(args, schema: dict):
    """infer_idp.py's and eval_idp.py's model: (model, tok, model spec, grammar cache, compiled grammar, prompt
    token limit); no grammar with --unconstrained. A schema over json_grammar's limits (compile time and memory
    included) is a SchemaRefused naming args.schema: one line, exit 2."""
    import common
    import json_grammar as jg
    if not args.unconstrained:
        jg.start_worker()  # the compile worker imports xgrammar while the model loads
    model, tok, ms = common.load_model(args.model_dir, quantize=args.quantize,
                                       trust_remote_code=args.trust_remote_code,
                                       max_memory_gb=args.max_memory_gb)
    cache = grammar = None
    if not args.unconstrained:
        cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
        grammar = cache.compile(schema, args.max_items, where=str(args.schema))
    return model, tok, ms, cache, grammar, input_token_limit(model, tok, args.max_input_tokens, args.max_new_tokens)


def input_token_limit(model, tok, requested: int, max_new_tokens: int) -> int:
    """--max_input_tokens, or (0) the model's context minus max_new_tokens."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(tok, "model_max_length", None)
    if not context or context > 10**7:  # tokenizers without a limit report a huge sentinel
        context = 8192
        note(f"the model states no context length: assuming {context} tokens")
    if max_new_tokens >= context:
        raise UserError(f"--max_new_tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    limit = context - max_new_tokens
    if requested:
        if requested > limit:
            note(f"--max_input_tokens {requested} lowered to {limit} (context {context} - max_new_tokens "
                 f"{max_new_tokens})")
        return min(requested, limit)
    return limit
