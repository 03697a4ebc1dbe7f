"""Serve the CreditMix classifiers (and CodeGen / IDP models) over HTTP: FastAPI + uvicorn; one copy of each
distinct base model with the endpoints' LoRA adapters attached by name, loaded lazily; concurrent requests
micro-batched, the four CreditMix endpoints of one base in one mixed-adapter forward pass; an OpenAI-compatible API.

    uvicorn serve_creditmix:app --host 0.0.0.0 --port 8000
    MODEL_BASE=smollm2-135m MODEL_SFT=runs/creditmix_sft HF_HUB_OFFLINE=1 uvicorn serve_creditmix:app --host 127.0.0.1 --port 8000
    python serve_creditmix.py --host 127.0.0.1 --port 8000        # the same app, started by uvicorn.run

Endpoints: POST /infer/{base,sft,kd,dpo} {"features": "…"} -> the README's JSON (a list of strings -> a list of
answers); POST /generate/codegen; POST /extract/idp; GET /v1/models, POST /v1/chat/completions (OpenAI API, model =
an endpoint name); GET /health, /models, /metrics (Prometheus). docs/serving.md has the details. Configuration is
environment variables only (read once when the app is created; see ServeConfig.from_env): MODEL_BASE / MODEL_SFT /
MODEL_KD / MODEL_DPO / MODEL_CODEGEN / MODEL_IDP pick the model behind each endpoint (any spec models.resolve_model
takes: hub id, folder, run dir, .gguf, smollm2-135m); MICRO_BATCHING, BATCH_WAIT_MS, MAX_BATCH tune batching;
MIXED_ADAPTERS=0 runs one forward pass per adapter; STACKED_LORA=0 computes a mixed-adapter batch with PEFT's
own loop over the adapters instead of the stacked LoRA forward (compat.stacked_lora_batches);
API_KEY turns on bearer-token auth for everything but /health; the MAX_* variables are the limits.

How a request flows: validate (one clear 4xx message) -> the endpoint's model is loaded once (serving.ModelSlots:
its base once per distinct base model, its adapter attached by name; loads run one at a time on a loader thread;
a load failure is a 503 on that endpoint only, retried after LOAD_RETRY_S) -> token limits, measured with the
endpoint's tokenizer against the model's context (413) -> the items join the lane of their task and base
(serving.Lane: its own inference thread, so one task's long work does not hold up another's) -> each request gets
its slice. A client that disconnects has its items dropped, or its batch stopped within one forward pass if it was
the batch's last client. SIGTERM stops running batches within a forward pass and answers the waiting requests 503.

The task table (TASKS) says, per task, what a request is, what it answers, whether loading computes the multi-null
prior, and how one batch runs; create_app wires its routes.
"""
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

import cli
from models import DEFAULT_STUDENT
from fileio import UserError, user_errors
from serving import ApiError, Cancelled, ClientGone, Gate, Lane, Metrics, ModelSlots, error_response, model_call, \
    wait_unless_gone

log = logging.getLogger("uvicorn.error.serve_creditmix")

# endpoint name -> (task, environment variable, default model). The CreditMix defaults are the README's; the
# CodeGen / IDP ones are the README's training commands' --save_dir (runs/sft_code, runs/sft_idp).
ENDPOINTS = {
    "base": ("creditmix", "MODEL_BASE", DEFAULT_STUDENT),
    "sft": ("creditmix", "MODEL_SFT", "runs/creditmix_sft"),
    "kd": ("creditmix", "MODEL_KD", "runs/creditmix_kd"),
    "dpo": ("creditmix", "MODEL_DPO", "runs/creditmix_dpo"),
    "codegen": ("codegen", "MODEL_CODEGEN", "runs/sft_code"),
    "idp": ("idp", "MODEL_IDP", "runs/sft_idp"),
}
README_FEATURES = ("Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, "
                   "Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments")
