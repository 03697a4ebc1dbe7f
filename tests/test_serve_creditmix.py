"""serve_creditmix.py through a real HTTP connection: one uvicorn subprocess per module on a free loopback port,
serving tiny random models (base, codegen, idp: one shared copy), a copy of one (dpo: only the load-once test touches
it), a missing run dir (kd) and an unfinished run dir (sft), with API_KEY set. Checks the README's response JSON and
its calibration, lists, load once under concurrent first requests, micro-batching, the bad inputs of the issue, auth,
disconnects, /metrics, and the CodeGen / IDP endpoints (budget cap, schema-valid JSON)."""
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from fileio import UserError
from conftest import metric, start_server, stop_server

pytestmark = pytest.mark.xdist_group("test_serve_creditmix")  # its module fixture (a server): one worker

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FEATURES = ("Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, "
            "Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments")
FIELDS = ["model_name", "prediction", "scores", "raw_scores", "prior", "probabilities", "top2_margin"]
LABELS = ["Good", "Standard", "Bad"]


CALIBRATION = {"calibration": "batch", "prior": [-1.5, -2.0, -2.5], "temperature": 2.0, "picked_by": "test",
               "data": {"path": "val.jsonl"}}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    dpo = shutil.copytree(tiny_model_dir, d / "tiny-dpo")
    unfinished = d / "unfinished_run"  # a run dir whose training never saved an adapter
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    # what eval_creditmix.py would have recorded for the dpo endpoint's model (a plain folder: runs/base-<name>)
    (d / "runs" / "base-tiny-dpo").mkdir(parents=True)
    (d / "runs" / "base-tiny-dpo" / "creditmix_calibration.json").write_text(json.dumps(CALIBRATION))
    client = start_server({"HF_HUB_OFFLINE": "1", "API_KEY": KEY, "OMP_NUM_THREADS": "1",
                           "MODEL_BASE": str(tiny_model_dir), "MODEL_SFT": str(unfinished),
                           "MODEL_KD": str(d / "missing_run"), "MODEL_DPO": str(dpo),
                           "MODEL_CODEGEN": str(tiny_model_dir), "MODEL_IDP": str(tiny_model_dir),
                           "MAX_NEW_TOKENS": "32", "BATCH_WAIT_MS": "100", "MAX_BATCH": "8", "MAX_ITEMS": "4",
                           "MAX_FEATURES_CHARS": "300", "MAX_BODY_BYTES": "4096", "LOAD_RETRY_S": "600",
                           "DISTILL_SLM_RUNS": str(d / "runs")}, d, AUTH)
    client.specs = {"base": str(tiny_model_dir), "dpo": str(dpo)}
    yield client
    stop_server(client)


def infer(client, endpoint="base", features=FEATURES, **kw):
    return client.post(f"/infer/{endpoint}", json={"features": features}, **kw)


def check_answer(a: dict, model_name: str):
    assert list(a) == FIELDS  # exactly the README's fields, in its order
    assert a["model_name"] == model_name
    for k in ("scores", "raw_scores", "prior", "probabilities"):
        assert list(a[k]) == LABELS
    scores = np.array([a["scores"][c] for c in LABELS])
    raw = np.array([a["raw_scores"][c] for c in LABELS])
    prior = np.array([a["prior"][c] for c in LABELS])
    probs = np.array([a["probabilities"][c] for c in LABELS])
    np.testing.assert_allclose(scores, raw - prior, atol=2e-4)  # calibrated = raw - prior (4-digit rounding)
    assert probs.sum() == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(probs, np.exp(scores) / np.exp(scores).sum(), atol=1e-3)
    assert a["prediction"] == LABELS[int(np.argmax(scores))]
    top = np.sort(scores)[::-1]
    assert a["top2_margin"] == pytest.approx(top[0] - top[1], abs=2e-4)
    assert a["top2_margin"] >= 0


# ---------------------------------------------------------------------------------------------------------------

def test_readme_response_and_calibration(server):
    r = infer(server)
    assert r.status_code == 200, r.text
    check_answer(r.json(), server.specs["base"])


