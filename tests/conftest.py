"""Shared fixtures: tiny random models built locally from the embedded SmolLM2 tokenizer (no download), the way
HF's own tests use tiny-random checkpoints. Seconds per test."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Under pytest-xdist each worker gets its share of the cores for torch (and the scripts the tests start, which inherit
# it): two workers each running 2 OpenMP threads on 2 cores spin against each other and run the tiny-model tests
# several times slower. Set before torch is imported; an OMP_NUM_THREADS of your own wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: runs the embedded SmolLM2-135M (slower; few)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: tens of seconds on a 2-core CPU (trainers run as commands)")


# The suite runs on pytest-xdist workers (pytest.ini: -n 2 --dist loadgroup). The longest tests go first, so that
# they run beside the many short ones instead of ending the run alone on one worker (longest first, as measured on
# 2 CPU cores with --durations). A module whose module-scoped fixture is costly (a live server, a real-model merge)
# marks itself xdist_group so that one worker builds it once.
LONGEST_FIRST = (
    "test_docs.py::test_readme_commands_run_as_two_step_variants",
    "test_export.py",
    "test_config.py::test_quick_recipe_trains_two_steps",
    "test_bench.py::test_bench_idp_measures_constrained_against_plain_decoding_on_cpu",
    "test_config.py::test_held_out_evaluation_and_early_stopping",
    "test_bench.py::test_bench_runs_the_trainer_and_scorer_paths_on_cpu",
    "test_distributed.py",
    "test_serve_reliability.py",
    "test_serve_creditmix.py",
    "test_xtok_kd.py::test_compare_prints_both_losses",
    "test_dpo_train.py::test_sft_adapter_is_the_reference",
    "test_sandbox_check.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("/")[-1].split("[")[0]
        return next((i for i, key in enumerate(LONGEST_FIRST) if name == key or name.startswith(key + "::")
                     or (key.endswith(".py") and name.startswith(key))), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the rest keep their order


def build_tiny_model(out: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and vocabulary, random weights, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import models
    tok = AutoTokenizer.from_pretrained(models.embedded_model_dir())
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Base-model evaluations file themselves under runs/: keep them out of the repo during tests."""
    monkeypatch.setenv("DISTILL_SLM_RUNS", str(tmp_path / "runs"))


def shared_data(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not found: {p} (see ../shared/data/PROVENANCE.md)")
    return p


def write_creditmix_sample(outdir: Path, per_class: dict | None = None, seed: int = 7) -> Path:
    """A small synthetic CreditMix source plus its prepared files (creditmix_prepare.py) in outdir."""
    import creditmix_prepare
    import make_sample_data
    from fileio import write_json
    rows = make_sample_data.creditmix_dataset(per_class or {"Good": 20, "Standard": 30, "Bad": 16}, seed)
    src = outdir / "creditmix_dataset.json"
    write_json(src, rows)
    creditmix_prepare.main(creditmix_prepare.parse_args(["--src", str(src), "--outdir", str(outdir),
                                                          "--val_per_class", "4"]))
    return src


@pytest.fixture(scope="session")
def creditmix_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("creditmix")
    write_creditmix_sample(d)
    return d


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory, tiny_model_dir, creditmix_dir) -> Path:
    """A finished 2-step SFT run of the tiny model on the sample CreditMix data."""
    import sft_train
    out = tmp_path_factory.mktemp("runs") / "tiny_sft"
    sft_train.main(sft_train.parse_args([
        "--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"),
        "--save_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--lr", "1e-3"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# a live server (tests/test_serve_*.py)

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, log_dir: Path, headers: dict, timeout: float = 120):
    """`uvicorn serve_creditmix:app` on 127.0.0.1 at a free port with `env` over this process's environment (the
    repo on PYTHONPATH), once it answers /health (60 s at most). The httpx client it returns carries .proc, .log
    (the server's output) and .port; stop_server ends both."""
    import subprocess
    import time

    import httpx
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serve_creditmix:app", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-access-log"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            pytest.fail(f"uvicorn exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail("uvicorn did not answer /health within 60 s")
    client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
    client.proc, client.log, client.port = proc, log_path, port
    return client


def stop_server(client) -> None:
    import subprocess
    client.close()
    client.proc.terminate()
    try:
        client.proc.wait(15)
    except subprocess.TimeoutExpired:
        client.proc.kill()


def metric(client, name: str, **labels) -> float:
    """The sum of a live server's /metrics samples named `name` with these labels."""
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def exits_2(fn, capsys) -> str:
    """Run fn as a script's main runs (under user_errors): it must exit 2 with one line on stderr; returns it."""
    from fileio import user_errors
    with pytest.raises(SystemExit) as e:
        with user_errors():
            fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith("error: ")
    assert not any("Traceback" in line for line in err)
    return err[-1]


def nonzero_lora_b(model, std: float = 0.05) -> None:
    """LoRA B starts at zero, so a fresh adapter changes nothing and lora_A gets no gradient: draw B from N(0, std)
    (torch's global generator), as a trained adapter would have it."""
    import torch
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