JSON_TYPE = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
# infer_idp.py's defaults: strings closed at this many characters (by the decoder), maxItems for arrays
IDP_MAX_STRING_CHARS, IDP_MAX_ARRAY_ITEMS = 256, 32
GRAMMARS_KEPT = 64  # distinct request schemas compiled per model before the grammar cache is emptied


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class ServeConfig:
    """Everything the server reads from the environment, with its defaults (the variable names are in from_env)."""
    models: dict[str, str] = field(default_factory=lambda: {n: d for n, (_, _, d) in ENDPOINTS.items()})
    quantize: str = "auto"             # QUANTIZE: auto = bf16 where it fits MAX_MEMORY_GB, an adapter on its training
    #                                    precision, else 4-bit NF4; plain weights on CPU (precision.choose_precision)
    max_memory_gb: float = 8.0         # MAX_MEMORY_GB: GiB of GPU memory QUANTIZE=auto fits each base in (0 = free only)
    trust_remote_code: bool = False    # TRUST_REMOTE_CODE=1 allows model code from the hub
    micro_batching: bool = True        # MICRO_BATCHING=0: one forward pass per request (the load test's baseline)
    batch_wait_ms: float = 5.0         # BATCH_WAIT_MS: how long a batch waits for more requests after its first
    max_batch: int = 16                # MAX_BATCH: items per gathered batch and per forward pass
    max_queue: int = 1024              # MAX_QUEUE: items waiting per lane before new requests get a 503
    max_chars: int = 4000              # MAX_FEATURES_CHARS: cap on one feature string / prompt (characters)
    max_input_tokens: int = 0          # MAX_INPUT_TOKENS: cap on one item's prompt in tokens (0 = the model's context)
    max_request_tokens: int = 32768    # MAX_REQUEST_TOKENS: cap on the prompt tokens of one request (all its items)
    max_batch_tokens: int = 16384      # MAX_BATCH_TOKENS: a gathered batch stops growing at this many prompt tokens
    mixed_adapters: bool = True        # MIXED_ADAPTERS=0: one forward pass per adapter (the load test's baseline)
    stacked_lora: bool = True          # STACKED_LORA=0: PEFT's own mixed-adapter LoRA (a loop over the adapters per
    #                                    layer) instead of one batched product over the stacked adapters
    max_items: int = 64                # MAX_ITEMS: cap on the strings in one request's list
    max_body_bytes: int = 1 << 20      # MAX_BODY_BYTES: request bodies above this get a 413
    max_new_tokens_cap: int = 512      # MAX_NEW_TOKENS: upper bound of a generation request's max_new_tokens
    max_document_chars: int = 20000    # MAX_DOCUMENT_CHARS: cap on an IDP document
    idp_schema: str = "data/idp_schema.json"  # IDP_SCHEMA: the schema /extract/idp uses when a request sends none
    api_key: str | None = None         # API_KEY: when set, every endpoint but /health needs "Bearer <key>"
    load_retry_s: float = 30.0         # LOAD_RETRY_S: a failed model load is retried after this many seconds
    preload: list[str] = field(default_factory=list)  # PRELOAD: endpoints to load at startup ("all" or "base,sft")

    @classmethod
    def from_env(cls, env=None) -> "ServeConfig":
        env = os.environ if env is None else env

        def num(name, default, cast, lo):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                v = cast(raw)
            except ValueError:
                raise UserError(f"{name}={raw!r} is not a{'n integer' if cast is int else ' number'}") from None
            if v < lo:
                raise UserError(f"{name}={raw!r} must be at least {lo}")
            return v

        def flag(name, default):
            raw = env.get(name, "").strip().lower()
            if not raw:
                return default
            if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UserError(f"{name}={raw!r}: use 1 or 0")
            return raw in ("1", "true", "yes", "on")

        d = cls()
        quantize = env.get("QUANTIZE", "").strip() or d.quantize
        if quantize not in ("auto", "4bit", "none"):
            raise UserError(f"QUANTIZE={quantize!r}: choose auto, 4bit or none")
        preload = [p.strip() for p in env.get("PRELOAD", "").split(",") if p.strip()]
        preload = list(ENDPOINTS) if preload == ["all"] else preload
        unknown = [p for p in preload if p not in ENDPOINTS]
        if unknown:
            raise UserError(f"PRELOAD: unknown endpoint(s) {', '.join(unknown)}; known: all, {', '.join(ENDPOINTS)}")
        return cls(
            models={n: env.get(var, "").strip() or default for n, (_, var, default) in ENDPOINTS.items()},
            quantize=quantize,
            max_memory_gb=num("MAX_MEMORY_GB", d.max_memory_gb, float, 0),
            trust_remote_code=flag("TRUST_REMOTE_CODE", d.trust_remote_code),
            micro_batching=flag("MICRO_BATCHING", d.micro_batching),
            batch_wait_ms=num("BATCH_WAIT_MS", d.batch_wait_ms, float, 0),
            max_batch=num("MAX_BATCH", d.max_batch, int, 1),
            max_queue=num("MAX_QUEUE", d.max_queue, int, 1),
            max_chars=num("MAX_FEATURES_CHARS", d.max_chars, int, 1),
            max_input_tokens=num("MAX_INPUT_TOKENS", d.max_input_tokens, int, 0),
            max_request_tokens=num("MAX_REQUEST_TOKENS", d.max_request_tokens, int, 1),
            max_batch_tokens=num("MAX_BATCH_TOKENS", d.max_batch_tokens, int, 1),
            mixed_adapters=flag("MIXED_ADAPTERS", d.mixed_adapters),
            stacked_lora=flag("STACKED_LORA", d.stacked_lora),
            max_items=num("MAX_ITEMS", d.max_items, int, 1),
            max_body_bytes=num("MAX_BODY_BYTES", d.max_body_bytes, int, 1024),
            max_new_tokens_cap=num("MAX_NEW_TOKENS", d.max_new_tokens_cap, int, 1),
            max_document_chars=num("MAX_DOCUMENT_CHARS", d.max_document_chars, int, 1),
            idp_schema=env.get("IDP_SCHEMA", "").strip() or d.idp_schema,
            api_key=env.get("API_KEY") or None,
            load_retry_s=num("LOAD_RETRY_S", d.load_retry_s, float, 0),
            preload=preload,
        )


# ----------------------------------------------------------------------------------------------------------------
# request validation

def validation_message(errors: list[dict]) -> str:
    """One readable line out of pydantic's error list (FastAPI's default is a nested list of dicts)."""
    msgs = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        kind = e.get("type", "")
        if kind == "json_invalid":
            msgs.append(f"invalid JSON in the request body ({e.get('ctx', {}).get('error', e.get('msg'))})")
        elif not loc and kind in ("missing", "model_attributes_type", "dict_type"):
            msgs.append('the request body must be a JSON object, e.g. {"features": "Age: 23.0, …"}')
        elif kind == "missing":
            msgs.append(f"missing field '{'.'.join(loc)}'")
        elif kind == "extra_forbidden":
            msgs.append(f"unknown field '{'.'.join(loc)}'")
        elif kind == "value_error":  # our validators' messages already name the field
            msgs.append(str(e.get("ctx", {}).get("error", e.get("msg"))))
        else:
            msgs.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(dict.fromkeys(msgs))  # union types repeat a message per member


# ASCII whitespace only: Python's str.strip() also strips control characters such as \x1e that the OpenAPI
# pattern (ECMA regex) counts as content, and the two must agree on what "empty" means.
SPACE = " \t\n\r\f\v"
NOT_BLANK = r"[^ \t\n\r\f\v]"


def check_text(v: Any, name: str, cap: int, cap_var: str = "MAX_FEATURES_CHARS") -> str:
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    if len(v) > cap:
        raise ValueError(f"{name} is {len(v)} characters long; the cap is {cap} ({cap_var})")
    v = v.strip(SPACE)
    if not v:
        raise ValueError(f"{name} is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (an unpaired surrogate)") from None
    return v


def check_int(v: Any, name: str, lo: int, hi: int, cap_var: str) -> int:
    if isinstance(v, float) and v.is_integer():  # JSON Schema's "integer" includes 8.0
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi} ({cap_var}), got {v}")
    return v


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {JSON_TYPE.get(type(v), type(v).__name__)}")
    return v


