"""--config recipes (cli.parse), the shared training flags (training.add_training_args) and recipes/."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import models
import training
from fileio import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
QUICK = sorted((ROOT / "recipes" / "quick").glob("*.yaml"))
SCRIPT = {"sft": "sft_train", "kd": "kd_train", "dpo": "dpo_train"}


def script_of(recipe: Path):
    return importlib.import_module(SCRIPT[recipe.stem.rsplit("_", 1)[1]])


def write(tmp_path, text, name="recipe.yaml") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


# ----------------------------------------------------------------------------------------------------------------
# the file and the command line

def test_file_sets_flags_and_the_command_line_wins(tmp_path, capsys):
    import sft_train
    f = write(tmp_path, "student: smollm2-135m\ndata: d.jsonl\nsave_dir: runs/a\nlr: 1e-3\nepochs: 3\n"
                        "report_to: [tensorboard]\nactivation_offloading: true\n")
    args = sft_train.parse_args(["--config", f, "--epochs", "5", "--save_dir=runs/b"])
    assert (args.student, args.data, args.lr, args.epochs, args.save_dir) == ("smollm2-135m", "d.jsonl", 1e-3, 5.0,
                                                                              "runs/b")
    assert args.activation_offloading is True and args.report_to == ["tensorboard"]
    assert args.max_len == 1024  # neither: the script's default
    assert args.sources == {"file": f, "from_file": ["activation_offloading", "data", "lr", "report_to", "student"],
                            "from_command_line": ["epochs", "save_dir"], "overridden": {"epochs": 3.0,
                                                                                       "save_dir": "runs/a"}}
    assert "--epochs 5.0 on the command line overrides" in capsys.readouterr().err
    assert "sources" not in vars(args)  # run.json's "args" holds the flags only


def test_a_switch_the_file_turns_on_is_turned_off_with_no_flag(tmp_path):
    import kd_train
    f = write(tmp_path, "data: d.jsonl\nsave_dir: r\nidp_mode: true\n")
    assert kd_train.parse_args(["--config", f]).idp_mode is True
    args = kd_train.parse_args(["--config", f, "--no_idp_mode"])
    assert args.idp_mode is False and args.sources["overridden"] == {"idp_mode": True}


def test_without_a_file_nothing_changes():
    import sft_train
    args = sft_train.parse_args(["--data", "d.jsonl", "--save_dir", "r"])
    assert args.config is None and args.sources == {"file": None} and cli.config_record(args) is None
    with pytest.raises(SystemExit):  # a required flag is still required without a file
        sft_train.parse_args(["--data", "d.jsonl"])


def test_a_repeated_flag_on_the_command_line_replaces_the_files_list(tmp_path):
    import infer_creditmix
    f = write(tmp_path, "model_dir: smollm2-135m\nfeatures: ['Age: 23', 'Age: 40']\n")
    assert infer_creditmix.parse_args(["--config", f]).features == ["Age: 23", "Age: 40"]
    assert infer_creditmix.parse_args(["--config", f, "--features", "Age: 50"]).features == ["Age: 50"]


@pytest.mark.parametrize("text, message", [
    ("student: smollm2-135m\nlrr: 1e-3\n", r"recipe.yaml: line 2: unknown key 'lrr': not a flag of .*did you mean lr"),
    ("quantize: 8bit\n", r"recipe.yaml: line 1: --quantize: '8bit' is not one of auto, 4bit, none"),
    ("lr: fast\n", r"recipe.yaml: line 1: --lr: 'fast' is not a valid value"),
    ("max_steps: 2.5\n", r"recipe.yaml: line 1: --max_steps takes a whole number"),
    ("resume: yes please\n", r"recipe.yaml: line 1: --resume is a switch: write true or false"),
    ("lr: 1e-3\nepochs: 2\nlr: 2e-3\n", r"recipe.yaml: line 3: 'lr' is given twice \(first on line 1\)"),
    ("data: [a, b]\n", r"recipe.yaml: line 1: --data takes one value, not a list"),
    ("training:\n  lr: 1e-3\n", r"recipe.yaml: line 1: training: a flag takes a value or a list, not a mapping"),
    ("lr: [1e-3\n", r"recipe.yaml: .*not valid YAML"),
    ("config: other.yaml\n", r"recipe.yaml: line 1: a config file cannot name another"),
])
def test_bad_file_is_one_line_naming_file_line_and_key(tmp_path, text, message):
    import sft_train
    with pytest.raises(UserError, match=message):
        sft_train.parse_args(["--config", write(tmp_path, text), "--data", "d", "--save_dir", "r"])


def test_unknown_key_exits_2_with_one_line(tmp_path):
    f = write(tmp_path, "student: smollm2-135m\nwarmup: 0.1\n")
    r = subprocess.run([sys.executable, "sft_train.py", "--config", f], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: {f}: line 2: unknown key 'warmup': not a flag of "
                                                 "sft_train.py (did you mean warmup_ratio?)")


def test_missing_config_file(tmp_path):
    import kd_train
    with pytest.raises(UserError, match=r"--config nope.yaml: no such file"):
        kd_train.parse_args(["--config", "nope.yaml"])


def test_help_shows_defaults_and_the_docstring_as_written(capsys):
    import sft_train
    with pytest.raises(SystemExit):
        sft_train.parse_args(["--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # argparse wraps the help column
    assert "(default: Qwen/Qwen2.5-3B-Instruct)" in flat and "(default: 0.0002)" in flat and "(default: 42)" in flat
    first = sft_train.__doc__.strip().splitlines()[2].strip()
    assert any(line.strip() == first for line in out.splitlines())  # a docstring command stays on one line
    assert "--save_dir SAVE_DIR" in out and "(default: None)" not in flat


def test_help_reflects_the_config(capsys, tmp_path):
    import dpo_train
    with pytest.raises(SystemExit):
        dpo_train.parse_args(["--config", write(tmp_path, "beta: 0.3\n"), "--help"])
    assert "(default: 0.3)" in " ".join(capsys.readouterr().out.split())


def test_every_recipe_parses_with_its_script():
    assert len(RECIPES) == 9 and len(QUICK) == 9  # CreditMix, IDP, CodeGen x SFT, KD, DPO
    assert {r.name for r in RECIPES} == {q.name for q in QUICK}
    for recipe in RECIPES + QUICK:
        args = script_of(recipe).parse_args(["--config", str(recipe)])
        assert Path(ROOT / args.data).is_file(), recipe
        assert args.sources["from_command_line"] == []
    for q in QUICK:
        args = script_of(q).parse_args(["--config", str(q)])
        assert args.student == "smollm2-135m" and args.max_steps == 2 and args.max_len <= 640


def test_one_declaration_of_the_model_loading_flags():
    """--quantize and --trust_remote_code come from cli.add_load_args everywhere (one help text each)."""
    offenders = [p.name for p in ROOT.glob("*.py") if p.name != "cli.py"
                 and ('"--quantize"' in p.read_text() or '"--trust_remote_code"' in p.read_text())]
    assert offenders == []


# ----------------------------------------------------------------------------------------------------------------
# the training flags

def test_option_lists_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    assert set(training.OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(training.SCHEDULERS) <= {s.value for s in SchedulerType}


def test_flags_reach_the_training_arguments(tmp_path):
    import sft_train
    from trl import SFTConfig
    args = sft_train.parse_args(["--data", "d", "--save_dir", str(tmp_path), "--lr_scheduler_type", "cosine",
                                 "--warmup_ratio", "0.1", "--weight_decay", "0.01", "--optim", "paged_adamw_8bit",
                                 "--max_grad_norm", "0.5", "--val_frac", "0.1", "--eval_steps", "5",
                                 "--save_steps", "10", "--early_stopping_patience", "2", "--save_total_limit", "3",
                                 "--report_to", "none"])
    training.check_training_args(args)
    assert args.load_best_model_at_end  # early stopping turns it on
    c = training.trl_config(SFTConfig, training.trl_kwargs(args, str(tmp_path)))
    assert (c.lr_scheduler_type.value, c.warmup_steps, c.weight_decay, c.optim.value, c.max_grad_norm) == (
        "cosine", 0.1, 0.01, "paged_adamw_8bit", 0.5)
    assert (c.eval_strategy.value, c.eval_steps, c.load_best_model_at_end, c.metric_for_best_model,
            c.save_total_limit, c.report_to) == ("steps", 5, True, "eval_loss", 3, [])


@pytest.mark.parametrize("flags, message", [
    (["--eval_steps", "5"], "--eval_steps needs an evaluation set"),
    (["--load_best_model_at_end"], "--load_best_model_at_end needs an evaluation set"),
    (["--val_frac", "0.1", "--eval_data", "e"], "give --eval_data or --val_frac, not both"),
    (["--val_frac", "1.5"], r"--val_frac must be in \[0, 1\)"),
    (["--val_frac", "0.1", "--load_best_model_at_end", "--eval_steps", "3"], "multiple of --eval_steps"),
    (["--report_to", "none", "tensorboard"], "--report_to none goes alone"),
])
def test_bad_training_flags(flags, message):
    import sft_train
    args = sft_train.parse_args(["--data", "d", "--save_dir", "r"] + flags)
    with pytest.raises(UserError, match=message):
        training.check_training_args(args)


@pytest.mark.parametrize("tracker, pip", [("trackio", "trackio"), ("mlflow", "mlflow-skinny sqlalchemy alembic"),
                                         ("wandb", "wandb")])
def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch, tracker, pip):
    import sft_train
    from transformers.integrations import integration_utils as iu
    monkeypatch.setattr(iu, f"is_{tracker}_available", lambda: False)
    args = sft_train.parse_args(["--data", "d", "--save_dir", "r", "--report_to", tracker])
    with pytest.raises(UserError, match=rf"--report_to {tracker}: the {tracker} package is not installed "
                                        rf"\(pip install {pip}"):
        training.check_training_args(args)


def test_mlflow_without_a_server_needs_its_local_store(monkeypatch):
    import importlib.util

    import sft_train
    from transformers.integrations import integration_utils as iu
    monkeypatch.setattr(iu, "is_mlflow_available", lambda: True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    args = sft_train.parse_args(["--data", "d", "--save_dir", "r", "--report_to", "mlflow"])
    with pytest.raises(UserError, match=r"--report_to mlflow: without MLFLOW_TRACKING_URI .* pip install sqlalchemy"):
        training.check_training_args(args)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    training.check_training_args(args)  # a server: the client is enough


def test_report_to_none_writes_no_event_files(tmp_path, tiny_model_dir, creditmix_dir):
    import sft_train
    base = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_sft.jsonl"), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
    sft_train.main(sft_train.parse_args(base + ["--save_dir", str(tmp_path / "none"), "--report_to", "none"]))
    assert not (tmp_path / "none" / "logs").exists() and (tmp_path / "none" / "metrics.jsonl").is_file()
    sft_train.main(sft_train.parse_args(base + ["--save_dir", str(tmp_path / "tb")]))  # default: tensorboard
    assert list((tmp_path / "tb" / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("script", ["kd_train", "dpo_train"])
def test_held_out_evaluation_reaches_kd_and_dpo(script, tmp_path, tiny_model_dir, creditmix_dir):
    """KD with a teacher (its own eval loss: the CE + divergence mix) and DPO evaluate the held-out share too."""
    mod = importlib.import_module(script)
    data = {"kd_train": "creditmix_kd.jsonl", "dpo_train": "creditmix_dpo.jsonl"}[script]
    argv = ["--student", str(tiny_model_dir), "--data", str(creditmix_dir / data), "--save_dir", str(tmp_path / "r"),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--logging_steps", "1", "--val_frac", "0.1", "--eval_steps", "1", "--save_steps", "1",
            "--load_best_model_at_end", "--report_to", "none"]
    if script == "kd_train":
        argv += ["--teacher", str(tiny_model_dir)]
    metrics = mod.main(mod.parse_args(argv))
    assert metrics["evaluations"] == 2 and metrics["best_eval_step"] in (1, 2) and metrics["data_rows"]["eval"]
    logs = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    key = "eval_kd_loss" if script == "kd_train" else "eval_rewards/accuracies"
    assert [h["step"] for h in logs if key in h] == [1, 2]


def test_val_frac_split_is_seeded_and_disjoint():
    rows = [{"input": str(i)} for i in range(50)]
    args = type("A", (), {"eval_data": None, "val_frac": 0.1, "seed": 3, "data": "d"})()
    train, held = training.held_out(args, rows, None)
    assert len(held) == 5 and len(train) == 45 and not {r["input"] for r in train} & {r["input"] for r in held}
    assert training.held_out(args, rows, None) == (train, held)


# ----------------------------------------------------------------------------------------------------------------
# the embedded model

@pytest.mark.real_model
@pytest.mark.parametrize("recipe", QUICK, ids=[q.stem for q in QUICK])
def test_quick_recipe_trains_two_steps(recipe, tmp_path, monkeypatch):
    """Every quick variant, as a user runs it (from the repo root), with --save_dir overridden."""
    monkeypatch.chdir(ROOT)
    mod = script_of(recipe)
    out = tmp_path / recipe.stem
    metrics = mod.main(mod.parse_args(["--config", str(recipe.relative_to(ROOT)), "--save_dir", str(out)]))
    assert metrics["train_steps"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["save_dir"] == str(out) and run["args"]["student"] == "smollm2-135m"
    assert run["config"]["file"] == str(recipe.relative_to(ROOT))
    assert run["config"]["from_command_line"] == ["save_dir"] and "student" in run["config"]["from_file"]
    assert run["config"]["overridden"] == {"save_dir": f"runs/quick/{recipe.stem}"}
    assert list((out / "logs").glob("events.out.tfevents.*"))  # --report_to tensorboard, the default


@pytest.mark.real_model
def test_held_out_evaluation_and_early_stopping(tmp_path, monkeypatch):
    """A learning rate far too high makes the held-out loss worse after the first evaluation: early stopping ends
    the run there and the saved adapter is the best checkpoint's."""
    import sft_train
    from safetensors.torch import load_file
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    metrics = sft_train.main(sft_train.parse_args([
        "--config", "recipes/quick/creditmix_sft.yaml", "--save_dir", str(out), "--max_steps", "8", "--lr", "0.5",
        "--warmup_ratio", "0", "--val_frac", "0.005", "--eval_steps", "1", "--save_steps", "1",
        "--early_stopping_patience", "1"]))
    assert metrics["evaluations"] >= 2 and metrics["stopped_early"] and metrics["train_steps"] < 8
    evals = [json.loads(line)["eval_loss"] for line in open(out / "metrics.jsonl") if '"eval_loss"' in line]
    assert metrics["best_eval_loss"] == pytest.approx(min(evals), abs=1e-6) and min(evals) < evals[-1]
    assert metrics["data_rows"]["eval"]["ok"] == 4  # 0.5 % of the 783 sample rows
    best = load_file(out / f"checkpoint-{metrics['best_eval_step']}" / "adapter_model.safetensors")
    saved = load_file(out / "adapter_model.safetensors")
    assert all((best[k] == saved[k]).all() for k in best)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["overridden"]["max_steps"] == 2 and run["args"]["max_steps"] == 8
    assert models.resolve_model(str(out)).adapter == str(out)


def readme_table() -> list[tuple[str, str]]:
    """(README command, recipe equivalent) of docs/recipes.md's table: the first code span of each cell."""
    import re
    rows = []
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        cells = line.split(" | ")
        if len(cells) == 2 and "--config" in cells[1]:
            rows.append(tuple(re.search(r"`([^`]+)`", c).group(1) for c in cells))
    return rows


def test_every_recipe_equivalent_resolves_to_the_readme_command():
    """Each row of docs/recipes.md's table: the recipe plus its overrides gives the README command's flags."""
    import shlex
    rows = readme_table()
    assert len(rows) >= 25
    for readme, recipe in rows:
        a, b = shlex.split(readme), shlex.split(recipe)
        a, b = a[[i for i, t in enumerate(a) if t.endswith(".py")][0]:], b[[i for i, t in enumerate(b)
                                                                           if t.endswith(".py")][0]:]
        assert a[0] == b[0], (readme, recipe)
        mod = importlib.import_module(a[0][:-3])
        want, got = vars(mod.parse_args(a[1:])), vars(mod.parse_args(b[1:]))
        assert got.pop("config").startswith("recipes/") and want.pop("config") is None
        assert got == want, (readme, {k: (want[k], got[k]) for k in want if want[k] != got[k]})
