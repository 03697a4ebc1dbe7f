"""json_grammar: schema checks, bounds, canonical JSON, the closing string, and the promise users rely on: with the
grammar, every reply validates against the schema within max_new_tokens, whatever the model prefers."""
import json

import pytest

import common
import fileio
import json_grammar as jg

NESTED = {
    "type": "object",
    "properties": {
        "vendor": {"type": "object", "properties": {"name": {"type": "string"},
                                                    "address": {"type": ["string", "null"]}},
                   "required": ["name", "address"]},
        "date": {"type": "string", "format": "date"},
        "total": {"type": "number"},
    },
    "required": ["vendor", "date", "total"],
}
ITEMS = {
    "type": "object",
    "properties": {
        "invoice": {"type": "string"},
        "line_items": {"type": "array", "items": {
            "type": "object", "properties": {"description": {"type": "string"}, "qty": {"type": "integer"},
                                             "price": {"type": ["number", "null"]}},
            "required": ["description", "qty", "price"], "additionalProperties": False}},
    },
    "required": ["invoice", "line_items"],
}
ENUMS = {
    "type": "object",
    "properties": {"currency": {"enum": ["USD", "EUR", "GBP"]}, "status": {"const": "paid"},
                   "paid": {"type": "boolean"}, "count": {"type": "integer", "minimum": 1, "maximum": 99}},
    "required": ["currency", "status", "paid", "count"],
}
OPTIONAL = {
    "type": "object",
    "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"anyOf": [{"type": "string"},
                                                                                   {"type": "null"}]},
                   "d": {"$ref": "#/$defs/money"}, "tags": {"type": "array", "items": {"type": "string"},
                                                             "minItems": 1}},
    "required": ["a", "tags"],
    "$defs": {"money": {"type": "object", "properties": {"amount": {"type": "number"},
                                                         "currency": {"type": "string", "maxLength": 3}},
                        "required": ["amount", "currency"]}},
}
SCHEMAS = {"nested": NESTED, "items": ITEMS, "enums": ENUMS, "optional": OPTIONAL}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = common.load_model(str(tiny_model_dir))
    return model, tok, jg.GrammarCache(tok, vocab_size=model.config.vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# schema checks

def test_supported_schemas_pass():
    for s in SCHEMAS.values():
        jg.check_schema(s)


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, ["'type'", "/properties/a"]),
    ({"type": "object", "required": "a"}, ["'required'", "the root"]),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}}, ["'maxLength'", "/properties/a"]),
])
def test_invalid_schema_names_keyword_and_path(schema, words):
    with pytest.raises(fileio.UserError, match="invalid JSON Schema") as e:
        jg.check_schema(schema)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("extra, word", [
    ({"not": {"type": "null"}}, "'not'"),
    ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, "'if'"),
    ({"dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
    ({"propertyNames": {"pattern": "^a"}}, "'propertyNames'"),
    ({"maxProperties": 1}, "'maxProperties'"),
    ({"properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems'"),
    ({"properties": {"a": {"type": "array", "contains": {"const": 1}}}}, "'contains'"),
    ({"properties": {"a": {"$ref": "https://example.com/a.json"}}}, "$ref"),
    ({"properties": {"a": {"type": "string", "format": "iri"}}}, "format 'iri'"),
    ({"properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}}}, "'oneOf'"),
    ({"properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 2}]}}}, "'allOf'"),
    ({"properties": {"a": {"type": "string", "pattern": "^a+$", "maxLength": 3}}}, "'pattern'"),
    ({"properties": {"a": {"type": "number", "multipleOf": 0.5}}}, "'multipleOf'"),
    ({"properties": {"a": {"type": "string"}}, "required": ["a", "b"]}, "'required'"),
    ({"unevaluatedProperties": {"type": "string"}}, "'unevaluatedProperties'"),
])
def test_unsupported_keywords_are_refused_with_their_path(extra, word):
    schema = {"type": "object", **extra}
    with pytest.raises(fileio.UserError) as e:
        jg.check_schema(schema)
    assert word in str(e.value)


def test_root_must_be_an_object():
    with pytest.raises(fileio.UserError, match="root must be an object"):
        jg.check_schema({"type": "array", "items": {"type": "string"}})


def test_unknown_keyword_is_a_note(capsys):
    jg.check_schema({"type": "object", "properties": {"a": {"type": "string", "x-label": "A"}}}, "s.json")
    assert "unknown keyword 'x-label' at /properties/a is ignored" in capsys.readouterr().err


def test_load_schema_errors(tmp_path):
    with pytest.raises(fileio.UserError, match="not found"):
        jg.load_schema(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n "properties": }')
    with pytest.raises(fileio.UserError, match=r"bad.json:2: invalid JSON"):
        jg.load_schema(bad)


# ----------------------------------------------------------------------------------------------------------------
# bounds and canonical form

def test_grammar_schema_bounds_only_unbounded_values():
    s = {"type": "object", "properties": {
        "free": {"type": "string"}, "short": {"type": "string", "maxLength": 5},
        "date": {"type": "string", "format": "date"}, "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "cur": {"type": "string", "enum": ["USD"]}, "n": {"type": ["number", "null"]},
        "pos": {"type": "integer", "minimum": 0}, "list": {"type": "array", "items": {"type": "string"}}}}
    g = jg.grammar_schema(s, max_items=7)
    p = g["properties"]
    assert "maxLength" not in p["free"] and p["short"]["maxLength"] == 5  # strings are bounded by the decoder
    assert "format" not in p["date"] and p["date"]["pattern"] == jg.FORMAT_PATTERNS["date"]
    assert p["code"]["pattern"] == "^[A-Z]{3}$" and p["cur"] == {"type": "string", "enum": ["USD"]}
    assert p["n"]["minimum"] == -jg.NUMBER_BOUND and p["n"]["maximum"] == jg.NUMBER_BOUND
    assert p["pos"]["minimum"] == 0 and p["pos"]["maximum"] == jg.NUMBER_BOUND
    assert p["list"]["maxItems"] == 7
    assert s["properties"]["date"] == {"type": "string", "format": "date"}  # the user's schema is left alone


def test_canonical_json_follows_schema_order_compactly():
    obj = {"total": 5, "line_items": [{"price": None, "qty": 2, "description": "é"}], "invoice": "A", "zz": 1}
    assert jg.canonical_json(obj, ITEMS) == \
        '{"invoice":"A","line_items":[{"description":"é","qty":2,"price":null}],"total":5,"zz":1}'
    via_ref = {"d": {"currency": "EUR", "amount": 1}, "a": "x"}
    assert jg.canonical_json(via_ref, OPTIONAL) == '{"a":"x","d":{"amount":1,"currency":"EUR"}}'


def test_check_output():
    v = jg.make_validator(NESTED)
    good = '{"vendor":{"name":"A","address":null},"date":"2025-01-31","total":3}'
    assert jg.check_output(good, v)["schema_valid"]
    assert jg.check_output(f"```json\n{good}\n```", v)["schema_valid"]
    cut = jg.check_output(good[:20], v)
    assert not cut["json_valid"] and not cut["schema_valid"] and "not JSON" in cut["error"]
    wrong = jg.check_output(good.replace("2025-01-31", "31/01/2025"), v)
    assert wrong["json_valid"] and not wrong["schema_valid"] and "/date" in wrong["error"]
    assert not jg.check_output("Here you go: " + good, v)["json_valid"]


# ----------------------------------------------------------------------------------------------------------------
# the closing string

@pytest.mark.parametrize("name, prefix", [
    ("nested", ""), ("nested", '{"vendor":{"name":"Ac'), ("nested", '{"vendor":{"name":"A","address":nu'),
    ("nested", '{"vendor":{"name":"A","address":null},"date":"20'), ("nested", '{"vendor":{"name":"A\\'),
    ("items", '{"invoice":"x","line_items":[{"description":"a","qty":12'),
    ("items", '{"invoice":"x","line_items":[{"description":"a","qty":1,"price":-'),
    ("enums", '{"currency":"E'), ("enums", '{"currency":"USD","status":"paid","paid":tr'),
    ("optional", '{"a":"x","b":3'), ("optional", '{"a":"x","d":{"amount":1.'),
])
def test_closing_string_completes_any_prefix(tiny, name, prefix):
    import xgrammar as xgr
    _, _, cache = tiny
    g = cache.compile(SCHEMAS[name], 8)
    m = xgr.GrammarMatcher(g.compiled)
    assert m.accept_string(prefix)
    close = jg.closing_string(m, jg.lex(jg.LEX0, prefix))
    doc = json.loads(prefix + close)
    assert not list(jg.make_validator(SCHEMAS[name]).iter_errors(doc))
    ids = cache.ids(close)
    assert b"".join(cache.vocab_bytes[i] for i in ids) == close.encode()


# ----------------------------------------------------------------------------------------------------------------
# constrained generation with a random model: valid whatever the model prefers, within the budget

class Bias:
    """A logits processor that adds `strength` to the scores of token ids `ids`."""

    def __init__(self, ids: list[int], strength: float):
        self.ids, self.strength = ids, strength

    def __call__(self, input_ids, scores):
        scores[:, self.ids] += self.strength
        return scores


def _bias_processor(tok, text: str, strength: float = 30.0):
    """Makes the model love the tokens of `text` (digits, letters, brackets): the grammar and the budget guard must
    still deliver a valid document."""
    return Bias(sorted({i for ch in text for i in tok.encode(ch, add_special_tokens=False)}), strength)


def _generate(model, tok, cache, grammar, prompts, max_new_tokens, bias=None, max_string_chars=0):
    import torch
    from transformers import LogitsProcessorList
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    proc = jg.BudgetJsonProcessor(cache, grammar, len(prompts), max_new_tokens, max_string_chars)
    procs = ([bias] if bias else []) + [proc]
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList(procs))
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    texts = []
    for ids in new:
        assert tok.eos_token_id in ids, "a row was cut off by max_new_tokens"
        texts.append(tok.decode(ids[:ids.index(tok.eos_token_id) + 1], skip_special_tokens=True))
    return texts, proc


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("bias", [None, "0123456789", "abcdefgh ", "[{,"])
def test_constrained_output_validates_whatever_the_model_prefers(tiny, name, bias):
    model, tok, cache = tiny
    schema = SCHEMAS[name]
    g = cache.compile(schema, 32)
    v = jg.make_validator(schema)
    prompts = [common.chat_prompt(tok, f"doc {i}: Invoice {i * 7} total {i}.50 EUR") for i in range(3)]
    for budget in (g.min_tokens, g.min_tokens + 3, 48):
        texts, proc = _generate(model, tok, cache, g, prompts, budget, _bias_processor(tok, bias) if bias else None,
                                max_string_chars=12)
        for t in texts:
            r = jg.check_output(t, v)
            assert r["schema_valid"], (budget, t, r["error"])
            assert len(tok.encode(t, add_special_tokens=False)) < budget + 1


def test_generate_helper_batches_and_keeps_order(tiny):
    model, tok, cache = tiny
    g = cache.compile(ITEMS, 4)
    prompts = [common.chat_prompt(tok, "x" * n) for n in (5, 200, 40, 1)]
    res, stats = jg.generate(model, tok, prompts, max_new_tokens=40, batch_size=3, grammar=g, cache=cache)
    v = jg.make_validator(ITEMS)
    assert len(res) == 4 and all(jg.check_output(r["text"], v)["schema_valid"] and r["ended"] for r in res)
    alone, _ = jg.generate(model, tok, prompts[1:2], max_new_tokens=40, batch_size=1, grammar=g, cache=cache)
    assert alone[0]["text"] == res[1]["text"]  # left padding: a batched row decodes like the row alone
    assert stats["new_tokens"] == sum(r["new_tokens"] for r in res)


def test_budget_below_the_smallest_document_is_refused(tiny):
    model, tok, cache = tiny
    g = cache.compile(NESTED, 8)
    with pytest.raises(fileio.UserError, match="--max_new_tokens 3 is too small"):
        jg.BudgetJsonProcessor(cache, g, 1, 3)


def test_compile_is_cached_per_schema(tiny):
    _, _, cache = tiny
    a = cache.compile(ENUMS, 8)
    assert cache.compile(json.loads(json.dumps(ENUMS)), 8) is a
    assert cache.compile(ENUMS, 9) is not a


def test_uncompilable_pattern_is_a_user_error(tiny):
    _, _, cache = tiny
    with pytest.raises(fileio.UserError, match="cannot compile"):
        cache.compile({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a|b"}}}, 8)


def test_lex_counts_characters_and_escapes():
    assert jg.lex(jg.LEX0, '{"a":"xé\\"y') == (True, False, 5)  # x, é, \, ", y
    assert jg.lex(jg.LEX0, '{"a":"x\\') == (True, True, 2)
    assert jg.lex(jg.LEX0, '{"a":"x"') == (False, False, 0)


def _strings(obj):
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_string_values_stop_near_max_string_chars(tiny):
    model, tok, cache = tiny
    g = cache.compile(ITEMS, 8)
    prompts = [common.chat_prompt(tok, "Invoice 7")]
    bias = _bias_processor(tok, "abcdefghijklmnop")  # the model wants to write letters forever
    bounded, _ = _generate(model, tok, cache, g, prompts, 128, bias, max_string_chars=8)
    unbounded, _ = _generate(model, tok, cache, g, prompts, 128, bias, max_string_chars=0)
    assert max(len(s) for s in _strings(json.loads(bounded[0]))) <= 40  # 8 characters plus the last token
    assert max(len(s) for s in _strings(json.loads(unbounded[0]))) >= 60
    assert jg.check_output(bounded[0], jg.make_validator(ITEMS))["schema_valid"]


# ----------------------------------------------------------------------------------------------------------------
# bounds: hostile schemas are refused quickly with the status and the limit, never compiled without bounds

REQUIRED_SELF = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}


def _props(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


def _deep(levels: int) -> dict:
    s = {"type": "string"}
    for _ in range(levels):
        s = {"type": "object", "properties": {"a": s}}
    return s


@pytest.mark.parametrize("schema, status, limit, message", [
    (REQUIRED_SELF, 422, None, "no finite JSON satisfies the subschema at the root: it needs /properties/child, "
                               "which needs the root again"),
    ({"type": "object", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                        "required": ["next"]}},
      "properties": {"list": {"$ref": "#/$defs/n"}}}, 422, None, "no finite JSON satisfies the subschema at "
                                                                  "/properties/list"),
    ({"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}},
      "required": ["kids"]}, 422, None, "which needs /properties/kids/items"),
    (_props(10_000), 413, "max_properties", "the object at the root declares 10000 properties, more than the "
                                            "limit of 256 (max_properties)"),
    ({"type": "object", "properties": {f"o{j}": _props(200) for j in range(6)}}, 413, "max_total_properties",
     "1206 properties in all, more than the limit of 1000"),
    ({"type": "object", "properties": {"e": {"enum": list(range(5000))}}}, 413, "max_enum_values", "5000 values"),
    (_deep(100), 413, "max_depth", "201 levels deep, more than the limit of 32 (max_depth)"),
    ({"type": "object", "$defs": {"name": {"type": "string"}},
      "properties": {"a": {"$id": "https://example.com/sub.json", "type": "object",
                           "properties": {"n": {"$ref": "#/$defs/name"}}}}}, 422, None,
     "keyword '$id' at /properties/a is not supported below the root"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, 422, None,
     "$ref '#/$defs/missing' at /properties/a points to nothing"),
])
def test_hostile_schemas_are_refused_with_status_and_limit(schema, status, limit, message):
    with pytest.raises(jg.SchemaRefused) as e:
        jg.check_schema(schema, "s.json")
    assert (e.value.status, e.value.limit) == (status, limit)
    assert str(e.value).startswith("s.json: ") and message in str(e.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # optional recursion: {} is finite
    {"type": "object", "properties": {"c": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["c"]},
    {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]},
])
def test_recursion_with_a_finite_way_out_compiles(tiny, schema):
    _, _, cache = tiny
    g = cache.compile(schema, 4)
    assert not list(jg.make_validator(schema).iter_errors(json.loads(g.start_close)))


def test_deep_schema_file_is_refused_not_a_recursion_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"type": "object", "properties": {"a": ' * 10_000 + "{}" + "}}" * 10_000)
    with pytest.raises(jg.SchemaRefused, match=r"deep.json: .*limit is 32 levels, max_depth") as e:
        jg.load_schema(p)
    assert e.value.status == 413


def test_compile_worker_bounds_what_the_checks_miss(tiny, monkeypatch):
    """With the structural checks switched off, the required self-reference (xgrammar's jump-forward search grows
    without bound) and a slow compile are stopped by the worker's memory and time limits; the next compile works."""
    _, _, cache = tiny
    monkeypatch.setattr(jg, "check_schema", lambda *a, **k: None)
    with pytest.raises(jg.SchemaRefused, match=r"needs more than 256 MiB \(compile_memory_mb") as e:
        cache.compile(REQUIRED_SELF, 4, limits=jg.SchemaLimits(compile_memory_mb=256))
    assert (e.value.status, e.value.limit) == (413, "compile_memory_mb")
    jg.start_worker()
    worker = jg._WORKER.proc
    with pytest.raises(jg.SchemaRefused, match=r"takes more than 0.5 s \(compile_seconds\)") as e:
        cache.compile(_props(3000), 4, limits=jg.SchemaLimits(compile_seconds=0.5))
    assert (e.value.status, e.value.limit) == (413, "compile_seconds")
    assert worker.poll() is not None and jg._WORKER.proc is not worker  # killed, and the next one started
    assert cache.compile(ENUMS, 4).start_close.startswith('{"currency":')


def test_cancel_kills_the_compile(tiny, monkeypatch):
    import asyncio
    import threading
    import time
    _, _, cache = tiny
    monkeypatch.setattr(jg, "check_schema", lambda *a, **k: None)
    cache.compile(ENUMS, 5)  # the worker is up
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0, worker = time.monotonic(), jg._WORKER.proc
    with pytest.raises(jg.CompileCancelled):
        cache.compile(_props(3000), 5, cancel=cancel)
    assert time.monotonic() - t0 < 5 and worker.poll() is not None

    async def request_goes_away():
        task = asyncio.create_task(cache.compile_async(_props(3001), 5))
        await asyncio.sleep(0.5)
        while not jg._WORKER.ready:  # the restarted worker is importing xgrammar: wait until it compiles
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)
        proc = jg._WORKER.proc
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the thread sees the event within 50 ms
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        return proc
    assert asyncio.run(request_goes_away()).poll() is not None


def test_refusals_are_cached(tiny, monkeypatch):
    _, _, cache = tiny
    with pytest.raises(jg.SchemaRefused):
        cache.compile(REQUIRED_SELF, 6)
    monkeypatch.setattr(jg, "check_schema", lambda *a, **k: pytest.fail("checked again"))
    with pytest.raises(jg.SchemaRefused, match="no finite JSON"):
        cache.compile(REQUIRED_SELF, 6)