def check_texts(v: Any, name: str, cap: int, max_items: int) -> str | list[str]:
    """A non-empty string, or a non-empty list of them (at most max_items): stripped, each under the cap."""
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{name} is an empty list")
        if len(v) > max_items:
            raise ValueError(f"{name} holds {len(v)} strings; the cap is {max_items} per request (MAX_ITEMS)")
        return [check_text(x, f"{name}[{i}]", cap) for i, x in enumerate(v)]
    if not isinstance(v, str):
        got = JSON_TYPE.get(type(v), type(v).__name__)
        raise ValueError(f"{name} must be a string or a list of strings, got {got}")
    return check_text(v, name, cap)


# ----------------------------------------------------------------------------------------------------------------
# what each task does in one batch (on its lane's thread). An item is (endpoint path, Slot, payload).

def _groups(items: list, key: Callable) -> dict:
    """Indices of `items` grouped by key(item): one model call per group of identical settings."""
    out: dict = {}
    for i, x in enumerate(items):
        out.setdefault(key(x), []).append(i)
    return out


def creditmix_prior(slot, tok):
    """The endpoint's calibration, as infer_creditmix.py --calibration auto: the prior and temperature
    eval_creditmix.py picked for this model on a validation split (recorded beside the run), else the README's
    multi-null prior (4 content-free prompts, one small batch). Computed on the endpoint's first CreditMix batch and
    kept: only CreditMix models pay for it."""
    if slot.prior is None:
        import creditmix as cm
        from run_record import eval_run_dir
        from scoring import read_calibration, served_prior
        recorded = read_calibration(eval_run_dir(slot.spec, create=False))
        with model_call([slot.row_name]):
            slot.prior, temperature, used = served_prior("auto", recorded, None, lambda: cm.null_scores(slot.model, tok))
        slot.extra.update(temperature=temperature, calibration=used)
    return slot.prior


def run_creditmix(items: list, cfg: ServeConfig) -> list[dict]:
    """The README's response JSON for each feature string: raw label scores, minus the endpoint's prior. Items of
    every adapter on one base go through one forward pass (PEFT mixed-adapter batch) unless MIXED_ADAPTERS=0."""
    import creditmix as cm
    from scoring import response
    out: list = [None] * len(items)
    lane = "creditmix"
    by_tok = _groups(items, lambda x: id(x[1].tok))  # endpoints whose tokenizers agree share a batch
    for idx in by_tok.values():
        parts: dict = {}
        for i in idx:  # MIXED_ADAPTERS=0: one call per adapter, the baseline loadtest.py compares against
            parts.setdefault(None if cfg.mixed_adapters else items[i][1].row_name, []).append(i)
        for part in parts.values():
            slots = [items[i][1] for i in part]
            tok = slots[0].lane_tokenizer(lane)
            for s in dict.fromkeys(slots):
                creditmix_prior(s, tok)
            names = [s.row_name for s in slots] if slots[0].base.peft else None
            raw = cm.label_scores(slots[0].model, tok, [cm.prompt_for(items[i][2]) for i in part],
                                  batch_size=cfg.max_batch, adapter_names=names)
            for i, s, r in zip(part, slots, raw):
                out[i] = response(s.spec, cm.LABELS, r, s.prior, temperature=s.extra["temperature"])
    return out


def run_codegen(items: list, cfg: ServeConfig) -> list[dict]:
    """payload: (task, max_new_tokens, plan_then_code). Greedy answers through codegen.answer, code extracted."""
    import codegen
    out: list = [None] * len(items)
    for (_, n, plan), idx in _groups(items, lambda x: (x[1].row_name, x[2][1], x[2][2])).items():
        slot = items[idx[0]][1]
        with model_call([slot.row_name]):
            answers = codegen.answer(slot.model, slot.lane_tokenizer("codegen"), [items[i][2][0] for i in idx],
                                     plan_then_code=plan, plan_tokens=min(256, n), max_new_tokens=n,
                                     batch_size=cfg.max_batch)
        for i, a in zip(idx, answers):
            out[i] = {"model_name": slot.spec, "code": codegen.extract_code(a[0]["raw"]), "raw": a[0]["raw"],
                      "plan": a[0]["plan"]}
    return out


def run_idp(items: list, cfg: ServeConfig) -> list:
    """payload: (document, schema, compiled grammar, validator, max_new_tokens). Grammar-constrained greedy
    decoding through json_grammar.generate (one call per schema and budget), each output parsed and validated."""
    import idp
    import json_grammar as jg
    out: list = [None] * len(items)
    for (name, _, n), idx in _groups(items, lambda x: (x[1].row_name, id(x[2][2]), x[2][4])).items():
        slot = items[idx[0]][1]
        tok = slot.lane_tokenizer("idp")
        _, schema, compiled, validator, _ = items[idx[0]][2]
        limit = idp.input_token_limit(slot.model, tok, 0, n)
        ok, prompts, cut = [], [], {}
        for i in idx:
            try:
                prompt, cut[i] = idp.document_prompt(tok, schema, items[i][2][0], limit, quiet=True)
            except UserError as e:
                out[i] = ApiError(413, str(e))
                continue
            ok.append(i)
            prompts.append(prompt)
        if not ok:
            continue
        with model_call([name]):
            results, _ = jg.generate(slot.model, tok, prompts, max_new_tokens=n, batch_size=cfg.max_batch,
                                     grammar=compiled, cache=slot.extra["grammars"],
                                     max_string_chars=IDP_MAX_STRING_CHARS)
        for i, r in zip(ok, results):
            c = jg.check_output(r["text"], validator)
            out[i] = {"model_name": slot.spec, "output": c["json"] if c["schema_valid"] else None,
                      "valid": c["schema_valid"], "error": c["error"], "budget_closed": r["budget_closed"],
                      "truncated": cut[i], "new_tokens": r["new_tokens"]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# answers

class CodeGenAnswer(BaseModel):
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_CODEGEN)")
    code: str = Field(description="the Python code extracted from the answer (empty if there is none)")
    raw: str = Field(description="the model's whole answer")
    plan: str | None = Field(description="the plan written first, with plan_then_code; else null")


