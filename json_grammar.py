"""JSON Schema -> always-valid JSON from a transformers model: schema checks (meta-schema, then the keywords the
grammar enforces), xgrammar compilation with a per-schema cache, and greedy grammar-constrained batch generation
that also respects the token budget (a row that would run out of tokens is closed in time, never cut off).

Used by infer_idp.py, eval_idp.py and bench_idp.py; the IDP prompt and field metrics live in idp.py.

How the budget guard works (xgrammar alone only masks tokens; it cannot know that max_new_tokens is near):
every row keeps a *closing string*, the shortest-we-can-find text that turns its current prefix into a complete
document (computed on a forked xgrammar matcher: jump-forward strings plus a fixed preference list such as `"`,
`}`, `]`, `""`, `null`, `0`). Before a token is committed we check that after it the closing string (in tokens)
plus the stop token still fits the tokens left; if not, the row emits its current closing string instead, which
fitted at the previous step. By induction every row ends with a complete document within max_new_tokens, as long
as the empty document's closing string fits at the start (checked: a too-small budget is refused).
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import dataclass

from fileio import UserError, note

# ----------------------------------------------------------------------------------------------------------------
# which JSON Schema keywords are enforced

# Enforced by the grammar (xgrammar 0.2.8's JSON-schema converter, checked keyword by keyword against its EBNF).
SUPPORTED_KEYWORDS = {
    "type": "single type or a list, e.g. [\"string\", \"null\"]",
    "properties": "in schema order (the output keeps the declared property order)",
    "required": "names must be declared in properties",
    "additionalProperties": "false (default: undeclared keys are never generated), true or a schema",
    "patternProperties": "extra keys matching a regex",
    "items": "one schema for every item (use prefixItems for tuples)",
    "prefixItems": "tuple positions",
    "minItems": "", "maxItems": "",
    "enum": "", "const": "",
    "anyOf": "", "oneOf": "only when the branches have distinct types (it is generated as anyOf)",
    "allOf": "with a single subschema", "$ref": "local references only (#/$defs/..., #/definitions/...)",
    "minLength": "not together with pattern", "maxLength": "not together with pattern",
    "pattern": "regular expression (xgrammar's regex subset)",
    "format": "date, date-time, time, duration, email, hostname, ipv4, ipv6, uri, uri-reference, uri-template, "
              "uuid, json-pointer, relative-json-pointer",
    "minimum": "", "maximum": "", "exclusiveMinimum": "", "exclusiveMaximum": "",
    "multipleOf": "integers only",
    "unevaluatedProperties": "false only (what the grammar does anyway)",
    "unevaluatedItems": "false only",
}
SUPPORTED_FORMATS = {"date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                     "uri-reference", "uri-template", "uuid", "json-pointer", "relative-json-pointer"}
# Annotations: no effect on which documents are valid, so nothing to enforce.
ANNOTATIONS = {"$schema", "$id", "$comment", "$anchor", "$defs", "definitions", "title", "description", "default",
               "examples", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
               "contentSchema", "$vocabulary"}
# Refused: xgrammar ignores them silently (or only partly enforces them), so the output could violate the schema.
UNSUPPORTED_KEYWORDS = {
    "not": "ignored by the grammar", "if": "conditionals are ignored by the grammar", "then": "see if",
    "else": "see if", "dependentRequired": "ignored by the grammar", "dependentSchemas": "ignored by the grammar",
    "dependencies": "ignored by the grammar", "propertyNames": "ignored by the grammar",
    "minProperties": "not enforced", "maxProperties": "ignored by the grammar",
    "uniqueItems": "ignored by the grammar", "contains": "ignored by the grammar",
    "minContains": "not enforced", "maxContains": "not enforced", "additionalItems": "draft-07 tuples: use prefixItems",
    "$dynamicRef": "not supported", "$dynamicAnchor": "not supported", "$recursiveRef": "not supported",
    "$recursiveAnchor": "not supported",
}
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
            "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")


def _pointer(parts) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts) if parts else "the root"


def _nodes(schema, path=()):
    """Every subschema (dict) with its path, depth first."""
    if not isinstance(schema, dict):
        return
    yield schema, path
    for k in _SUB_MAP:
        if isinstance(schema.get(k), dict):
            for name, sub in schema[k].items():
                yield from _nodes(sub, path + (k, name))
    for k in _SUB_LIST:
        if isinstance(schema.get(k), list):
            for i, sub in enumerate(schema[k]):
                yield from _nodes(sub, path + (k, i))
    for k in _SUB_ONE:
        if isinstance(schema.get(k), dict):
            yield from _nodes(schema[k], path + (k,))


# ----------------------------------------------------------------------------------------------------------------
# bounds: every schema is checked against these before it compiles

class SchemaRefused(UserError):
    """A schema that is refused before (or while) it compiles. `status` says why, for an HTTP answer: 413 = over a
    size/complexity limit (`limit` names the SchemaLimits field; the message says how to get under it), 422 =
    invalid, unsatisfiable or unsupported, 503 = the compile worker cannot be started (retrying may help). A
    UserError, so a script prints it as one line and exits 2."""

    def __init__(self, message: str, status: int = 422, limit: str | None = None):
        super().__init__(message)
        self.status, self.limit = status, limit


class CompileCancelled(Exception):
    """GrammarCache.compile was cancelled (its `cancel` event was set): the worker was killed, nothing compiled."""


@dataclass(frozen=True)
class SchemaLimits:
    """What a schema may cost. The structural limits are checked in milliseconds before anything compiles; the
    compile itself runs in a worker process that is killed past compile_seconds or compile_memory_mb.
    Measured (smollm2 tokenizer, 2 cores): one object with 1,000 optional properties compiles in ~1.4 s, with
    2,000 in ~29 s (the cost grows faster than the count); data/idp_schema.json in ~0.02 s."""
    max_depth: int = 32               # nesting of JSON objects/arrays in the schema document itself
    max_nodes: int = 2000             # subschemas in total
    max_properties: int = 256         # declared properties of one object schema
    max_total_properties: int = 1000  # declared properties in the whole schema
    max_enum_values: int = 1000       # enum values in the whole schema
    compile_seconds: float = 10.0     # wall time of one compile (the worker is killed after it)
    compile_memory_mb: int = 2048     # address space one compile may add to the worker (RLIMIT_AS)
    max_grammar_mb: int = 256         # size of the compiled grammar (what a cache of them keeps in memory)


DEFAULT_LIMITS = SchemaLimits()


def _too_big(where: str, what: str, n, limits: SchemaLimits, field: str, fix: str) -> SchemaRefused:
    return SchemaRefused(f"{where}: {what} {n}, more than the limit of {getattr(limits, field)} ({field}): {fix}",
                         413, field)


def _json_depth(obj) -> int:
    """Nesting depth of JSON objects/arrays (iterative: any depth is measured without recursion)."""
    best, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            vals = o.values()
        elif isinstance(o, list):
            vals = o
        else:
            continue
        best = max(best, d)
        stack.extend((v, d + 1) for v in vals if isinstance(v, (dict, list)))
    return best


def load_schema(path, limits: SchemaLimits = DEFAULT_LIMITS) -> dict:
    """Read and check a JSON Schema file (UserError naming the file on any problem; SchemaRefused for the
    schema's content)."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise UserError(f"schema file not found: {p}")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SchemaRefused(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise SchemaRefused(f"{p}: the schema is nested too deep to read (the limit is {limits.max_depth} levels, "
                            f"max_depth): flatten it (move shared parts into $defs)", 413, "max_depth") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read schema {p}: {e}") from None
    check_schema(schema, where=str(p), limits=limits)
    return schema