def test_a_list_gets_a_list_in_order_equal_to_single_answers(server):
    feats = [FEATURES, "Age: 61, Occupation: Lawyer", "Age: 35, Annual Income: 90000"]
    r = infer(server, features=feats)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == 3
    for f, a in zip(feats, out):
        check_answer(a, server.specs["base"])
        single = infer(server, features=f).json()
        for c in LABELS:
            assert a["raw_scores"][c] == pytest.approx(single["raw_scores"][c], abs=2e-3)
    assert out[0]["raw_scores"] != out[1]["raw_scores"]  # each item scored on its own features


def test_concurrent_first_requests_load_the_model_once(server):
    before = server.get("/models").json()["endpoints"]["/infer/dpo"]
    assert before["state"] == "not loaded" and before["loads"] == 0
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: infer(server, "dpo", f"Age: {20 + i}"), range(8)))
    assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs]
    after = server.get("/models").json()["endpoints"]["/infer/dpo"]
    assert after["state"] == "loaded" and after["loads"] == 1
    assert metric(server, "serve_model_loads_total", model=server.specs["dpo"]) == 1
    # the model stays cached: more requests, still one load
    assert infer(server, "dpo").status_code == 200
    assert server.get("/models").json()["endpoints"]["/infer/dpo"]["loads"] == 1


def test_an_endpoint_serves_the_calibration_eval_creditmix_recorded(server):
    """As infer_creditmix.py --calibration auto: the recorded prior, and probabilities at the fitted temperature."""
    r = infer(server, "dpo")
    assert r.status_code == 200, r.text
    a = r.json()
    assert [a["prior"][c] for c in LABELS] == pytest.approx(CALIBRATION["prior"], abs=1e-4)
    z = np.array([a["scores"][c] for c in LABELS]) / CALIBRATION["temperature"]
    np.testing.assert_allclose([a["probabilities"][c] for c in LABELS], np.exp(z) / np.exp(z).sum(), atol=1e-3)


def test_concurrent_requests_are_micro_batched(server):
    assert infer(server).status_code == 200  # loaded
    batches = metric(server, "serve_batch_size_count", endpoint="/infer/base")
    items = metric(server, "serve_batch_size_sum", endpoint="/infer/base")
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: infer(server, features=f"Age: {30 + i}"), range(8)))
    assert all(r.status_code == 200 for r in rs)
    assert metric(server, "serve_batch_size_sum", endpoint="/infer/base") - items == 8
    assert metric(server, "serve_batch_size_count", endpoint="/infer/base") - batches < 8  # fewer forward batches


