"""bench.py's CPU smoke test (issue 8: the benchmark runs on a CPU with a tiny config, so CI runs its code paths)."""
import json

import pytest

import bench


def test_bench_runs_the_trainer_and_scorer_paths_on_cpu(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.jsonl"
    rows = bench.main(bench.parse_args(["--shape", "tiny", "--seq", "64", "--accum", "2", "--steps", "1",
                                        "--cases", "sft_baseline,sft,score", "--score_examples", "8",
                                        "--tokenizer", str(tiny_model_dir), "--model_cache", str(tmp_path / "m"),
                                        "--out", str(out)]))
    assert [r["case"] for r in rows] == ["sft_baseline", "sft", "score"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(r["tokens_per_s"] > 0 for r in rows[:2])
    score = rows[2]
    assert score["same_predictions"] and score["max_abs_diff"] < 1e-4  # fp32 on CPU: the fast scorer is exact
    assert [json.loads(line)["case"] for line in out.read_text().splitlines()] == ["sft_baseline", "sft", "score"]
    printed = capsys.readouterr().out
    assert "sft_baseline" in printed and "x base" in printed
    # --table re-reads the file into the same table
    bench.main(bench.parse_args(["--table", str(out)]))
    assert f"same predictions: {score['agree']}" in capsys.readouterr().out


def test_codegen_batches_times_fixed_and_length_batches_on_cpu(tmp_path, tiny_model_dir, capsys):
    """The codegen_batches case generates the same prompts both ways in one run and prints both rates."""
    rows = bench.main(bench.parse_args(["--shape", "tiny", "--seq", "4", "--cases", "codegen_batches",
                                        "--score_examples", "5", "--tokenizer", str(tiny_model_dir),
                                        "--model_cache", str(tmp_path / "m"), "--out", str(tmp_path / "b.jsonl")]))
    (row,) = rows
    assert row["status"] == "ok", row
    assert row["examples_per_s"] > 0 and row["fixed_examples_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["examples_per_s"] / row["fixed_examples_per_s"], rel=0.05)
    assert f"fixed batches: {row['fixed_examples_per_s']} ex/s" in capsys.readouterr().out


def test_bench_idp_measures_constrained_against_plain_decoding_on_cpu(tmp_path, tiny_model_dir, capsys):
    import bench_idp
    out, data = tmp_path / "idp.json", bench_idp.ROOT / "data"
    res = bench_idp.main(bench_idp.parse_args([
        "--model_dir", str(tiny_model_dir), "--data", str(data / "idp_test.jsonl"),
        "--schemas", str(data / "sroie_schema.json"),
        "--n_docs", "2", "--batch_sizes", "1", "2", "--max_new_tokens", "16", "--repeats", "2", "--control",
        "--out", str(out)]))
    rows = res["decode"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        # both ways ran the same number of steps: 2 repeats of the constrained replies' longest length per batch
        assert r["steps"] > 0 and r["steps"] % 2 == 0
        assert r["constrained_ms_per_step"] > 0 and r["unconstrained_ms_per_step"] > 0
        assert 0 < r["grammar_ms_per_step"] < r["constrained_ms_per_step"]
        want = 100 * (r["constrained_ms_per_step"] / r["unconstrained_ms_per_step"] - 1)
        assert abs(r["overhead_pct"] - want) < 1e-6
        assert isinstance(r["noise_median_pct"], float)  # --control: plain against plain
    assert json.loads(out.read_text())["decode"] == rows
    printed = capsys.readouterr().out
    assert "median" in printed and "noise" in printed


def test_unsloth_case_without_unsloth_says_how_to_install_it_in_one_line(tmp_path):
    import importlib.util
    if importlib.util.find_spec("unsloth"):
        pytest.skip("unsloth is importable here")
    args = bench.parse_args(["--shape", "tiny", "--model_cache", str(tmp_path / "m")])
    args.one = "unsloth"
    row = bench.run_one(args)
    assert row["status"] == "failed"
    assert "pip install --no-deps --target /tmp/unsloth_site unsloth==" in row["error"]
    assert row["error"].endswith("--unsloth_site /tmp/unsloth_site") and "\n" not in row["error"]


def test_child_command_forwards_zero_values_and_puts_unsloth_first(tmp_path):
    args = bench.parse_args(["--lora_dropout", "0", "--kernels", "none", "--unsloth_site", str(tmp_path)])
    argv, env = bench.child_command(args, "sft")
    assert "--lora_dropout=0.0" in argv and "--kernels=none" in argv and "--activation_offloading" not in argv
    assert not env.get("PYTHONPATH", "").startswith(str(tmp_path))
    _, env = bench.child_command(args, "unsloth_auto")
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path)


def test_table_compares_each_row_with_the_matching_unsloth_row():
    rows = [
        {"case": "unsloth", "seq": 2048, "cap_gb": None, "status": "ok", "tokens_per_s": 1000.0, "batch": 1,
         "accum": 8},
        {"case": "unsloth_auto", "seq": 2048, "cap_gb": 8.0, "status": "ok", "tokens_per_s": 4000.0, "batch": 8,
         "accum": 1},
        {"case": "sft", "seq": 2048, "cap_gb": None, "status": "ok", "tokens_per_s": 1500.0, "batch": 1, "accum": 8,
         "kernels": ["compile"], "lora_dropout": 0.05},
        {"case": "sft_auto", "seq": 2048, "cap_gb": 8.0, "status": "ok", "tokens_per_s": 2000.0, "batch": 4,
         "accum": 2, "kernels": [], "lora_dropout": 0.0},
    ]
    lines = bench.table(rows).splitlines()
    assert "x unsloth" in lines[0]
    sft = next(ln for ln in lines if ln.startswith("sft[compile]"))
    auto = next(ln for ln in lines if ln.startswith("sft_auto[none] d=0"))
    assert "1.50" in sft.split() and "0.50" in auto.split()  # 1500/1000 at 1x8; 2000/4000 at the best micro-batch


def test_kd_and_dpo_cases_time_the_trainers_on_cpu(tmp_path, tiny_model_dir):
    for case in ("kd", "dpo"):
        args = bench.parse_args(["--shape", "tiny", "--seq", "32", "--accum", "1", "--steps", "1",
                                 "--tokenizer", str(tiny_model_dir), "--model_cache", str(tmp_path / "m")])
        args.one = case
        row = bench.run_one(args)
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["kernels"] == []  # no speed-up runs on a CPU by default


def test_kd_from_the_cache_runs_and_the_profile_says_where_time_goes(tmp_path, tiny_model_dir):
    """kd_cached: KD from the teacher's cached top-k (the teacher freed first) within the issue's 300 bytes per answer
    token; --profile writes a report of the profiled step beside the row."""
    rows = bench.main(bench.parse_args(["--shape", "tiny", "--seq", "48", "--accum", "1", "--steps", "1",
                                        "--cases", "kd_cached,sft,sft_graph", "--tokenizer", str(tiny_model_dir),
                                        "--model_cache", str(tmp_path / "m"), "--profile", str(tmp_path / "prof"),
                                        "--lora_dropout", "0"]))  # sft_graph refuses LoRA dropout
    assert all(r["status"] == "ok" for r in rows), rows
    assert rows[0]["top_k"] == 64 and 258 <= rows[0]["cache_bytes_per_token"] <= 300
    report = (tmp_path / "prof" / "prof_sft.txt").read_text()
    assert report.startswith("sft, seq 48, one optimizer step: wall ") and "Self CPU" in report
    assert rows[1]["prof_wall_s"] > 0 and rows[1]["kernels_per_step"] == 0  # no GPU kernels on a CPU
    # CUDA graphs need CUDA: on a CPU the trainer runs the --cuda_graphs micro-step eagerly
    assert rows[2]["kernels"] == ["graph_step_eager"] and rows[2]["tokens_per_s"] > 0 and "loss_graph" not in rows[2]


def test_kernel_kinds_go_by_what_ran_not_by_words_in_template_names():
    assert bench.kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop<Flash_bwd_kernel_traits, cutlass::bf16>") \
        == "attention"
    assert bench.kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert bench.kernel_kind("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "4-bit dequantise"
    assert bench.kernel_kind("triton_red_fused__to_copy_add_gemm_4bit_mean_mul_0") == "compiled (triton)"


def _frames(*where):
    return [{"filename": f, "line": n, "name": fn} for f, n, fn in where]


def test_memory_history_names_what_is_alive_at_the_peak():
    """--memory_history's report: replaying the allocator trace finds the peak and the blocks alive then, counting
    blocks allocated before the trace's window (the model's weights) from the snapshot's segments."""
    torch_site = ("/x/site-packages/torch/nn/modules/linear.py", 125, "forward")
    weights = _frames(torch_site, ("/x/site-packages/transformers/modeling_utils.py", 900, "load"))
    act = _frames(torch_site, ("/x/site-packages/transformers/models/qwen2/modeling_qwen2.py", 70, "forward"))
    logits = _frames(("/w/compat.py", 300, "fused_head"))
    snapshot = {
        "segments": [{"device": 0, "address": 1000, "segment_pool_id": (0, 0),
                      "blocks": [{"size": 600, "state": "active_allocated", "frames": weights},
                                 {"size": 400, "state": "inactive"}]}],
        "device_traces": [[
            {"action": "alloc", "addr": 5000, "size": 300, "frames": act},
            {"action": "alloc", "addr": 6000, "size": 200, "frames": logits},
            {"action": "free_requested", "addr": 6000, "size": 200},
            {"action": "free_completed", "addr": 6000, "size": 200},
            {"action": "alloc", "addr": 7000, "size": 50, "frames": logits},
            {"action": "free_completed", "addr": 5000, "size": 300},
            {"action": "free_completed", "addr": 7000, "size": 50},
        ]]}
    peak, blocks = bench.live_at_peak(snapshot)
    assert peak == 600 + 300 + 200
    assert sorted(b["size"] for b in blocks) == [200, 300, 600]
    text = bench.memory_table(blocks, "peak")
    lines = text.splitlines()
    assert "3 blocks" in lines[0]
    assert "transformers/modeling_utils.py:900 load" in lines[2]      # the largest first, torch frames skipped
    assert "qwen2/modeling_qwen2.py:70 forward" in lines[3] and "w/compat.py:300 fused_head" in lines[4]


def test_memory_history_at_an_oom_tells_graph_pools_apart():
    snapshot = {"segments": [
        {"device": 0, "address": 0, "segment_pool_id": (0, 0),
         "blocks": [{"size": 2 * 2**30, "state": "active_allocated", "frames": []}]},
        {"device": 0, "address": 2**32, "segment_pool_id": (1, 3),
         "blocks": [{"size": 2**30, "state": "active_allocated",
                     "frames": _frames(("/w/speedups.py", 250, "_capture"))},
                    {"size": 2**20, "state": "inactive"}]}]}
    text = bench.memory_table(bench.live_now(snapshot), "oom")
    assert "3.000 GiB in 2 blocks" in text
    assert any("graph" in ln and "speedups.py:250 _capture" in ln for ln in text.splitlines())
    assert any("default" in ln and "allocated before recording" in ln for ln in text.splitlines())


def test_graph_check_that_runs_out_of_memory_keeps_the_timed_row():
    """At 32,768 tokens under 8 GiB the graphed training ran, then the check's eager micro-step beside the graphs'
    pool ran out of memory (an H200): the check says it did not run, the row keeps its numbers."""
    import torch

    from types import SimpleNamespace

    def micro(**tensors):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    lora = torch.nn.Linear(2, 2)
    step = SimpleNamespace(graphed=SimpleNamespace(captures=1), micro=micro, tensors=lambda inputs, n: {})
    trainer = SimpleNamespace(training_step=step, model=lora, data_collator=lambda rows: {"labels": torch.zeros(1, 3)},
                              _prepare_inputs=lambda x: x)
    out = bench._graph_check(trainer, [{}], batch=1)
    assert out["graph_captured"] and out["graph_captures"] == 1 and "out of memory" in out["graph_check"]
    assert "loss_eager" not in out