def check_schema(schema, where: str = "schema", limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Refuse (SchemaRefused) a schema over a limit (413: depth, subschemas, properties, enum values), or one that
    is not valid JSON Schema (naming the keyword and its path), whose root is not an object, that uses a keyword
    the grammar cannot enforce, whose $ref the grammar and the validator could read differently (nested $id,
    unresolvable pointer), or that has a subschema no finite JSON satisfies (a required $ref cycle) (422).
    Unknown keywords (vendor extensions, typos) get a NOTE. Takes milliseconds; compiles nothing."""
    import jsonschema
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise SchemaRefused(f"{where}: a JSON Schema must be a JSON object")
    depth = _json_depth(schema)  # first: the checks below recurse
    if depth > limits.max_depth:
        raise _too_big(where, "the schema is nested (JSON objects/arrays)", f"{depth} levels deep", limits,
                       "max_depth", "flatten it (move shared parts into $defs and $ref them)")
    _check_size(schema, where, limits)
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    err = best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if err is not None:
        parts = list(err.path)
        kw = parts[-1] if parts and isinstance(parts[-1], str) else err.validator
        at = _pointer(parts[:-1] if parts and isinstance(parts[-1], str) else parts)
        raise SchemaRefused(f"{where}: invalid JSON Schema: keyword '{kw}' at {at}: {err.message}")
    types = schema.get("type")
    if types != "object" and types != ["object"]:
        raise SchemaRefused(f"{where}: the root must be an object schema (\"type\": \"object\"): IDP extracts one "
                            f"JSON object per document")
    for node, path in _nodes(schema):
        at = _pointer(path)
        for k, v in node.items():
            if k in UNSUPPORTED_KEYWORDS:
                raise SchemaRefused(f"{where}: keyword '{k}' at {at} is not supported ({UNSUPPORTED_KEYWORDS[k]}); "
                                    f"supported: {', '.join(sorted(SUPPORTED_KEYWORDS))}")
            if k not in SUPPORTED_KEYWORDS and k not in ANNOTATIONS:
                note(f"{where}: unknown keyword '{k}' at {at} is ignored")
        if node.get("format") is not None and node["format"] not in SUPPORTED_FORMATS:
            raise SchemaRefused(f"{where}: format '{node['format']}' at {at} is not supported; supported formats: "
                                f"{', '.join(sorted(SUPPORTED_FORMATS))}")
        ref = node.get("$ref")
        if ref is not None and not (ref == "#" or ref.startswith("#/")):
            raise SchemaRefused(f"{where}: $ref '{ref}' at {at} is not supported: only local references "
                                f"(#/$defs/...) can be compiled; inline the referenced schema")
        for k in ("unevaluatedProperties", "unevaluatedItems"):
            if k in node and node[k] is not False:
                raise SchemaRefused(f"{where}: keyword '{k}' at {at} is supported only as false")
        if "multipleOf" in node and node.get("type") != "integer":
            raise SchemaRefused(f"{where}: keyword 'multipleOf' at {at} is supported only with \"type\": \"integer\"")
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            raise SchemaRefused(f"{where}: keyword 'pattern' at {at} cannot be combined with minLength/maxLength "
                                f"(xgrammar ignores the lengths); put the length into the pattern")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise SchemaRefused(f"{where}: keyword 'allOf' at {at} is supported with a single subschema only; "
                                f"merge the subschemas")
        if isinstance(node.get("items"), list):
            raise SchemaRefused(f"{where}: keyword 'items' at {at} is a list (draft-07 tuple): use prefixItems")
        if isinstance(node.get("oneOf"), list):
            kinds = [b.get("type") if isinstance(b, dict) else None for b in node["oneOf"]]
            if any(not isinstance(t, str) for t in kinds) or len(set(kinds)) != len(kinds):
                raise SchemaRefused(f"{where}: keyword 'oneOf' at {at} is supported only when every branch has its own "
                                    f"single \"type\"; use anyOf")
        missing = [r for r in node.get("required", []) if r not in node.get("properties", {})]
        if missing:
            raise SchemaRefused(f"{where}: keyword 'required' at {at} names {missing}, not declared in properties "
                                f"(the grammar would never generate them)")
        if "$id" in node and path:
            raise SchemaRefused(f"{where}: keyword '$id' at {at} is not supported below the root: it changes what "
                                f"a $ref inside it points to (the validator reads it, the grammar does not); "
                                f"remove it")
        if ref is not None and _deref(schema, ref) is None:
            raise SchemaRefused(f"{where}: $ref '{ref}' at {at} points to nothing (or to a non-schema): use a "
                                f"pointer such as #/$defs/name")
    _check_finite(schema, where)



def _check_size(schema: dict, where: str, limits: SchemaLimits) -> None:
    """Counts that bound the grammar's size (and its compile time, which grows faster than the properties of one
    object: see SchemaLimits). A part shared through $defs/$ref counts once."""
    nodes = total = enums = 0
    for node, path in _nodes(schema):
        nodes += 1
        props = node.get("properties")
        n = len(props) if isinstance(props, dict) else 0
        total += n
        if n > limits.max_properties:
            raise _too_big(where, f"the object at {_pointer(path)} declares", f"{n} properties", limits,
                           "max_properties", "split it into nested objects of fewer properties")
        if isinstance(node.get("enum"), list):
            enums += len(node["enum"])
    fix = "drop fields, or share repeated parts through $defs and $ref"
    if nodes > limits.max_nodes:
        raise _too_big(where, "the schema has", f"{nodes} subschemas", limits, "max_nodes", fix)
    if total > limits.max_total_properties:
        raise _too_big(where, "the schema declares", f"{total} properties in all", limits, "max_total_properties",
                       fix)
    if enums > limits.max_enum_values:
        raise _too_big(where, "the schema's enums list", f"{enums} values in all", limits, "max_enum_values",
                       "use a pattern (or a plain string) for long lists of values")


def _deref(root: dict, ref: str):
    """The subschema a local $ref ('#' or '#/json/pointer') points to, or None (nothing there, or not a schema)."""
    if ref == "#":
        return root
    target = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target if isinstance(target, (dict, bool)) else None


def _parts(node, root):
    """How a finite instance of `node` can exist: (must, alternatives, choices). It needs every subschema in
    `must`, every subschema of one entry of `alternatives` (one per type the node allows; None = no type
    restriction) and, when `choices` is not None, every subschema of one of them (anyOf/oneOf branches). What the
    grammar always generates counts: required properties, prefixItems positions, items up to minItems."""
    must = [_deref(root, node["$ref"])] if isinstance(node.get("$ref"), str) else []
    if isinstance(node.get("allOf"), list):
        must += node["allOf"]
    if "enum" in node or "const" in node:
        return must, None, None
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if types is None and ("properties" in node or "required" in node):
        types = ["object"]
    alts = None
    if types is not None:
        alts = []
        for t in types:
            if t == "object":
                props = node.get("properties") or {}
                alts.append([props[r] for r in node.get("required", []) if r in props])
            elif t == "array":
                prefix = node.get("prefixItems") or []
                extra = [node["items"]] if node.get("minItems", 0) > len(prefix) and "items" in node else []
                alts.append(list(prefix) + extra)
            else:
                alts.append([])
    choices = None
    for k in ("anyOf", "oneOf"):
        if isinstance(node.get(k), list):
            choices = [[b] for b in node[k]]
    return must, alts, choices


def _children(node, root):
    """Every subschema the grammar can enter from `node` (the $ref target included)."""
    out = []
    for k in ("properties", "patternProperties"):
        if isinstance(node.get(k), dict):
            out += node[k].values()
    for k in ("prefixItems", "anyOf", "oneOf", "allOf"):
        if isinstance(node.get(k), list):
            out += node[k]
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            out.append(node[k])
    if isinstance(node.get("$ref"), str):
        out.append(_deref(root, node["$ref"]))
    return [c for c in out if isinstance(c, (dict, bool))]


def _check_finite(schema: dict, where: str) -> None:
    """Refuse a schema in which some subschema the grammar can enter has no finite instance (a required property
    or minItems that leads back through $ref to itself, or to `false`): the grammar would force an infinite
    document, and xgrammar's search for the forced text (jump-forward) grows without bound."""
    paths = {id(n): p for n, p in _nodes(schema)}
    nodes = [n for n, _ in _nodes(schema)]
    fin: dict[int, bool] = {}

    def ok(sub) -> bool:
        return sub is True or (isinstance(sub, dict) and fin.get(id(sub), False))

    changed = True
    while changed:  # least fixpoint: a node is finite once what it needs is known to be finite
        changed = False
        for n in nodes:
            if fin.get(id(n)):
                continue
            must, alts, choices = _parts(n, schema)
            if (all(ok(c) for c in must) and (alts is None or any(all(ok(c) for c in a) for a in alts))
                    and (choices is None or any(all(ok(c) for c in a) for a in choices))):
                fin[id(n)] = changed = True
    seen, stack = set(), [schema]
    while stack:  # every subschema reachable from the root must be finite
        n = stack.pop()
        if isinstance(n, bool) or id(n) in seen:
            continue
        seen.add(id(n))
        if not ok(n):
            raise SchemaRefused(f"{where}: no finite JSON satisfies the subschema at {_pointer(paths.get(id(n), ()))}"
                                f": {_infinite_chain(n, schema, paths, ok)}; make a property on this chain optional "
                                f"(drop it from 'required'), allow null, or lower minItems")
        stack.extend(_children(n, schema))