class IdpAnswer(BaseModel):
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_IDP)")
    output: dict | None = Field(description="the extracted JSON object, valid for the schema; null when not valid")
    valid: bool = Field(description="output parsed and validated against the schema (jsonschema)")
    error: str | None = Field(description="why the output is not valid, else null")
    budget_closed: bool = Field(description="the JSON was closed early to fit max_new_tokens")
    truncated: bool = Field(description="the document was cut at its end to fit the model's context")
    new_tokens: int = Field(description="tokens generated")


class CreditMixAnswer(BaseModel):
    """The README's response: calibrated scores = raw_scores - prior; probabilities = softmax(scores / T)."""
    model_name: str = Field(description="the model spec behind the endpoint (MODEL_*)")
    prediction: str = Field(description="the label with the highest calibrated score")
    scores: dict[str, float] = Field(description="calibrated scores: raw_scores - prior")
    raw_scores: dict[str, float] = Field(description="mean log-probability per label token after the prompt")
    prior: dict[str, float] = Field(description="the calibration's prior: the one eval_creditmix.py picked for this "
                                    "model, else multi-null (mean raw score over content-free prompts)")
    probabilities: dict[str, float] = Field(description="softmax over the calibrated scores divided by the "
                                            "temperature eval_creditmix.py fitted (1 when none was recorded)")
    top2_margin: float = Field(description="best minus second-best calibrated score (a confidence signal)")


def default_new_tokens(cfg: ServeConfig) -> int:
    return min(512, cfg.max_new_tokens_cap)


# The request models. Their caps come from the server's configuration, so each model declares its fields in
# fields(cfg) and checks them in validators that read cls.cfg: capped(model, cfg) is the model a server validates
# with, and its OpenAPI schema shows the caps.

def capped_text(cap: int):
    """A non-blank string of at most `cap` characters, as the OpenAPI schema states it."""
    return Annotated[str, StringConstraints(min_length=1, max_length=cap, pattern=NOT_BLANK)]


class CreditMixRequest(BaseModel):
    """POST /infer/{name}: one customer's features, or a list of them."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"features": README_FEATURES}]})
    cfg: ClassVar[ServeConfig]

    @classmethod
    def fields(cls, cfg: ServeConfig) -> dict:
        text = capped_text(cfg.max_chars)
        return {"features": (Union[text, Annotated[list[text], Field(min_length=1, max_length=cfg.max_items)]], Field(
            description=f"one customer's features, or a list of them (at most {cfg.max_items}, each at most "
                        f"{cfg.max_chars} characters); a list gets a list of answers in the same order"))}

    @field_validator("features", mode="before", check_fields=False)
    @classmethod
    def _features(cls, v):
        return check_texts(v, "features", cls.cfg.max_chars, cls.cfg.max_items)


class GenerationRequest(BaseModel):
    """What the generating endpoints share: max_new_tokens, at most MAX_NEW_TOKENS."""
    cfg: ClassVar[ServeConfig]

    @staticmethod
    def budget(cfg: ServeConfig, description: str) -> tuple:
        """The max_new_tokens field; `description` names the cap as {cap}."""
        return (Annotated[int, Field(ge=1, le=cfg.max_new_tokens_cap)],
                Field(default_new_tokens(cfg), description=description.format(cap=cfg.max_new_tokens_cap)))

    @field_validator("max_new_tokens", mode="before", check_fields=False)
    @classmethod
    def _budget(cls, v):
        return check_int(v, "max_new_tokens", 1, cls.cfg.max_new_tokens_cap, "MAX_NEW_TOKENS")


class CodeGenRequest(GenerationRequest):
    """POST /generate/codegen: a coding task, its token budget, and whether to plan first."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Write a function that sorts a list.", "max_new_tokens": 256, "plan_then_code": False}]})

    @classmethod
    def fields(cls, cfg: ServeConfig) -> dict:
        return {
            "prompt": (capped_text(cfg.max_chars), Field(
                description=f"the coding task (at most {cfg.max_chars} characters)")),
            "max_new_tokens": cls.budget(cfg, "token budget of the answer (and of the plan), at most {cap}"),
            "plan_then_code": (bool, Field(False, description="write a short plan first, then code that follows it")),
        }

    @field_validator("prompt", mode="before", check_fields=False)
    @classmethod
    def _prompt(cls, v):
        return check_text(v, "prompt", cls.cfg.max_chars)

    @field_validator("plan_then_code", mode="before", check_fields=False)
    @classmethod
    def _plan(cls, v):
        return check_bool(v, "plan_then_code")


class IdpRequest(GenerationRequest):
    """POST /extract/idp: a document, optionally the JSON Schema of its output, and a token budget."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"document": "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50.", "max_new_tokens": 256}]})

    @classmethod
    def fields(cls, cfg: ServeConfig) -> dict:
        return {
            "document": (capped_text(cfg.max_document_chars), Field(
                description=f"the document text (at most {cfg.max_document_chars} characters)")),
            "json_schema": (dict | None, Field(None, alias="schema", description=(
                f"the JSON Schema the output must conform to (root type object); default: the server's IDP_SCHEMA "
                f"file ({cfg.idp_schema})"))),
            "max_new_tokens": cls.budget(cfg, "token budget of the reply, at most {cap}; the JSON is always closed "
                                              "within it"),
        }

    @field_validator("document", mode="before", check_fields=False)
    @classmethod
    def _document(cls, v):
        return check_text(v, "document", cls.cfg.max_document_chars, "MAX_DOCUMENT_CHARS")

    @field_validator("json_schema", mode="before", check_fields=False)
    @classmethod
    def _schema(cls, v):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"schema must be a JSON object, got {JSON_TYPE.get(type(v), type(v).__name__)}")
        return v


def capped(model: type[BaseModel], cfg: ServeConfig) -> type[BaseModel]:
    """`model` under this configuration's caps: the fields model.fields(cfg) declares, which the model's validators
    check against cfg. It keeps the model's name (the OpenAPI schema's); a new one is built per configuration."""
    return create_model(model.__name__, __base__=model, __module__=__name__,
                        cfg=(ClassVar[ServeConfig], cfg), **model.fields(cfg))


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server reads; the others are accepted and ignored
    (sampling settings: every endpoint decodes greedily)."""
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="an endpoint name: " + ", ".join(ENDPOINTS))
    messages: list[dict] = Field(min_length=1, description="the last user message is the input: the features "
                                 "(CreditMix), the coding task (codegen) or the document (idp)")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    response_format: dict | None = Field(None, description='{"type": "json_schema", "json_schema": {"name": '
                                         '..., "schema": {...}}} on model idp: the reply is valid for it')
    stream: bool = False
    n: int = 1


