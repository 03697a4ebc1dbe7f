"""serve_creditmix.py under hostile and careless input (issue 16) and with one shared base (issue 18), through a live
uvicorn on 127.0.0.1: every endpoint on one small random base model (4 layers, 1,024-token context) whose sft / kd /
dpo endpoints are three LoRA adapters of it, PRELOAD of four endpoints at startup. Checks token limits (413 naming
the limit), 413 for a list that can never be queued, the reason given for unparseable bodies, the lowercase bearer
scheme, that a long generation does not stall CreditMix, that a client leaving stops its generation, that SIGTERM
stops the server while a generation runs, and that mixed-adapter batches equal one-adapter batches."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from conftest import build_tiny_model, metric, start_server, stop_server

pytestmark = pytest.mark.xdist_group("test_serve_reliability")  # its module fixtures (servers): one worker

ROOT = Path(__file__).resolve().parents[1]
KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FEATURES = "Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98"
CONTEXT = 1024


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA run dir on `base` with random (non-zero) B matrices, so its answers differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(20)  # visible in the label scores of a random model
    peft.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"base_model": str(base)}))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared_base")
    base = build_tiny_model(d / "base", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            max_position_embeddings=CONTEXT)
    return {"base": base, **{n: make_adapter(base, d / f"run_{n}", seed) for seed, n in enumerate(("sft", "kd", "dpo"))}}


def start(models, tmp: Path, **env_over):
    return start_server({"HF_HUB_OFFLINE": "1", "API_KEY": KEY, "OMP_NUM_THREADS": "1",
                         "MODEL_BASE": str(models["base"]), "MODEL_SFT": str(models["sft"]),
                         "MODEL_KD": str(models["kd"]), "MODEL_DPO": str(models["dpo"]),
                         "MODEL_CODEGEN": str(models["base"]), "MODEL_IDP": str(models["base"]),
                         "MAX_NEW_TOKENS": "900", "MAX_ITEMS": "16", "MAX_QUEUE": "8", "MAX_FEATURES_CHARS": "4000",
                         "MAX_REQUEST_TOKENS": "600", "BATCH_WAIT_MS": "50", "LOAD_RETRY_S": "600", **env_over},
                        tmp, AUTH, timeout=300)


stop = stop_server


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    c = start(models, tmp_path_factory.mktemp("srv"), PRELOAD="base,sft,codegen,idp")
    c.models = models
    yield c
    stop(c)


def wait_loaded(client, paths, seconds=120):
    for _ in range(int(seconds * 4)):
        eps = client.get("/models").json()["endpoints"]
        if all(eps[p]["state"] in ("loaded", "error") for p in paths):
            return eps
        time.sleep(0.25)
    return client.get("/models").json()["endpoints"]


# ---------------------------------------------------------------------------------------------------------------

def test_preload_of_four_endpoints_loads_them_all_without_a_race(server):
    eps = wait_loaded(server, ["/infer/base", "/infer/sft", "/generate/codegen", "/extract/idp"])
    for p in ("/infer/base", "/infer/sft", "/generate/codegen", "/extract/idp"):
        assert eps[p]["state"] == "loaded", (p, eps[p])
    assert eps["/infer/kd"]["state"] == "not loaded"  # not preloaded: loads on first use
    assert server.get("/models").json()["base_models"] == 1  # one copy of the base for all of them
    assert "ImportError" not in server.log.read_text() and "Traceback" not in server.log.read_text()


def test_lowercase_bearer_scheme_is_accepted(server):
    for auth in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):
        r = httpx.post(f"{server.base_url}/infer/base", json={"features": FEATURES},
                       headers={"Authorization": auth}, timeout=120)
        assert r.status_code == 200, (auth, r.text)
    for auth in (f"Basic {KEY}", KEY, f"bearer {KEY}x"):
        r = httpx.get(f"{server.base_url}/models", headers={"Authorization": auth})
        assert r.status_code == 401, auth


def test_a_prompt_beyond_the_context_is_413_in_tokens(server):
    emoji = "\U0001F600" * 1500  # 1,500 characters (under MAX_FEATURES_CHARS), several thousand tokens
    r = server.post("/infer/base", json={"features": emoji})
    assert r.status_code == 413, r.text
    msg = r.json()["error"]
    assert "tokens" in msg and f"context of {CONTEXT} tokens" in msg and "shorten" in msg
    r = server.post("/generate/codegen", json={"prompt": "x " * 300, "max_new_tokens": 900})
    assert r.status_code == 413 and "lower max_new_tokens" in r.json()["error"], r.text


def test_a_request_over_the_token_cap_is_413_saying_how_many_items_fit(server):
    feats = [FEATURES * 3] * 8  # each fits; together over MAX_REQUEST_TOKENS=600
    r = server.post("/infer/base", json={"features": feats})
    assert r.status_code == 413, r.text
    msg = r.json()["error"]
    assert "MAX_REQUEST_TOKENS" in msg and "send at most" in msg
    fit = int(msg.split("send at most ")[1].split()[0])
    assert 1 <= fit < 8
    assert server.post("/infer/base", json={"features": feats[:fit]}).status_code == 200


def test_a_list_longer_than_the_queue_is_413_not_503(server):
    r = server.post("/infer/base", json={"features": [f"Age: {i}" for i in range(9)]})  # MAX_QUEUE=8
    assert r.status_code == 413, r.text
    assert "MAX_QUEUE" in r.json()["error"] and "at most 8" in r.json()["error"]
    assert server.post("/infer/base", json={"features": [f"Age: {i}" for i in range(8)]}).status_code == 200


@pytest.mark.parametrize("body, says", [
    ('{"features": ' + "[" * 10000 + "]" * 10000 + "}", "nested deeper"),
    ('{"features": "Age: 1", "x": ' + "7" * 5000 + "}", "digits"),
    (b'{"features": "\xff"}', "not UTF-8"),
])
def test_unparseable_bodies_name_the_reason(server, body, says):
    r = server.post("/infer/base", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert says in r.json()["error"]


def codegen_in_background(server, n=900):
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(server.post, "/generate/codegen", json={"prompt": "Write a long essay.", "max_new_tokens": n})
    pool.shutdown(wait=False)
    return fut


def wait_running(server, path="/generate/codegen", before=0.0):
    wait_loaded(server, [path])
    for _ in range(600):  # the generation's batch has started
        if metric(server, "serve_batch_size_count", endpoint=path) > before:
            return
        time.sleep(0.05)
    pytest.fail("the generation never started")


def test_a_long_generation_does_not_stall_creditmix(server):
    assert server.post("/infer/base", json={"features": FEATURES}).status_code == 200  # loaded, prior computed
    before = metric(server, "serve_batch_size_count", endpoint="/generate/codegen")
    gen = codegen_in_background(server)
    wait_running(server, before=before)
    for i in range(3):  # CreditMix answers while the generation (about 900 steps) still runs
        r = server.post("/infer/sft", json={"features": f"Age: {30 + i}"})
        assert r.status_code == 200, r.text
        assert not gen.done(), "the generation finished before CreditMix answered: no evidence of concurrency"
    r = gen.result()
    assert r.status_code == 200, r.text


def test_a_client_that_leaves_stops_its_generation(server):
    before = metric(server, "serve_batches_cancelled_total", lane_task="codegen")
    started = metric(server, "serve_batch_size_count", endpoint="/generate/codegen")
    body = json.dumps({"prompt": "Write a long essay.", "max_new_tokens": 900}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /generate/codegen HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_running(server, before=started)
    for _ in range(200):
        if metric(server, "serve_batches_cancelled_total", lane_task="codegen") > before:
            break
        time.sleep(0.05)
    assert metric(server, "serve_batches_cancelled_total", lane_task="codegen") == before + 1
    r = server.post("/generate/codegen", json={"prompt": "Sort a list.", "max_new_tokens": 4})
    assert r.status_code == 200, r.text  # the lane is free again


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(server):
    names = ["base", "sft", "kd", "dpo"]
    feats = ["Age: 23, Occupation: Lawyer", "Age: 61, Annual Income: 90000"]
    alone = {n: [server.post(f"/infer/{n}", json={"features": f}).json() for f in feats] for n in names}
    batches = metric(server, "serve_lane_batch_size_count")
    with ThreadPoolExecutor(8) as pool:  # all four endpoints at once: gathered into shared batches
        futs = {(n, i): pool.submit(server.post, f"/infer/{n}", json={"features": f})
                for n in names for i, f in enumerate(feats)}
        together = {k: f.result() for k, f in futs.items()}
    assert metric(server, "serve_lane_batch_size_count") - batches < 8  # fewer batches than requests
    for (n, i), r in together.items():
        assert r.status_code == 200, r.text
        a, b = r.json(), alone[n][i]
        assert a["model_name"] == str(server.models[n]) == b["model_name"]
        for c in ("Good", "Standard", "Bad"):
            assert a["raw_scores"][c] == pytest.approx(b["raw_scores"][c], abs=2e-3), (n, i, c)
    # each adapter is really applied, and the base endpoint runs with the adapters disabled
    raws = {n: tuple(alone[n][0]["raw_scores"].values()) for n in names}
    assert len(set(raws.values())) == 4
    eps = server.get("/models").json()["endpoints"]
    assert eps["/infer/base"]["adapter"] is None and eps["/infer/kd"]["adapter"] == str(server.models["kd"])
    assert len({eps[f"/infer/{n}"]["shared_base"] for n in names}) == 1


def test_base_endpoint_equals_the_plain_model(server, models):
    """With adapters attached to the shared base, /infer/base still answers what the plain model answers."""
    import creditmix as cm
    import numpy as np
    from common import load_model
    from scoring import prior_for
    model, tok, _ = load_model(str(models["base"]))
    raw = cm.label_scores(model, tok, [cm.prompt_for(FEATURES)])[0]
    prior = prior_for("multi_null", None, cm.null_scores(model, tok))
    a = server.post("/infer/base", json={"features": FEATURES}).json()
    np.testing.assert_allclose([a["raw_scores"][c] for c in cm.LABELS], raw, atol=2e-3)
    np.testing.assert_allclose([a["prior"][c] for c in cm.LABELS], prior, atol=2e-3)


def test_sigterm_stops_the_server_during_a_generation(models, tmp_path):
    c = start(models, tmp_path, MODEL_CODEGEN=str(models["sft"]))
    try:
        gen = codegen_in_background(c)
        wait_running(c)
        t0 = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        c.proc.wait(60)
        print(f"stopped {time.monotonic() - t0:.1f} s after SIGTERM")
        r = gen.result()
        # answered 503: the generation was stopped, not waited for (uvicorn's graceful shutdown waits for it)
        assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
        c.close()


def test_schema_refusals_keep_their_status(server):
    """json_grammar's bounded schema checks: a schema over a size limit is a 413 naming the limit, an invalid one a
    422 (needs json_grammar.SchemaRefused, the schema bounds)."""
    import json_grammar as jg
    if not hasattr(jg, "SchemaRefused"):
        pytest.skip("this json_grammar has no schema bounds (SchemaRefused)")
    doc = "Invoice #INV1 from Bar LLC total USD 50."
    n = jg.DEFAULT_LIMITS.max_properties + 1
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}
    r = server.post("/extract/idp", json={"document": doc, "schema": wide, "max_new_tokens": 16})
    assert r.status_code == 413 and "properties" in r.json()["error"], r.text
    loop = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}
    r = server.post("/extract/idp", json={"document": doc, "schema": loop, "max_new_tokens": 16})
    assert r.status_code in (413, 422) and "Traceback" not in r.text, r.text


# ---------------------------------------------------------------------------------------------------------------
# the OpenAI-compatible API, through the official client

@pytest.fixture(scope="module")
def oai(server):
    import openai
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_openai_models_are_the_endpoints(oai):
    assert [m.id for m in oai.models.list()] == ["base", "sft", "kd", "dpo", "codegen", "idp"]


def test_openai_chat_creditmix_answers_the_label(oai, server):
    r = oai.chat.completions.create(model="kd", messages=[{"role": "user", "content": FEATURES}])
    native = server.post("/infer/kd", json={"features": FEATURES}).json()
    assert r.choices[0].message.content == native["prediction"]
    assert r.choices[0].finish_reason == "stop" and r.model == "kd"
    assert r.model_extra["answer"]["raw_scores"] == pytest.approx(native["raw_scores"], abs=2e-3)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_codegen(oai):
    r = oai.chat.completions.create(model="codegen", max_tokens=6,
                                    messages=[{"role": "system", "content": "You write Python."},
                                              {"role": "user", "content": "Sort a list."}])
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6


SCHEMAS = [
    {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}},
     "required": ["vendor", "total"]},
    {"type": "object", "properties": {"date": {"type": "string"}, "paid": {"type": "boolean"},
                                      "items": {"type": "array", "items": {"type": "integer"}}},
     "required": ["date", "paid", "items"]},
    {"type": "object", "properties": {"kind": {"enum": ["invoice", "receipt"]}, "n": {"type": "integer"}},
     "required": ["kind"]},
]
DOCS = ["Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50.", "Receipt: 3 coffees, paid in cash, 2024-01-09."]


def test_openai_json_schema_replies_are_always_schema_valid(oai):
    import jsonschema
    for schema in SCHEMAS:
        for doc in DOCS:
            r = oai.chat.completions.create(model="idp", max_tokens=40, messages=[{"role": "user", "content": doc}],
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "doc", "schema": schema}})
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)  # a random model: the grammar


class Invoice(BaseModel):
    """What a client asks the IDP endpoint for through openai's parse(response_format=...)."""
    vendor: str
    total: float


def test_openai_structured_output_parse_with_pydantic(oai):
    r = oai.chat.completions.parse(model="idp", max_tokens=40, response_format=Invoice,
                                   messages=[{"role": "user", "content": DOCS[0]}])
    assert isinstance(r.choices[0].message.parsed, Invoice)


def test_openai_errors(oai, server):
    import openai
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="stream"):
        oai.chat.completions.create(model="base", stream=True, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="idp"):
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "\U0001F600" * 1500}])
    assert e.value.status_code == 413 and "tokens" in str(e.value)
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_importing_the_server_loads_nothing_heavy():
    code = ("import sys, serve_creditmix, serving; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'xgrammar', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