def _infinite_chain(node, root, paths, ok) -> str:
    """Why `node` has no finite instance, as the chain of subschemas it needs: 'needs A, which needs B, ...'."""
    def name(n):
        return "`false`" if n is False else _pointer(paths.get(id(n), ()))
    out, seen = [], {id(node)}
    while isinstance(node, dict):
        must, alts, choices = _parts(node, root)
        group = next((c for c in must if not ok(c)), None)
        if group is None:
            for options in (alts, choices):
                bad = [next((c for c in a if not ok(c)), None) for a in options or []]
                if options and all(b is not None for b in bad):
                    group = bad[0]
                    break
        if group is None:
            break
        out.append(name(group))
        if id(group) in seen:
            out[-1] += " again"
            break
        seen.add(id(group))
        node = group
    return "it needs " + ", which needs ".join(out) if out else "nothing satisfies it"

# xgrammar's own regexes for these formats accept strings that jsonschema's format checks refuse (year 0000,
# 2025-02-31, an ipv4 octet 010), so the grammar gets exact patterns instead (leap years included).
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "date-time": f"^{_DATE}T{_TIME}$",
                   "ipv4": f"^{_OCTET}(?:\\.{_OCTET}){{3}}$"}

# Bound for numbers the schema leaves unbounded: |x| <= 1e15 stays exact in a float64 (2^53 ~ 9.007e15), and a
# bounded number also gets at most 6 decimals and no exponent in xgrammar's grammar.
NUMBER_BOUND = 10**15


