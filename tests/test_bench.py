"""bench.py's CPU smoke test (issue 8: the benchmark runs on a CPU with a tiny config, so CI runs its code paths)."""
import json

import bench


def test_bench_runs_the_trainer_and_scorer_paths_on_cpu(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.jsonl"
    rows = bench.main(bench.parse_args(["--config", "tiny", "--seq", "64", "--accum", "2", "--steps", "1",
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


def test_bench_idp_measures_constrained_against_plain_decoding_on_cpu(tmp_path, tiny_model_dir, capsys):
    import bench_idp
    out, data = tmp_path / "idp.json", bench_idp.ROOT / "data"
    res = bench_idp.main(bench_idp.parse_args([
        "--model_dir", str(tiny_model_dir), "--data", str(data / "idp_test.jsonl"),
        "--schemas", str(data / "sroie_schema.json"),
        "--n_docs", "2", "--batch_sizes", "1", "2", "--max_new_tokens", "48", "--repeats", "2", "--control",
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