@dataclass(frozen=True)
class Task:
    """One row of the task table."""
    route: str                                  # the native route ({name} = the endpoint name)
    request: type[BaseModel]                    # its request model (capped(request, cfg): under cfg's caps)
    answer: type[BaseModel]                     # its response model (the README's JSON for CreditMix)
    prior: bool                                 # what loading adds: the multi-null prior (label ranking only)
    run: Callable[[list, ServeConfig], list]    # one batch of items -> one result (or ApiError) per item
    summary: str


TASKS = {
    "creditmix": Task("/infer/{name}", CreditMixRequest, CreditMixAnswer, True, run_creditmix,
                      "CreditMix label (Good/Standard/Bad) by calibrated label ranking"),
    "codegen": Task("/generate/codegen", CodeGenRequest, CodeGenAnswer, False, run_codegen,
                    "Python code for a task, greedy decoding capped at max_new_tokens"),
    "idp": Task("/extract/idp", IdpRequest, IdpAnswer, False, run_idp,
                "one JSON object per document, grammar-constrained by a JSON Schema and validated"),
}


def route_of(name: str) -> str:
    return TASKS[ENDPOINTS[name][0]].route.format(name=name)


ERROR_BODY = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}


def _error_docs(*codes: int) -> dict:
    why = {401: "missing or wrong API key (when API_KEY is set)", 404: "no such endpoint",
           413: "a size limit: the message names it and how to get under it",
           415: "the body is not sent as application/json",
           422: "invalid request: the message says what is wrong",
           503: "the endpoint's model cannot be loaded, the server is busy or shutting down (retry)"}
    return {c: {"description": why[c], **ERROR_BODY} for c in codes}


def schema_error(e: UserError, prefixed: bool = False) -> ApiError:
    """json_grammar's refusal as an answer: its status (413 over a size or compile limit, 422 invalid or
    unsupported, 503 when its compile worker could not start) and its message, which names the limit."""
    status = getattr(e, "status", 422)
    msg = str(e)
    if not prefixed and not msg.startswith("schema"):
        msg = f"schema: {msg}"
    return ApiError(status, msg, {"Retry-After": "5"} if status == 503 else None)