def grammar_schema(schema: dict, max_items: int = 0, bound_numbers: bool = True) -> dict:
    """A copy of the schema for the grammar: exact patterns for the formats in FORMAT_PATTERNS, a maxItems on arrays
    and +-NUMBER_BOUND on numbers that have none (0/False = leave unbounded). The grammar's language stays a subset
    of the schema's, so its outputs stay valid; the bounds keep a runaway list or digit sequence from eating the
    token budget. Strings get no maxLength here: xgrammar's bounded strings cost up to ~2 ms per token mask
    (measured: 6 us unbounded) and allow no escapes, so the decoder bounds them instead (max_string_chars)."""
    out = copy.deepcopy(schema)
    for node, _ in _nodes(out):
        if node.get("format") in FORMAT_PATTERNS and "pattern" not in node:
            node["pattern"] = FORMAT_PATTERNS[node.pop("format")]
            node.pop("minLength", None), node.pop("maxLength", None)  # fixed by the pattern (xgrammar ignores them)
        types = node.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if bound_numbers and ("number" in types or "integer" in types) and "enum" not in node and "const" not in node:
            if "minimum" not in node and "exclusiveMinimum" not in node:
                node["minimum"] = -NUMBER_BOUND
            if "maximum" not in node and "exclusiveMaximum" not in node:
                node["maximum"] = NUMBER_BOUND
        if max_items and "array" in types and "maxItems" not in node:
            node["maxItems"] = max(max_items, node.get("minItems", 0))
    return out


def canonical_json(obj, schema: dict | None = None) -> str:
    """The one serialisation of targets and outputs: compact separators, UTF-8 kept, object keys in the schema's
    property order (the order the grammar generates them), undeclared keys after them, sorted."""
    return json.dumps(_order(obj, schema or {}, schema or {}), ensure_ascii=False, separators=(",", ":"))


def _resolve(node, root):
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
        target = root
        for part in [p for p in node["$ref"][1:].split("/") if p]:
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        node = target
    if isinstance(node, dict) and isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1:
        node = _resolve(node["allOf"][0], root)
    return node if isinstance(node, dict) else {}


def _branches(node, root):
    node = _resolve(node, root)
    subs = [node]
    for k in ("anyOf", "oneOf"):
        subs += [_resolve(b, root) for b in node.get(k, []) if isinstance(b, dict)]
    return subs


def _order(obj, node, root):
    subs = _branches(node, root)
    if isinstance(obj, dict):
        props = next((s["properties"] for s in subs if isinstance(s.get("properties"), dict)), {})
        keys = [k for k in props if k in obj] + sorted(k for k in obj if k not in props)
        return {k: _order(obj[k], props.get(k, {}), root) for k in keys}
    if isinstance(obj, list):
        arr = next((s for s in subs if "items" in s or "prefixItems" in s), {})
        prefix = arr.get("prefixItems", [])
        items = arr.get("items") if isinstance(arr.get("items"), dict) else {}
        return [_order(v, prefix[i] if i < len(prefix) else items, root) for i, v in enumerate(obj)]
    return obj


def make_validator(schema: dict):
    """A jsonschema validator for the user's schema, formats checked where jsonschema has a checker."""
    from jsonschema.validators import validator_for
    import jsonschema
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def check_output(text: str, validator) -> dict:
    """Parse and validate one reply: {"json": obj|None, "json_valid", "schema_valid", "error"}. A reply wrapped in a
    ```json fence (what unconstrained chat models often do) is unwrapped first; nothing else is forgiven."""
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return {"json": None, "json_valid": False, "schema_valid": False, "error": f"not JSON: {e.msg} at char {e.pos}"}
    from jsonschema.exceptions import best_match
    try:
        err = best_match(validator.iter_errors(obj))
    except Exception as e:  # a $ref jsonschema cannot resolve here (check_schema refuses the known cases)
        return {"json": obj, "json_valid": True, "schema_valid": False,
                "error": f"the validator failed on this schema: {type(e).__name__.lstrip('_')}: {str(e)[:300]}"}
    if err is not None:
        where = "/" + "/".join(map(str, err.path)) if err.path else "the root"
        return {"json": obj, "json_valid": True, "schema_valid": False,
                "error": f"violates the schema at {where}: {err.message}"}
    return {"json": obj, "json_valid": True, "schema_valid": True, "error": None}


# ----------------------------------------------------------------------------------------------------------------
# compilation

@dataclass
class CompiledSchema:
    compiled: object            # xgrammar.CompiledGrammar
    schema: dict                # the user's schema
    grammar_schema: dict        # with the injected bounds
    start_close: str            # the closing string of the empty prefix (the smallest valid document)
    min_tokens: int             # tokens the smallest valid document needs, stop token included
    compile_seconds: float


