"""compat.stacked_lora_batches: the server's mixed-adapter LoRA forward over stacked adapters. On a tiny random Llama
with LoRA on every projection: its logits equal PEFT's own mixed-adapter forward and, row by row, each adapter alone
(the base rows: adapters disabled); unequal ranks are padded; it steps aside (PEFT's method runs) with gradients on,
active dropout or a LoRA variant it cannot stack; its stacks follow adapters attached later, weights written in
place and scales set; its op count stays flat in the number of adapters in a batch. The bitsandbytes layers use
the same function but are not tested here (bitsandbytes 4-bit does not run on a CPU)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compat

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["__base__", "a0", "a1", "a2", "a2", "a0"]
N_LORA_LAYERS = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def lora_config(r: int, i: int, **extra):
    from peft import LoraConfig
    # alpha differs per adapter: each has its own scaling, which the stacks fold into B
    return LoraConfig(r=r, lora_alpha=2 * r + i, lora_dropout=0.1, target_modules="all-linear",
                      init_lora_weights=False, **extra)


def tiny_peft(ranks=(4, 4, 4), extra: dict | None = None):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    pm = None
    for i, r in enumerate(ranks):
        cfg = lora_config(r, i, **(extra or {}).get(i, {}))
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name="a0")
        else:
            pm.add_adapter(f"a{i}", cfg)
    return pm.eval()


def batch(n: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on some rows
    mask[3, :3] = 0
    return ids, mask


@pytest.fixture
def peft_calls(monkeypatch):
    """How many times PEFT's own _mixed_batch_forward ran (the stacked path's fallback, or STACKED off)."""
    from peft.tuners.lora.layer import Linear
    calls = [0]
    original = Linear._mixed_batch_forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "_mixed_batch_forward", counted)
    return calls


def mixed_logits(pm, ids, mask, rows, stacked: bool, grad: bool = False):
    compat.stacked_lora_batches(pm, on=stacked)
    with torch.inference_mode(not grad):
        return pm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits.detach()


def alone(pm, ids, mask, rows):
    """Each row through the model with only its adapter active (no adapter_names: neither mixed-batch path), or
    with the adapters disabled for the base rows."""
    out = []
    with torch.inference_mode():
        for i, name in enumerate(rows):
            x = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
            if name == "__base__":
                with pm.disable_adapter():
                    out.append(pm(**x).logits)
            else:
                pm.set_adapter(name)
                out.append(pm(**x).logits)
    return torch.cat(out)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 8, 4)], ids=["equal ranks", "unequal ranks (padded)"])
def test_stacked_forward_equals_peft_and_each_adapter_alone(ranks, peft_calls):
    pm = tiny_peft(ranks)
    ids, mask = batch(len(ROWS))
    peft = mixed_logits(pm, ids, mask, ROWS, stacked=False)
    assert peft_calls[0] == N_LORA_LAYERS
    stacked = mixed_logits(pm, ids, mask, ROWS, stacked=True)
    assert peft_calls[0] == N_LORA_LAYERS  # every layer took the stacked path
    close(stacked, peft)
    ref = alone(pm, ids, mask, ROWS)
    close(stacked, ref)
    base = alone(pm, ids, mask, ["__base__"] * len(ROWS))
    for i, name in enumerate(ROWS):  # the adapters really change the answer (so the equalities above can fail)
        assert (name == "__base__") == bool(torch.allclose(stacked[i], base[i], atol=1e-4)), name


def test_a_batch_of_one_adapter_or_only_the_base(peft_calls):
    pm = tiny_peft()
    ids, mask = batch(4)
    for rows in (["a1"] * 4, ["__base__"] * 4):
        close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    assert peft_calls[0] == 0


def test_peft_runs_where_stacking_would_not_be_exact(peft_calls):
    pm = tiny_peft(extra={2: {"lora_bias": True}})  # a2 has a LoRA bias: not stackable
    ids, mask = batch(len(ROWS))
    # gradients on (training): PEFT's forward
    close(mixed_logits(pm, ids, mask, ROWS, stacked=True, grad=True), mixed_logits(pm, ids, mask, ROWS, False))
    assert peft_calls[0] == 2 * N_LORA_LAYERS
    # a batch naming the adapter with a bias falls back; one without it is stacked
    peft_calls[0] = 0
    close(mixed_logits(pm, ids, mask, ROWS, stacked=True), alone(pm, ids, mask, ROWS))
    assert peft_calls[0] == N_LORA_LAYERS
    rows = ["a0", "__base__", "a1", "a1", "a0", "a0"]
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    assert peft_calls[0] == N_LORA_LAYERS
    # LoRA dropout active: PEFT's forward, whose dropout the stacks would skip (PEFT refuses adapter_names on a
    # model in training mode, so only the dropout modules are switched)
    for m in pm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train()
    mixed_logits(pm, ids, mask, rows, stacked=True)
    assert peft_calls[0] == 2 * N_LORA_LAYERS


def test_stacks_follow_adapters_attached_later_weights_written_and_scales_set(peft_calls):
    from peft.tuners.lora import LoraLayer
    pm = tiny_peft(ranks=(4, 4))
    ids, mask = batch(4)
    rows = ["a0", "a1", "__base__", "a0"]
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))  # stacks built
    pm.add_adapter("a2", lora_config(8, 2))
    pm.eval()
    compat.stacked_lora_batches(pm)  # as the server does after attaching (new layers would get the stacked path)
    rows = ["a2", "a1", "a0", "a2"]
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["a1"].weight.mul_(3)
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("a2", 0.5)  # scaling = 0.5 * alpha / r
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    pm.delete_adapter("a0")
    rows = ["a2", "a1", "__base__", "a1"]
    close(mixed_logits(pm, ids, mask, rows, stacked=True), alone(pm, ids, mask, rows))
    assert peft_calls[0] == 0


def _serve_memory():
    spec = importlib.util.spec_from_file_location("serve_memory", ROOT / "gpu" / "serve_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stacked_ops_stay_flat_in_the_number_of_adapters():
    count_ops = _serve_memory().count_ops
    pm = tiny_peft()
    ids, mask = batch(6)
    ops = {}
    for stacked in (True, False):
        for k in (1, 2, 3):
            rows = [f"a{i % k}" for i in range(6)]
            mixed_logits(pm, ids, mask, rows, stacked)  # stacks built outside the count
            ops[stacked, k] = count_ops(lambda: mixed_logits(pm, ids, mask, rows, stacked))
    assert ops[True, 2] == ops[True, 3]  # one gather + bmm pair per layer, whatever the adapters
    assert ops[False, 1] < ops[False, 2] < ops[False, 3]  # PEFT: per adapter, per layer
    assert ops[True, 3] < ops[False, 3]


def test_server_slots_stack_adapters_attached_one_after_another(tiny_model_dir, tmp_path):
    """ModelSlots attaches adapters as endpoints are first used; scores of a mixed batch after each attach equal
    those of a server with STACKED_LORA off."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import creditmix as cm
    import serving
    runs = []
    for i in range(3):
        torch.manual_seed(10 + i)
        d = tmp_path / f"run{i}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(4, i)).save_pretrained(d)
        (d / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
        runs.append(str(d))
    prompts = [cm.prompt_for(f"Age: {20 + i}, Occupation: Scientist") for i in range(6)]

    def scores(stacked: bool, n_adapters: int):
        slots = serving.ModelSlots("none", False, 30, serving.Metrics(), stacked_lora=stacked)
        out = []
        for n in range(1, n_adapters + 1):
            ss = [slots.slot(s) for s in [str(tiny_model_dir)] + runs[:n]]
            for s in ss:
                slots.load(s)
            names = [ss[i % len(ss)].row_name for i in range(len(prompts))]
            out.append(cm.label_scores(ss[0].model, ss[0].tok, prompts, adapter_names=names))
        return out

    got, want = scores(True, 3), scores(False, 3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[2][3], got[1][3])  # row 3 switched from base to the third adapter


def test_stacked_lora_is_on_unless_the_environment_says_0():
    from serve_creditmix import ServeConfig
    assert ServeConfig.from_env({}).stacked_lora
    assert not ServeConfig.from_env({"STACKED_LORA": "0"}).stacked_lora


def test_serve_memory_reports_ops_per_forward_of_both_paths(tmp_path, capsys):
    sm = _serve_memory()
    rows = sm.main(sm.parse_args(["--shape", "tiny", "--batch", "8", "--repeats", "1", "--work", str(tmp_path)]))
    ops = {r["mode"]: r["ops_per_forward"] for r in rows if "mode" in r}
    assert set(ops) == {"mixed", "per_adapter", "mixed_peft", "per_adapter_peft"}
    assert ops["mixed"] < ops["mixed_peft"] and ops["per_adapter"] < ops["per_adapter_peft"]
    out = capsys.readouterr().out
    assert "| ops per forward |" in out and "stacked vs PEFT's loop on the mixed batch" in out