def body_error(exc: Exception) -> str:
    """Why FastAPI could not parse a request body (it answers all of these 'There was an error parsing the body')."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return (f"the JSON body is nested deeper than the parser allows (about {sys.getrecursionlimit()} levels): "
                "send a flatter body")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (f"a number in the JSON body has more than {sys.get_int_max_str_digits()} digits (the parser's limit): "
                "send it as a string or shorten it")
    if isinstance(cause, UnicodeDecodeError):
        return "invalid JSON in the request body (not UTF-8 text)"
    return f"the request body cannot be parsed ({type(cause).__name__ if cause else 'unknown reason'})"


# ----------------------------------------------------------------------------------------------------------------
# the app

def create_app(config: ServeConfig | None = None) -> FastAPI:
    """Build the app: request models, the task table's routes, the OpenAI routes, the gate. With no config, read
    the environment (ServeConfig.from_env). Nothing heavy happens here: models load on first use (or at startup
    for PRELOAD endpoints, in the background, one at a time)."""
    if config is None:
        try:
            config = ServeConfig.from_env()
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    cfg = config
    metrics = Metrics()
    state: dict[str, Any] = {}  # built in the lifespan: slots, lanes, stop flags

    default_new = default_new_tokens(cfg)
    CreditMixRequest, CodeGenRequest, IdpRequest = (capped(TASKS[t].request, cfg) for t in ("creditmix", "codegen", "idp"))

    # ------------------------------------------------------------------ lifespan: slots, lanes, signals
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        slots = ModelSlots(cfg.quantize, cfg.trust_remote_code, cfg.load_retry_s, metrics, cfg.max_memory_gb,
                           cfg.stacked_lora)
        state["models"] = slots
        state["slots"] = {name: slots.slot(spec) for name, spec in cfg.models.items()}
        state["lanes"] = {}
        state["stop"], state["stopping"], state["count_lock"] = threading.Event(), asyncio.Event(), asyncio.Lock()
        restore = _chain_stop_signals(state)
        log.info("serve_creditmix: %s; micro_batching=%s mixed_adapters=%s batch_wait_ms=%s max_batch=%s auth=%s",
                 ", ".join(f"{n}={s}" for n, s in cfg.models.items()), cfg.micro_batching, cfg.mixed_adapters,
                 cfg.batch_wait_ms, cfg.max_batch, "on" if cfg.api_key else "off")
        preload = [asyncio.create_task(_preload(n)) for n in cfg.preload]  # the loader thread takes them in turn
        yield
        state["stop"].set()
        state["stopping"].set()
        for t in preload:
            t.cancel()
        for lane in state["lanes"].values():
            await lane.close()
        slots.close()
        if "json_grammar" in sys.modules and hasattr(sys.modules["json_grammar"], "stop_worker"):
            sys.modules["json_grammar"].stop_worker()  # the schema compile worker process
        restore()

    def _chain_stop_signals(st) -> Callable[[], None]:
        """On SIGTERM / SIGINT, stop running batches (within one forward pass) and answer waiting requests 503
        before uvicorn's own handler starts its graceful shutdown, which waits for every open request."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # e.g. under TestClient: no signals to chain
        loop = asyncio.get_running_loop()
        prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(sig, frame):
            st["stop"].set()
            loop.call_soon_threadsafe(st["stopping"].set)
            handler = prev.get(sig)
            if callable(handler):
                handler(sig, frame)
            elif sig == signal.SIGINT:
                raise KeyboardInterrupt

        for s in prev:
            signal.signal(s, on_signal)

        def restore():
            for s, h in prev.items():
                if signal.getsignal(s) is on_signal:
                    signal.signal(s, h)
        return restore

    async def _preload(name: str):
        with contextlib.suppress(ApiError):
            await ensure(name)

    app = FastAPI(title="distill_slm serve_creditmix", version="1.1", lifespan=lifespan,
                  description="CreditMix calibrated label ranking (base/sft/kd/dpo), CodeGen generation and IDP "
                              "schema-constrained extraction over HTTP, and an OpenAI-compatible /v1 API. "
                              "See docs/serving.md.")

    # ------------------------------------------------------------------ errors: one JSON shape, {"error": "…"}
    def err(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return error_response(status, message, headers, openai=request.url.path.startswith("/v1/"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:  # FastAPI then sees no body at all
            return err(request, 415, f"send the body as JSON with the header 'Content-Type: application/json' "
                                     f"(got {ctype or 'no Content-Type'})")
        return err(request, 422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path} (see GET /models for the endpoints)"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return err(request, 422, body_error(exc))
        else:
            msg = str(exc.detail)
        return err(request, exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return err(request, exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return err(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    # ------------------------------------------------------------------ loading, limits, lanes
    async def ensure(name: str):
        slot = state["slots"][name]
        if slot.state != "loaded":  # a load cannot be interrupted: on shutdown, answer instead of waiting for it
            load = asyncio.ensure_future(slot.ensure(route_of(name)))
            stop = asyncio.ensure_future(state["stopping"].wait())
            await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not load.done():
                load.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
                raise ApiError(503, "the server is shutting down; retry (on another instance)", {"Retry-After": "5"})
            load.result()
        metrics.loaded.set(state["models"].loaded_models())
        return slot

    def counter(slot):
        return slot.lane_tokenizer("admit")  # the admission checks' own copy, used by one task at a time

    async def n_tokens(slot, texts: list[str]) -> list[int]:
        """Token counts with the endpoint's tokenizer, off the event loop (a 1 MiB body takes a while)."""
        tok = counter(slot)
        async with state["count_lock"]:
            ids = await asyncio.to_thread(lambda: tok(texts, add_special_tokens=False)["input_ids"])
        return [len(x) for x in ids]

    def input_limit(slot, reserve: int) -> tuple[int, str]:
        """(tokens one prompt may have, why): the model's context minus `reserve`, or MAX_INPUT_TOKENS."""
        ctx = slot.context()
        limit, why = ctx - reserve, f"the model's context of {ctx} tokens minus {reserve} for the answer"
        if cfg.max_input_tokens and cfg.max_input_tokens < limit:
            limit, why = cfg.max_input_tokens, f"MAX_INPUT_TOKENS={cfg.max_input_tokens}"
        return limit, why

    def check_queue(n: int):
        if n > cfg.max_queue:  # it could never be admitted: retrying does not help
            raise ApiError(413, f"the request holds {n} items; at most {cfg.max_queue} can wait on an endpoint "
                                f"(MAX_QUEUE): send at most {cfg.max_queue} items per request")

    def lane_for(task: str, slot) -> Lane:
        key = f"{task}|{slot.base.key}"
        if key not in state["lanes"]:
            def on_batch(flat):
                for path, n in _groups(flat, lambda x: x[0]).items():
                    metrics.batch_size.labels(path).observe(len(n))
            def run(items):  # as a reader of the base: an adapter attach (the writer) never runs during a batch
                with slot.base.lock.read():
                    return TASKS[task].run(items, cfg)
            state["lanes"][key] = Lane(key, task, run, cfg.max_batch,
                                       cfg.max_batch_tokens, cfg.batch_wait_ms / 1000, cfg.max_queue,
                                       state["stop"], metrics, on_batch)
        return state["lanes"][key]

    async def process(request: Request, name: str, slot, payloads: list, tokens: int) -> list:
        """Queue the request's items on its task's lane for this base; wait for their results."""
        path, task = route_of(name), ENDPOINTS[name][0]
        check_queue(len(payloads))
        fut = lane_for(task, slot).submit([(path, slot, p) for p in payloads], tokens, batched=cfg.micro_batching)
        try:
            out = await wait_unless_gone(request, fut, state["stopping"])
        except ClientGone:
            metrics.disconnects.labels(path).inc()
            raise
        except Cancelled:
            raise ApiError(503, "the server is shutting down; retry (on another instance)",
                           {"Retry-After": "5"}) from None
        except UserError as e:  # input the model cannot take (a check deeper than the request's)
            raise ApiError(422, str(e)) from None
        for x in out:  # a per-item failure (e.g. an IDP document that cannot fit) answers that request
            if isinstance(x, Exception):
                raise x
        metrics.items.labels(path).inc(len(payloads))
        return out

    # ------------------------------------------------------------------ the three tasks, shared by both APIs
    async def do_creditmix(request: Request, name: str, texts: list[str]) -> tuple[list[dict], int]:
        import creditmix as cm
        from scoring import label_token_ids
        slot = await ensure(name)
        tok = counter(slot)
        if "label_tokens" not in slot.extra:
            async with state["count_lock"]:
                slot.extra["label_tokens"] = max(len(x) for x in label_token_ids(tok, cm.LABELS))
        from common import chat_prompt
        counts = await n_tokens(slot, [chat_prompt(tok, cm.prompt_for(t)) for t in texts])
        limit, why = input_limit(slot, slot.extra["label_tokens"])
        where = "features" if len(texts) == 1 else "features[{}]"
        for i, n in enumerate(counts):
            if n > limit:
                raise ApiError(413, f"{where.format(i)} is {n} tokens as a prompt for {slot.spec}; the limit is "
                                    f"{limit} ({why}): shorten it")
        total = sum(counts)
        if total > cfg.max_request_tokens:
            fit, run = 0, 0
            for n in counts:
                if run + n > cfg.max_request_tokens:
                    break
                fit, run = fit + 1, run + n
            raise ApiError(413, f"the request's {len(texts)} prompts are {total} tokens in all; the cap is "
                                f"{cfg.max_request_tokens} per request (MAX_REQUEST_TOKENS): send at most {max(fit, 1)} "
                                f"items per request")
        return await process(request, name, slot, texts, total), total

    async def do_codegen(request: Request, prompt: str, n: int, plan: bool) -> tuple[dict, int]:
        import codegen
        from common import chat_prompt
        slot = await ensure("codegen")
        tok = counter(slot)
        if plan:
            plan_n = min(256, n)
            p_plan, p_code = await n_tokens(slot, [chat_prompt(tok, codegen.plan_request(prompt)),
                                             chat_prompt(tok, codegen.code_from_plan_request(prompt, ""))])
            need, reserve = max(p_plan + plan_n, p_code + plan_n + n), plan_n + n
            p = p_code
        else:
            p = (await n_tokens(slot, [chat_prompt(tok, codegen.code_request(prompt))]))[0]
            need, reserve = p + n, n
        limit, why = input_limit(slot, reserve)
        if need - reserve > limit:
            raise ApiError(413, f"prompt is {need - reserve} tokens as a prompt for {slot.spec}; the limit is "
                                f"{limit} ({why}{', with the plan' if plan else ''}): shorten the prompt or lower "
                                "max_new_tokens")
        out = await process(request, "codegen", slot, [(prompt, n, plan)], need)
        return out[0], p

    def default_schema() -> dict:
        import json_grammar as jg
        if "idp_schema" not in state:
            try:
                state["idp_schema"] = jg.load_schema(cfg.idp_schema)
            except UserError as e:
                raise ApiError(503, f"/extract/idp: the server's default schema is unusable ({e}); send a "
                                    "\"schema\" in the request or fix IDP_SCHEMA") from None
        return state["idp_schema"]

    async def compile_schema(request: Request, slot, schema: dict):
        import json_grammar as jg
        if "grammars" not in slot.extra:
            async with slot.lock:
                if "grammars" not in slot.extra:
                    slot.extra["grammars"] = await asyncio.to_thread(jg.GrammarCache, slot.tok,
                                                                     vocab_size=slot.model.config.vocab_size)
        grammars = slot.extra["grammars"]
        if len(grammars._cache) >= GRAMMARS_KEPT:  # bound the memory many distinct request schemas take
            grammars._cache.clear()
        # compiled off the inference thread, cached per schema; json_grammar bounds the compile (size checks, then
        # a worker process with a time and memory limit) and kills it when this task is cancelled: the client left
        if hasattr(grammars, "compile_async"):
            task = asyncio.ensure_future(grammars.compile_async(schema, IDP_MAX_ARRAY_ITEMS, where="schema"))
        else:  # json_grammar without the compile worker
            task = asyncio.ensure_future(asyncio.to_thread(grammars.compile, schema, IDP_MAX_ARRAY_ITEMS))
        try:
            return await wait_unless_gone(request, task, state["stopping"])
        except UserError as e:
            raise schema_error(e) from None

    async def do_idp(request: Request, document: str, schema: dict | None, n: int) -> tuple[dict, int]:
        import idp
        import json_grammar as jg
        if schema is None:
            schema = default_schema()
        else:
            try:
                jg.check_schema(schema, "schema")
            except UserError as e:
                raise schema_error(e, prefixed=True) from None
        slot = await ensure("idp")
        ctx = slot.context()
        if n >= ctx:
            raise ApiError(413, f"max_new_tokens {n} does not fit the model's context of {ctx} tokens: lower it")
        compiled = await compile_schema(request, slot, schema)
        if compiled.min_tokens > n:
            raise ApiError(422, f"max_new_tokens {n} is too small: the smallest valid JSON for this schema needs "
                                f"{compiled.min_tokens} tokens")
        limit = min(idp.input_token_limit(slot.model, counter(slot), cfg.max_input_tokens, n), ctx - n)
        p = min((await n_tokens(slot, [document]))[0], limit)
        out = await process(request, "idp", slot, [(document, schema, compiled, jg.make_validator(schema), n)],
                            p + n)
        return out[0], p

    # ------------------------------------------------------------------ native routes, from the task table
    def creditmix_route(name: str):
        var = ENDPOINTS[name][1]

        async def infer(request: Request, body: CreditMixRequest):
            texts = [body.features] if isinstance(body.features, str) else body.features
            out, _ = await do_creditmix(request, name, texts)
            return JSONResponse(out[0] if isinstance(body.features, str) else out)

        infer.__name__ = f"infer_{name}"
        app.post(route_of(name), tags=["creditmix"], summary=f"{TASKS['creditmix'].summary} with the {name} model "
                 f"({var})", response_model=Union[CreditMixAnswer, list[CreditMixAnswer]],
                 responses=_error_docs(401, 413, 415, 422, 503))(infer)

    for name, (task, _, _) in ENDPOINTS.items():
        if task == "creditmix":
            creditmix_route(name)

    @app.post(route_of("codegen"), tags=["codegen"], response_model=CodeGenAnswer,
              summary=f"{TASKS['codegen'].summary} (MODEL_CODEGEN)", responses=_error_docs(401, 413, 415, 422, 503))
    async def generate_codegen(request: Request, body: CodeGenRequest):
        out, _ = await do_codegen(request, body.prompt, body.max_new_tokens, body.plan_then_code)
        return JSONResponse(out)

    @app.post(route_of("idp"), tags=["idp"], response_model=IdpAnswer, summary=f"{TASKS['idp'].summary} (MODEL_IDP)",
              responses=_error_docs(401, 413, 415, 422, 503))
    async def extract_idp(request: Request, body: IdpRequest):
        out, _ = await do_idp(request, body.document, body.json_schema, body.max_new_tokens)
        return JSONResponse(out)

    # ------------------------------------------------------------------ OpenAI-compatible routes
    @app.get("/v1/models", tags=["openai"], summary="the endpoints as OpenAI models (id = endpoint name)",
             responses=_error_docs(401))
    async def openai_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "distill_slm",
                                            "task": task, "model": cfg.models[n]}
                                           for n, (task, _, _) in ENDPOINTS.items()]}

    @app.post("/v1/chat/completions", tags=["openai"], summary="OpenAI chat completion: model = an endpoint name; "
              "CreditMix answers the label, codegen the code, idp a JSON object valid for response_format's schema",
              responses=_error_docs(401, 413, 415, 422, 503))
    async def openai_chat(request: Request, body: ChatRequest):
        name = body.model
        if name not in ENDPOINTS:
            raise ApiError(404, f"model '{name}' does not exist; the models are the endpoints: "
                                f"{', '.join(ENDPOINTS)} (GET /v1/models)")
        if body.stream:
            raise ApiError(422, "stream=true is not supported: send stream=false")
        if body.n != 1:
            raise ApiError(422, f"n={body.n}: every endpoint decodes greedily, so only n=1 is supported")
        text = last_user_text(body.messages)
        task = ENDPOINTS[name][0]
        fmt = body.response_format or {"type": "text"}
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_schema", "json_object"):
            raise ApiError(422, f"response_format.type {kind!r}: use text, json_schema or json_object")
        if kind != "text" and task != "idp":
            raise ApiError(422, f"response_format {kind} is served by the constrained decoder of model 'idp' only")
        budget = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if budget is not None:
            try:
                budget = check_int(budget, "max_tokens", 1, cfg.max_new_tokens_cap, "MAX_NEW_TOKENS")
            except ValueError as e:
                raise ApiError(422, str(e)) from None
        n = budget or default_new
        extra, finish = {}, "stop"
        if task == "creditmix":
            text = check_chat_text(text, cfg.max_chars)
            answers, p = await do_creditmix(request, name, [text])
            content, extra = answers[0]["prediction"], {"answer": answers[0]}
        elif task == "codegen":
            text = check_chat_text(text, cfg.max_chars)
            a, p = await do_codegen(request, text, n, False)
            content = a["raw"]
        else:
            text = check_chat_text(text, cfg.max_document_chars, "MAX_DOCUMENT_CHARS")
            schema = None
            if kind == "json_schema":
                js = fmt.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise ApiError(422, "response_format.json_schema.schema must be a JSON Schema object")
            elif kind == "json_object":
                schema = {"type": "object"}
            a, p = await do_idp(request, text, schema, n)
            if not a["valid"]:  # the grammar makes this unreachable for the schemas check_schema accepts
                raise ApiError(500, f"the constrained output failed validation ({a['error']})")
            # "stop" even when the decoder closed the JSON early to fit max_tokens: the reply is a whole document
            content, extra = json.dumps(a["output"], ensure_ascii=False, separators=(",", ":")), {"answer": a}
        slot = state["slots"][name]
        done = a["new_tokens"] if task == "idp" else (await n_tokens(slot, [content]))[0]
        if task == "codegen":
            extra = {"answer": a}
            if done >= n:
                finish = "length"
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done}, **extra}

    # ------------------------------------------------------------------ service endpoints
    @app.get("/health", tags=["service"], summary="liveness: 200 while the server runs (no auth)")
    async def health():
        return {"status": "ok"}

    @app.get("/models", tags=["service"], summary="each endpoint's model: spec, state, load count, error",
             responses=_error_docs(401))
    async def models():
        slots = state["slots"]
        return {"endpoints": {route_of(n): {"task": ENDPOINTS[n][0], "env": ENDPOINTS[n][1], **slots[n].describe()}
                              for n in ENDPOINTS},
                "base_models": state["models"].loaded_models(),
                "micro_batching": cfg.micro_batching, "mixed_adapters": cfg.mixed_adapters,
                "batch_wait_ms": cfg.batch_wait_ms, "max_batch": cfg.max_batch, "max_items": cfg.max_items,
                "max_chars": cfg.max_chars, "max_input_tokens": cfg.max_input_tokens,
                "max_request_tokens": cfg.max_request_tokens, "max_new_tokens_cap": cfg.max_new_tokens_cap,
                "max_document_chars": cfg.max_document_chars, "idp_schema": cfg.idp_schema}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}, **_error_docs(401)})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if cfg.api_key:  # document the auth so API clients (and schemathesis) send it
        def openapi():
            if app.openapi_schema is None:
                from fastapi.openapi.utils import get_openapi
                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http",
                                                                                     "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values():
                        op["security"] = [] if path == "/health" else [{"bearer": []}]
                app.openapi_schema = schema
            return app.openapi_schema
        app.openapi = openapi

    known = {"/health", "/models", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions"} | \
        {route_of(n) for n in ENDPOINTS}
    app.add_middleware(Gate, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes, metrics=metrics,
                       known_paths=known)
    app.state.config, app.state.serve = cfg, state
    return app


def last_user_text(messages: list[dict]) -> Any:
    """The content of the last user message: a string, or the text parts of a content list joined."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
            return c
    raise ApiError(422, "messages holds no user message: the last user message is the input")


def check_chat_text(v: Any, cap: int, cap_var: str = "MAX_FEATURES_CHARS") -> str:
    try:
        return check_text(v, "the last user message", cap, cap_var)
    except ValueError as e:
        raise ApiError(422, str(e)) from None


app = create_app()


# ----------------------------------------------------------------------------------------------------------------
# python serve_creditmix.py: the same app under uvicorn.run

def parse_args(argv=None):
    p = cli.parser(__doc__)
    # run
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind: 127.0.0.1 = this machine only; 0.0.0.0 = every network interface")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level")
    p.add_argument("--no_access_log", action="store_true", help="do not log one line per request")
    return p.parse_args(argv)


def main(args):
    import uvicorn
    # load: nothing here; models load on first use (or PRELOAD)
    # run
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log)


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