class GrammarCache:
    """Compiled grammars for one tokenizer, cached per (schema, bounds, limits), refusals included (a schema
    refused once is refused again at once). Compiling runs in the compile worker (see _CompileWorker): ~0.1 s
    for data/idp_schema.json on a 49k vocabulary, the transfer back included; matching is cheap."""

    def __init__(self, tok, vocab_size: int | None = None, stop_token_id: int | None = None, max_threads: int = 8):
        import hashlib
        import threading
        import xgrammar as xgr
        self.tok = tok
        self.stop_id = tok.eos_token_id if stop_token_id is None else stop_token_id
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size or len(tok),
                                                       stop_token_ids=[self.stop_id])
        self.vocab_size = self.info.vocab_size
        self.max_threads = max_threads
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._info_json = self.info.serialize_json()  # what the worker builds its compiler from
        self._info_key = hashlib.sha256(self._info_json.encode("utf-8")).hexdigest()
        self.vocab_bytes = self.info.decoded_vocab
        special = set(self.info.special_token_ids) | {self.stop_id}
        self._by_bytes = {b: i for i, b in enumerate(self.vocab_bytes) if b and i not in special}
        self._max_token_bytes = min(32, max((len(b) for b in self._by_bytes), default=1))
        self._ids_cache: dict[str, list[int]] = {}
        self._cache: dict[str, CompiledSchema | SchemaRefused] = {}
        self._lock = threading.Lock()
        q = self.ids('"')
        self.quote_id = q[0] if len(q) == 1 else None

    def compile(self, schema: dict, max_items: int = 0, *, limits: SchemaLimits = DEFAULT_LIMITS,
                where: str = "schema", cancel=None) -> CompiledSchema:
        """Check, bound and compile a schema: check_schema (the structural limits, milliseconds), then xgrammar's
        compile and the smallest document (the closing string of the empty prefix) in the compile worker, under
        limits.compile_seconds, compile_memory_mb and max_grammar_mb, then the same compile here (proved bounded).
        Raises SchemaRefused (status 413/422/503, the message starting with `where`); CompileCancelled when
        `cancel` (a threading.Event) is set meanwhile, which also kills the worker. Thread-safe."""
        import xgrammar as xgr
        from dataclasses import astuple
        key = json.dumps([schema, max_items, astuple(limits), where], sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
        if isinstance(hit, SchemaRefused):
            raise hit
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        try:
            check_schema(schema, where, limits)
            gschema = grammar_schema(schema, max_items)
            rep = _WORKER.compile(self._info_key, self._info_json, self.max_threads, json.dumps(gschema), limits,
                                  where, cancel)
            start = rep["start_close"]
            if start is None:
                raise SchemaRefused(f"{where}: cannot find a valid document of at most {CLOSING_CHARS} characters "
                                    f"for this schema (minItems/minLength too large, or a pattern that needs "
                                    f"non-ASCII characters): the token budget cannot be guaranteed")
            _check_smallest(schema, start, where)
            # Compiled again here: the worker's compile proved it finishes within the limits, and compiling takes
            # ~0.04 s for data/idp_schema.json where bringing the worker's grammar back takes ~0.6 s (its
            # serialize_json is 2.2 MB; 18 MB for 250 properties, 4 s) (measured on 2 cores).
            try:
                compiled = self.compiler.compile_json_schema(json.dumps(gschema), any_whitespace=False,
                                                             separators=(",", ":"), strict_mode=True)
            except RuntimeError as e:
                raise SchemaRefused(f"{where}: xgrammar cannot compile the schema: {_xgrammar_message(e)}") from None
        except SchemaRefused as e:
            if e.status != 503:  # a worker that could not start may start next time
                with self._lock:
                    self._cache[key] = e
            raise
        out = CompiledSchema(compiled, schema, gschema, start, len(self.ids(start)) + 1, time.perf_counter() - t0)
        with self._lock:
            self._cache[key] = out
        return out

    async def compile_async(self, schema: dict, max_items: int = 0, *, limits: SchemaLimits = DEFAULT_LIMITS,
                            where: str = "schema") -> CompiledSchema:
        """compile() off the event loop; cancelling the awaiting task (the request went away) kills the worker."""
        import asyncio
        import threading
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self.compile, schema, max_items, limits=limits, where=where,
                                           cancel=cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def ids(self, s: str) -> list[int]:
        """Token ids whose bytes spell exactly s: the tokenizer's own encoding when it round-trips (byte-level BPE),
        else a greedy longest match over the vocabulary's bytes (SentencePiece adds a leading space)."""
        if s in self._ids_cache:
            return self._ids_cache[s]
        ids = self.tok.encode(s, add_special_tokens=False)
        target = s.encode("utf-8")
        if b"".join(self.vocab_bytes[i] for i in ids if i < len(self.vocab_bytes)) != target:
            ids, i = [], 0
            while i < len(target):
                for n in range(min(self._max_token_bytes, len(target) - i), 0, -1):
                    t = self._by_bytes.get(target[i:i + n])
                    if t is not None:
                        ids.append(t)
                        i += n
                        break
                else:
                    raise UserError(f"the tokenizer cannot spell {target[i:i + 1]!r}")
        if len(self._ids_cache) < 100_000:
            self._ids_cache[s] = ids
        return ids


def _check_smallest(schema: dict, start: str, where: str) -> None:
    """The grammar's smallest document must validate: a schema that jsonschema reads differently from xgrammar
    (or cannot resolve) is refused here rather than failing on every output."""
    try:
        err = next(iter(make_validator(schema).iter_errors(json.loads(start))), None)
    except Exception as e:  # jsonschema/referencing errors (an unresolvable $ref, ...): the schema is the cause
        raise SchemaRefused(f"{where}: the validator cannot use this schema ({type(e).__name__.lstrip('_')}: "
                            f"{str(e)[:300]})") from None
    if err is not None:
        raise SchemaRefused(f"{where}: the grammar and the validator read this schema differently (the grammar's "
                            f"smallest document {start[:200]} fails validation: {err.message[:200]}); simplify "
                            f"the schema")


def _xgrammar_message(e: Exception) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return re.sub(r"^\[[^\]]*\] \S+: ", "", msg)  # drop xgrammar's "[time] file.cc:line: " prefix


WORKER_START_SECONDS = 120  # the worker imports xgrammar (and torch): ~2-3 s, longer on a loaded machine


class _CompileWorker:
    """One child process (per Python process) that compiles grammars, so that a compile that blows up in time or
    memory is killed without touching the caller: xgrammar's compile and its jump-forward search run in C++ and
    cannot be interrupted in-process. Requests and replies are JSON lines on the child's stdin/stdout. The
    worker proves that a compile finishes within the limits and finds the smallest document; the caller then
    compiles again in-process (see GrammarCache.compile: faster than bringing the grammar back). Compiles are
    serialised (one at a time); a killed worker is replaced at once. The child dies with its parent (it watches
    its parent pid) and has a CPU-time limit per compile as a backstop."""

    def __init__(self):
        import threading
        self.proc = None
        self.lock = threading.Lock()
        self.info_key = None  # the tokenizer the running worker has a compiler for
        self.ready = False
        self.chunks: list[bytes] = []

    def start(self) -> None:
        import subprocess
        import sys
        if self.proc is not None and self.proc.poll() is None:
            return
        env = dict(os.environ, MALLOC_ARENA_MAX="2",  # each thread's malloc arena reserves 64 MiB of RLIMIT_AS
                   PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                            os.environ.get("PYTHONPATH")])),
                   DISTILL_SLM_GRAMMAR_WORKER=str(os.getpid()))
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", "import json_grammar; json_grammar._worker_main()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        except OSError as e:
            raise SchemaRefused(f"the grammar compile worker cannot be started: {e}", 503) from None
        self.info_key, self.ready, self.chunks = None, False, []

    def restart(self) -> None:
        """Kill the worker and start the next one now: it imports xgrammar while nothing waits for it."""
        self.stop()
        try:
            self.start()
        except SchemaRefused:
            pass

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
        self.proc = None

    def _readline(self, deadline: float, cancel):
        """One reply line; None at EOF; "timeout" past the deadline; CompileCancelled when cancel is set."""
        import select
        fd = self.proc.stdout.fileno()
        while True:
            if self.chunks and b"\n" in self.chunks[-1]:
                data = b"".join(self.chunks)
                line, _, rest = data.partition(b"\n")
                self.chunks = [rest] if rest else []
                return line
            if cancel is not None and cancel.is_set():
                self.restart()
                raise CompileCancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            if select.select([fd], [], [], min(left, 0.05))[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return None
                self.chunks.append(chunk)

    def _send(self, req: dict, seconds: float, cancel):
        """Send one request, return its reply line (None: the worker died; "timeout")."""
        try:
            self.proc.stdin.write(json.dumps(req).encode("utf-8") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._readline(time.monotonic() + seconds, cancel)

    def _wait_lock(self, cancel) -> None:
        while not self.lock.acquire(timeout=0.05):
            if cancel is not None and cancel.is_set():
                raise CompileCancelled()

    def compile(self, info_key: str, info_json: str, threads: int, schema_json: str, limits: SchemaLimits,
                where: str, cancel=None) -> dict:
        """{"start_close": str | None, "seconds": compile time, "grammar_bytes": its size} of a compile that
        finished within the limits; SchemaRefused otherwise."""
        self._wait_lock(cancel)
        try:
            self.start()
            if not self.ready:
                line = self._readline(time.monotonic() + WORKER_START_SECONDS, cancel)
                if line is None or line == "timeout":
                    self.stop()
                    raise SchemaRefused(f"the grammar compile worker did not start within {WORKER_START_SECONDS} s"
                                        f" ({'it exited' if line is None else 'timed out'}); retry", 503)
                self.ready = True
            if self.info_key != info_key:  # a new tokenizer: the worker builds its compiler (not a compile's time)
                line = self._send({"info": info_json, "threads": threads}, WORKER_START_SECONDS, cancel)
                if line is None or line == "timeout":
                    self.restart()
                    raise SchemaRefused(f"the grammar compile worker could not load the tokenizer within "
                                        f"{WORKER_START_SECONDS} s ({'it exited' if line is None else 'timed out'});"
                                        f" retry", 503)
                self.info_key = info_key
            line = self._send({"schema": schema_json, "memory_mb": limits.compile_memory_mb,
                               "cpu_seconds": 2 * threads * limits.compile_seconds + 30},
                              limits.compile_seconds, cancel)
            if line == "timeout":
                self.restart()
                raise SchemaRefused(f"{where}: compiling the grammar takes more than {limits.compile_seconds:g} s "
                                    f"(compile_seconds): use fewer properties per object, shorter enums and "
                                    f"simpler patterns", 413, "compile_seconds")
            if line is None:
                code = self.proc.wait() if self.proc else None
                self.restart()
                raise SchemaRefused(f"{where}: compiling the grammar needs more than {limits.compile_memory_mb} MiB "
                                    f"(compile_memory_mb; the compile worker ended with code {code}): use fewer "
                                    f"properties per object, shorter enums and simpler patterns", 413,
                                    "compile_memory_mb")
            rep = json.loads(line)
            if rep.get("kind") == "memory":
                self.restart()
                raise SchemaRefused(f"{where}: compiling the grammar needs more than {limits.compile_memory_mb} MiB "
                                    f"(compile_memory_mb): use fewer properties per object, shorter enums and "
                                    f"simpler patterns", 413, "compile_memory_mb")
            if rep.get("kind") == "compile":
                raise SchemaRefused(f"{where}: xgrammar cannot compile the schema: {rep['error']}")
            if rep["grammar_bytes"] > limits.max_grammar_mb << 20:
                raise SchemaRefused(f"{where}: the compiled grammar takes {rep['grammar_bytes'] / 2**20:.0f} MiB, "
                                    f"more than the limit of {limits.max_grammar_mb} MiB (max_grammar_mb): use "
                                    f"fewer properties per object, shorter enums and simpler patterns", 413,
                                    "max_grammar_mb")
            return rep
        finally:
            self.lock.release()


_WORKER = _CompileWorker()  # process-wide, like the GPU: every GrammarCache shares it


def start_worker() -> None:
    """Start the compile worker now (it takes a few seconds to import xgrammar), e.g. while a model loads."""
    with _WORKER.lock:
        _WORKER.start()


def stop_worker() -> None:
    """Kill the compile worker (the next compile starts a new one); also done at exit."""
    with _WORKER.lock:
        _WORKER.stop()


def _worker_main() -> None:
    """The compile worker's loop (started by _CompileWorker): a request line {"info" (a serialized TokenizerInfo),
    "threads"} -> {"ready": true}; {"schema", "memory_mb", "cpu_seconds"} -> {"start_close", "seconds",
    "grammar_bytes"} or {"kind": "compile" | "memory", "error"}. Each compile may add memory_mb to the address space
    (RLIMIT_AS, set before and lifted after it); after running out of memory the worker exits, fresh state next."""
    import resource
    import sys
    import threading

    def watch_parent():  # die with the parent, even a SIGKILLed one (not PR_SET_PDEATHSIG: it fires when the
        while str(os.getppid()) == os.environ["DISTILL_SLM_GRAMMAR_WORKER"]:  # thread that started us exits)
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch_parent, daemon=True).start()
    import xgrammar as xgr
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed (by xgrammar's C++ too) goes to stderr, not into the replies
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    reply.write(b'{"ready": true}\n')
    reply.flush()
    compiler = None
    for line in sys.stdin.buffer:
        req = json.loads(line)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if "info" in req:  # a new tokenizer
            compiler = None
            compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(req["info"]),
                                           max_threads=req["threads"], cache_enabled=False)
            reply.write(b'{"ready": true}\n')
            reply.flush()
            continue
        try:
            room = _vm_bytes() + (req["memory_mb"] << 20)
            if soft == resource.RLIM_INFINITY or room < soft:
                resource.setrlimit(resource.RLIMIT_AS, (room, hard))
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            resource.setrlimit(resource.RLIMIT_CPU, (int(cpu.ru_utime + cpu.ru_stime + req["cpu_seconds"]) + 1,
                                                     resource.RLIM_INFINITY))  # a backstop if the parent hangs
            t0 = time.perf_counter()
            compiled = compiler.compile_json_schema(req["schema"], any_whitespace=False, separators=(",", ":"),
                                                    strict_mode=True)
            seconds = time.perf_counter() - t0
            start = closing_string(xgr.GrammarMatcher(compiled), LEX0)
            out = json.dumps({"start_close": start, "seconds": seconds, "grammar_bytes": compiled.memory_size_bytes})
        except MemoryError:
            out = json.dumps({"kind": "memory", "error": "MemoryError"})
        except RuntimeError as e:
            kind = "memory" if "bad_alloc" in str(e) else "compile"
            out = json.dumps({"kind": kind, "error": _xgrammar_message(e)})
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        reply.write(out.encode("utf-8") + b"\n")
        reply.flush()
        if '"kind": "memory"' in out[:40]:
            return


def _vm_bytes() -> int:
    """This process's address space now (what RLIMIT_AS counts)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# the closing string

# Outside a string: close what is open, else complete the value with the shortest literal, else open something.
_PREF_OUT = ["}", "]", ",", '""', "null", "0", "false", "[]", "{}", ":", '"', "[", "{"] + list("123456789-tfn")
# Inside a string: close it, else the characters formats and patterns need most (digits first).
_PREF_IN = ['"'] + list("0123456789") + [chr(c) for c in range(32, 127) if chr(c) not in '"0123456789']


LEX0 = (False, False, 0)


def lex(state: tuple[bool, bool, int], text) -> tuple[bool, bool, int]:
    """(inside a string, after a backslash, characters in the string so far) after `text` (str or UTF-8 bytes):
    enough JSON lexing to pick closers and to bound string lengths."""
    in_str, esc, n = state
    data = text.encode("utf-8") if isinstance(text, str) else text
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:  # quote
                in_str, n = False, 0
                continue
            if b & 0xC0 != 0x80:  # not a UTF-8 continuation byte: one more character
                n += 1
        elif b == 0x22:
            in_str, n = True, 0
    return in_str, esc, n


CLOSING_CHARS = 4096  # the longest closing string looked for (the smallest document included)


def closing_string(matcher, state: tuple[bool, bool, int], limit: int = CLOSING_CHARS) -> str | None:
    """Text that completes the matcher's prefix into a whole document (the matcher itself is not changed): forced
    text first (xgrammar's jump-forward string), then the first acceptable entry of a preference list. Not always
    the shortest completion, but deterministic and short; None if it gets longer than `limit` characters.
    Bounded: each step adds at least one character. What is not bounded here is one find_jump_forward_string call
    (xgrammar's C++) in a state that has no finite completion: it grows without end (22 GB in 86 s for a required
    self-reference). check_schema refuses every schema in which such a state can be reached (_check_finite), and
    the first closing string of a schema is computed in the compile worker, under its time and memory limits."""
    m = matcher.fork()
    out, n = [], 0
    while not m.is_completed():
        s = m.find_jump_forward_string()
        if not s:
            s = next((c for c in (_PREF_IN if state[0] else _PREF_OUT) if m.accept_string(c)), None)
            if s is None:
                return None
        elif not m.accept_string(s):
            return None
        out.append(s)
        state = lex(state, s)
        n += len(s)
        if n > limit:
            return None
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# constrained greedy generation

def _logits_processor_base():
    if os.environ.get("DISTILL_SLM_GRAMMAR_WORKER"):  # the compile worker never decodes: spare it transformers (~1 s)
        return object
    from transformers import LogitsProcessor
    return LogitsProcessor


class BudgetJsonProcessor(_logits_processor_base()):
    """Greedy, grammar-constrained and budget-safe decoding for a batch: one xgrammar matcher per row (the
    per-row logic of xgrammar.contrib.hf.LogitsProcessor, batched with BatchGrammarMatcher), plus the budget
    guard described at the top of this module. It picks each row's token itself (masked argmax, or the next
    closing token) and returns one-hot scores, so it must be the last processor and decoding must be greedy.
    Create one per generate() call."""

    def __init__(self, cache: GrammarCache, grammar: CompiledSchema, batch_size: int, max_new_tokens: int,
                 max_string_chars: int = 0):
        import xgrammar as xgr
        if grammar.min_tokens > max_new_tokens:
            raise UserError(f"--max_new_tokens {max_new_tokens} is too small: the smallest valid JSON for this "
                            f"schema already needs {grammar.min_tokens} tokens ({grammar.start_close})")
        self.cache, self.grammar, self.max_new_tokens = cache, grammar, max_new_tokens
        self.max_string_chars = max_string_chars
        self.matchers = [xgr.GrammarMatcher(grammar.compiled) for _ in range(batch_size)]
        self.lex = [LEX0] * batch_size
        self.close = [grammar.start_close] * batch_size
        self.forced: list[list[int]] = [[] for _ in range(batch_size)]
        self.chosen: list[int | None] = [None] * batch_size
        self.verify = [False] * batch_size  # the row's last token was a live choice (not padding after the end)
        self.budget_closed = [False] * batch_size
        self.bitmask = xgr.allocate_token_bitmask(batch_size, cache.vocab_size)
        # One thread per 16 rows (xgrammar's default pool is half the machine's threads): filling a row's mask takes
        # microseconds, less than waking a pool's threads. Measured on an H100 host (gpu/decode_split.py, batch 8):
        # 0.47 ms per step with the default pool of 8 threads, 0.11 ms with one.
        self.batch_matcher = xgr.BatchGrammarMatcher(max(1, min(-(-batch_size // 16), (os.cpu_count() or 2) // 2)))
        self.pinned = None  # on CUDA: a pinned buffer for the chosen ids
        self.step = 0
        self.seconds = 0.0  # time spent in this processor, waiting for the GPU included
        self.wait_seconds = 0.0  # of which waiting for the forward pass (plain decoding waits for it too)

    def _accept(self, i: int, token: int) -> None:
        m = self.matchers[i]
        if not m.accept_token(token):  # a forced closing token the grammar refuses: recompute from here
            close = closing_string(m, self.lex[i])
            self.forced[i] = self.cache.ids(close or "") + [self.cache.stop_id]
            token = self.forced[i].pop(0)
            if not m.accept_token(token):
                raise RuntimeError("grammar matcher refused its own closing string")
        self.lex[i] = lex(self.lex[i], self.cache.vocab_bytes[token])
        self.chosen[i] = token

    def _close_after(self, i: int, token: int, before, after) -> str | None:
        """Closing string after `token` (already accepted), with two shortcuts that spare most closing_string calls:
        a token that spells the start of the closing string (forced keys, separators, closing quotes) leaves the
        rest of it (the closer is a function of the matcher state, and these states lie on its own path); plain
        characters inside a string leave it unchanged as long as a quote is still accepted (checked, then undone)."""
        m, prev = self.matchers[i], self.close[i]
        tb = self.cache.vocab_bytes[token]
        pb = prev.encode("utf-8")
        if tb and pb.startswith(tb):
            try:
                return pb[len(tb):].decode("utf-8")
            except UnicodeDecodeError:  # the token ends inside a character: compute it
                return closing_string(m, after)
        if (before[:2] == (True, False) and after[:2] == (True, False) and b'"' not in tb and b"\\" not in tb
                and prev.startswith('"') and self.cache.quote_id is not None):
            if m.accept_token(self.cache.quote_id):
                m.rollback(1)
                return prev
        return closing_string(m, after)

    def __call__(self, input_ids, scores):
        import torch
        import xgrammar as xgr
        t0 = time.perf_counter()
        n = scores.shape[0]
        if n != len(self.matchers):
            raise RuntimeError(f"batch size {n} != {len(self.matchers)}: create one processor per generate() call")
        if scores.is_cuda and self.pinned is None:  # pinned host buffers: the uploads below are real async copies
            self.bitmask = self.bitmask.pin_memory()
            self.pinned = torch.empty((n, 1), dtype=torch.long).pin_memory()
        left = self.max_new_tokens - self.step  # tokens still allowed, this one included
        free = [i for i in range(n) if not self.matchers[i].is_terminated() and not self.forced[i]]
        if free:  # the grammar's CPU work first: it overlaps the forward pass that the GPU may still be running
            self.batch_matcher.batch_fill_next_token_bitmask([self.matchers[i] for i in free], self.bitmask,
                                                             indices=free)
            # Every row is masked (a row that is not free ignores its argmax): no per-step index tensor to upload,
            # and one compiled Triton kernel per batch size instead of one per number of free rows.
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device, non_blocking=True),
                                            vocab_size=self.cache.vocab_size)
            # the step's one wait for the GPU: the tokens chosen last step (to verify) and the masked argmax, in
            # one copy (a wait costs a launch-bound decode loop its CPU/GPU overlap)
            tw = time.perf_counter()
            got = torch.cat([input_ids[:, -1], scores.argmax(-1)]).tolist()
            last, best = got[:n], got[n:]
        else:
            tw = time.perf_counter()
            last, best = input_ids[:, -1].tolist(), []
        self.wait_seconds += time.perf_counter() - tw
        if self.step:
            for i in range(n):
                if self.verify[i] and last[i] != self.chosen[i]:
                    raise RuntimeError("another logits processor changed the grammar's token: "
                                       "BudgetJsonProcessor must be the last one, with greedy decoding")
        for i in range(n):
            m = self.matchers[i]
            self.verify[i] = not m.is_terminated()
            if m.is_terminated():
                self.chosen[i] = self.cache.stop_id
            elif self.forced[i]:
                self._accept(i, self.forced[i].pop(0))
            else:
                x, before = best[i], self.lex[i]
                if (self.max_string_chars and before[0] and not before[1] and before[2] >= self.max_string_chars
                        and self.cache.quote_id is not None and m.accept_token(self.cache.quote_id)):
                    m.rollback(1)  # a string at its soft length bound: close it where the grammar allows
                    x = self.cache.quote_id
                if not m.accept_token(x):  # every allowed token scored -inf by an earlier processor (min_new_tokens)
                    self.forced[i] = self.cache.ids(self.close[i]) + [self.cache.stop_id]
                    self._accept(i, self.forced[i].pop(0))
                    continue
                after = lex(before, self.cache.vocab_bytes[x])
                if m.is_terminated():
                    self.lex[i], self.chosen[i] = after, x
                    continue
                close = self._close_after(i, x, before, after)
                if close is not None and len(self.cache.ids(close)) + 1 <= left - 1:
                    self.lex[i], self.close[i], self.chosen[i] = after, close, x
                else:  # x would leave too few tokens to finish: emit the closing string that fits instead
                    m.rollback(1)
                    self.forced[i] = self.cache.ids(self.close[i]) + [self.cache.stop_id]
                    self.budget_closed[i] = True
                    self._accept(i, self.forced[i].pop(0))
        # one-hot scores, in place, so that greedy decoding takes self.chosen; the chosen ids go up without a wait
        # (from pinned memory, which the next step's wait above proves copied before it is written again)
        chosen = torch.tensor(self.chosen, dtype=torch.long).unsqueeze(1)
        if self.pinned is not None:
            chosen = self.pinned.copy_(chosen).to(scores.device, non_blocking=True)
        scores.fill_(float("-inf")).scatter_(1, chosen, 0.0)
        self.step += 1
        self.seconds += time.perf_counter() - t0
        return scores


def generate(model, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             grammar: CompiledSchema | None = None, cache: GrammarCache | None = None,
             max_string_chars: int = 0, progress=None, min_new_tokens: int = 0) -> tuple[list[dict], dict]:
    """Greedy generation for chat prompts (strings from common.chat_prompt), batched with left padding, longest
    prompts first. With a grammar every reply is a complete document of it, and a string value is closed once it
    reaches max_string_chars characters where the grammar allows it (0 = no bound). Returns (per prompt {"text",
    "new_tokens", "ended", "budget_closed"} in the input order, timing stats); `progress` (a tqdm) is advanced
    per prompt. "ended": the reply ended with a stop token (False = cut off by max_new_tokens). min_new_tokens
    (unconstrained only) makes every row run that long: bench_idp.py compares equal numbers of decoding steps."""
    import torch
    from transformers import LogitsProcessorList

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    stats = {"processor_seconds": 0.0, "processor_wait_seconds": 0.0, "generate_seconds": 0.0, "new_tokens": 0}
    eos = model.generation_config.eos_token_id
    stops = ({eos} if isinstance(eos, int) else set(eos or [])) | {tok.eos_token_id}
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=tok.pad_token_id)
            if min_new_tokens and grammar is None:
                kw["min_new_tokens"] = min_new_tokens
            proc = None
            if grammar is not None:
                proc = BudgetJsonProcessor(cache, grammar, len(idx), max_new_tokens, max_string_chars)
                kw["logits_processor"] = LogitsProcessorList([proc])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**enc, **kw)
            stats["generate_seconds"] += time.perf_counter() - t0
            stats["processor_seconds"] += proc.seconds if proc else 0.0
            stats["processor_wait_seconds"] += proc.wait_seconds if proc else 0.0
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for j, i in enumerate(idx):
                ids = new[j]
                n_new = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
                stats["new_tokens"] += n_new
                results[i] = {"text": tok.decode(ids[:n_new], skip_special_tokens=True), "new_tokens": n_new,
                              "ended": bool(ids) and ids[n_new - 1] in stops,
                              "budget_closed": bool(proc and proc.budget_closed[j])}
                if progress is not None:
                    progress.update(1)
    finally:
        tok.padding_side = side
    return results, stats