@pytest.mark.parametrize("body, status, says", [
    ('{"features": ', 422, "invalid JSON"),
    ("", 422, "JSON object"),
    ("[1, 2]", 422, "JSON object"),
    ('"Age: 23"', 422, "JSON object"),
    ("{}", 422, "missing field 'features'"),
    ('{"features": ""}', 422, "features is empty"),
    ('{"features": "   "}', 422, "features is empty"),
    ('{"features": 5}', 422, "string or a list of strings, got a number"),
    ('{"features": null}', 422, "got null"),
    ('{"features": {"Age": 23}}', 422, "got an object"),
    ('{"features": ["ok", 7]}', 422, "features[1] must be a string"),
    ('{"features": ["ok", ""]}', 422, "features[1] is empty"),
    ('{"features": []}', 422, "empty list"),
    ('{"features": ["a", "b", "c", "d", "e"]}', 422, "MAX_ITEMS"),
    ('{"features": "%s"}' % ("x" * 301), 422, "301 characters long; the cap is 300"),
    ('{"features": "Age: 1", "calibration": "none"}', 422, "unknown field 'calibration'"),
    ('{"features": "\\ud800"}', 422, "not valid Unicode"),
    (b'{"features": "\xff\xfe"}', 422, "not UTF-8"),
])
def test_bad_input_is_a_clear_4xx(server, body, status, says):
    r = server.post("/infer/base", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    assert "Traceback" not in r.text


def test_bad_requests_beyond_the_body(server):
    r = server.post("/infer/nope", json={"features": FEATURES})
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    r = server.get("/infer/base")
    assert r.status_code == 405 and "GET" in r.json()["error"]
    r = server.post("/infer/base", content=json.dumps({"features": FEATURES}))  # no Content-Type
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = server.post("/infer/base", json={"features": ["x" * 290] * 4 + ["y" * 290] * 20})  # > MAX_BODY_BYTES
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"]


def test_missing_or_unfinished_run_dir_is_503_on_that_endpoint_only(server):
    r = infer(server, "kd")
    assert r.status_code == 503
    assert "missing_run does not exist" in r.json()["error"] and "/infer/kd" in r.json()["error"]
    assert int(r.headers["Retry-After"]) > 0
    r = infer(server, "sft")
    assert r.status_code == 503 and "without a saved adapter" in r.json()["error"]
    assert infer(server, "base").status_code == 200  # the others keep serving
    eps = server.get("/models").json()["endpoints"]
    assert eps["/infer/kd"]["state"] == "error" and "does not exist" in eps["/infer/kd"]["error"]
    assert eps["/infer/base"]["state"] == "loaded"


def test_api_key(server):
    url = str(server.base_url)
    for path in ("/infer/base", "/models", "/metrics", "/openapi.json"):
        method = "POST" if path.startswith("/infer") else "GET"
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, json={"features": FEATURES}, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert "API key" in r.json()["error"]
    assert httpx.get(url + "/health").status_code == 200  # the one open endpoint
    assert infer(server).status_code == 200  # the right key


def test_client_that_disconnects_does_not_stall_the_batch(server):
    assert infer(server).status_code == 200  # loaded
    gone = metric(server, "serve_client_disconnects_total", endpoint="/infer/base")
    batches = metric(server, "serve_batch_size_count", endpoint="/infer/base")
    body = json.dumps({"features": FEATURES}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /infer/base HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    # the request was dropped from its batch (BATCH_WAIT_MS=100: it left while the batch was gathering)
    for _ in range(50):
        if metric(server, "serve_client_disconnects_total", endpoint="/infer/base") > gone:
            break
        time.sleep(0.1)
    assert metric(server, "serve_client_disconnects_total", endpoint="/infer/base") == gone + 1
    assert metric(server, "serve_batch_size_count", endpoint="/infer/base") == batches
    assert infer(server).status_code == 200  # and the endpoint still answers


def test_models_health_and_metrics(server):
    assert server.get("/health").json() == {"status": "ok"}
    eps = server.get("/models").json()["endpoints"]
    assert {p: (e["env"], e["model"]) for p, e in eps.items() if p.startswith("/infer/")}["/infer/base"] == \
        ("MODEL_BASE", server.specs["base"])
    assert set(eps) >= {"/infer/base", "/infer/sft", "/infer/kd", "/infer/dpo"}
    infer(server)
    base = server.get("/models").json()["endpoints"]["/infer/base"]
    assert base["precision"] == "fp32" and base["precision_reason"].startswith("on cpu")  # precision.choose_precision
    infer(server, features="")
    r = server.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    assert metric(server, "serve_requests_total", endpoint="/infer/base", status="200") >= 1
    assert metric(server, "serve_errors_total", endpoint="/infer/base", status="422") >= 1
    assert metric(server, "serve_request_latency_seconds_count", endpoint="/infer/base") >= 2
    assert "Traceback" not in server.log.read_text()


def test_codegen_endpoint(server):
    r = server.post("/generate/codegen", json={"prompt": "Write a function that sorts a list.", "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    a = r.json()
    assert list(a) == ["model_name", "code", "raw", "plan"] and a["plan"] is None
    assert isinstance(a["code"], str) and isinstance(a["raw"], str)
    r = server.post("/generate/codegen", json={"prompt": "Sort a list.", "max_new_tokens": 4.0, "plan_then_code": True})
    assert r.status_code == 200 and isinstance(r.json()["plan"], str)
    for body, says in [({"prompt": "x", "max_new_tokens": 33}, "between 1 and 32 (MAX_NEW_TOKENS)"),
                       ({"prompt": "x", "max_new_tokens": "8"}, "must be an integer"),
                       ({"prompt": "x", "plan_then_code": "yes"}, "true or false"),
                       ({"prompt": " "}, "prompt is empty"), ({}, "missing field 'prompt'")]:
        r = server.post("/generate/codegen", json=body)
        assert r.status_code == 422 and says in r.json()["error"], r.text


def test_idp_endpoint_returns_schema_valid_json(server):
    import jsonschema
    schema = {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}},
              "required": ["vendor", "total"]}
    doc = "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50."
    r = server.post("/extract/idp", json={"document": doc, "schema": schema, "max_new_tokens": 24})
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["valid"] is True and a["error"] is None
    jsonschema.validate(a["output"], schema)  # a random model, yet the grammar makes it valid
    assert a["new_tokens"] <= 24
    for body, says in [({"document": doc, "schema": {"type": "array"}}, "root must be an object"),
                       ({"document": doc, "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
                        "invalid JSON Schema"),
                       ({"document": doc, "schema": [1]}, "schema must be a JSON object"),
                       ({"document": doc, "schema": schema, "max_new_tokens": 2}, "too small"),
                       ({"document": "", "schema": schema}, "document is empty")]:
        r = server.post("/extract/idp", json=body)
        assert r.status_code == 422 and says in r.json()["error"], r.text


def test_loadtest_against_the_server(server, tmp_path):
    import loadtest
    out = tmp_path / "load.json"
    args = loadtest.parse_args(["--url", str(server.base_url), "--endpoint", "base", "--concurrency", "1,3",
                                "--requests", "6", "--rss_requests", "6", "--api_key", KEY, "--out", str(out)])
    results = loadtest.main(args)
    levels = results[0]["levels"]
    assert [lv["clients"] for lv in levels] == [1, 3]
    assert all(lv["requests"] == 6 and lv["errors"] == 0 and lv["p50_ms"] > 0 for lv in levels)
    assert results[0]["rss"]["requests"] == 6  # no --server_pid: RSS is not read, the requests still run
    assert json.loads(out.read_text())["results"][0]["levels"][1]["ok"] == 6


def test_loadtest_refuses_non_loopback_hosts():
    import loadtest
    assert loadtest.require_loopback("http://localhost:8000/") == "http://localhost:8000"
    assert loadtest.require_loopback("http://[::1]:8000")
    for url in ("http://10.1.2.3:8000", "http://8.8.8.8", "ftp://127.0.0.1"):
        with pytest.raises(UserError):
            loadtest.require_loopback(url)


def test_config_from_env():
    from serve_creditmix import ServeConfig
    cfg = ServeConfig.from_env({})
    assert cfg.models["base"] == "Qwen/Qwen2.5-3B-Instruct" and cfg.models["sft"] == "runs/creditmix_sft"
    assert cfg.models["kd"] == "runs/creditmix_kd" and cfg.models["dpo"] == "runs/creditmix_dpo"
    assert cfg.micro_batching and cfg.api_key is None and cfg.max_memory_gb == 8
    assert ServeConfig.from_env({"MAX_MEMORY_GB": "24"}).max_memory_gb == 24
    cfg = ServeConfig.from_env({"MODEL_BASE": "smollm2-135m", "MICRO_BATCHING": "0", "PRELOAD": "all"})
    assert cfg.models["base"] == "smollm2-135m" and not cfg.micro_batching and "kd" in cfg.preload
    for env, says in [({"BATCH_WAIT_MS": "soon"}, "BATCH_WAIT_MS"), ({"MAX_BATCH": "0"}, "at least 1"),
                      ({"QUANTIZE": "8bit"}, "QUANTIZE"), ({"PRELOAD": "sft,xyz"}, "xyz"),
                      ({"MICRO_BATCHING": "maybe"}, "MICRO_BATCHING")]:
        with pytest.raises(UserError, match=says):
            ServeConfig.from_env(env)


def test_a_base_endpoint_shares_the_precision_of_its_adapters(tiny_model_dir, tiny_sft_run, monkeypatch):
    """QUANTIZE=auto: an adapter loads on what it was trained on; a base endpoint of the same base takes that
    precision too, so the endpoints share one copy (one batch across adapters); alone it follows the fit rule."""
    import models
    import precision
    import serving

    def decide(ms, quantize, device=None, **kw):  # as on a GPU: the adapter trained in 4-bit, the base would fit bf16
        return ("4bit", "trained on the 4-bit base") if ms.adapter else ("bf16", "fits")
    monkeypatch.setattr(precision, "decide_precision", decide)
    base = models.resolve_model(str(tiny_model_dir))
    alone = serving.ModelSlots("auto", False, 30, serving.Metrics())
    alone.slot(str(tiny_model_dir))
    assert alone.precision_for(base) == ("bf16", "fits")
    both = serving.ModelSlots("auto", False, 30, serving.Metrics())
    both.slot(str(tiny_model_dir)), both.slot(str(tiny_sft_run))
    prec, why = both.precision_for(base)
    assert prec == "4bit" and "shares one copy with the adapter" in why
    assert serving.ModelSlots("none", False, 30, serving.Metrics()).precision_for(base) == ("bf16", "fits")
