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
