"""dpo_train.py on a tiny random model: DPO raises the chosen-over-rejected margin, the reference is the base with the
adapter disabled (or the SFT policy with --ref_model_dir) and never a second model, bad rows fail with file:line,
length problems are counted skips, --resume continues."""
import json
import re

import pytest
import torch

import dpo_train
import dpo_trainer
from common import chat_prompt, encode_example, load_model, load_tokenizer
from fileio import UserError, write_jsonl
from models import resolve_model

# A consistent preference the tiny model can learn in a few steps: always "Good" over "Bad".
TOY = [{"prompt": f"Customer {i}: income {1000 * i}. Return only the label.", "chosen": "Good", "rejected": "Bad"}
       for i in range(8)]


def run_args(data, save_dir, model_dir, *extra):
    return dpo_train.parse_args(["--student", str(model_dir), "--data", str(data), "--save_dir", str(save_dir),
                                 "--max_len", "64", "--per_device_train_batch_size", "2",
                                 "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--lr", "2e-3",
                                 "--seed", "0", *map(str, extra)])


def answer_logps(model, tok, rows, key):
    """Sum of log p(answer tokens + end-of-turn | chat prompt) per row: our own measure, independent of TRL."""
    out = []
    with torch.no_grad():
        for r in rows:
            ex, _ = encode_example(tok, r["prompt"], r[key], None)
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            labels = torch.tensor(ex["labels"][1:])
            keep = labels != -100
            out.append(logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum().item())
    return torch.tensor(out)


def margins(model, tok, rows):
    return answer_logps(model, tok, rows, "chosen") - answer_logps(model, tok, rows, "rejected")


@pytest.fixture
def toy_file(tmp_path):
    p = tmp_path / "toy_dpo.jsonl"
    write_jsonl(p, TOY)
    return p


def test_dpo_raises_margin_and_writes_run(tiny_model_dir, toy_file, tmp_path):
    base, tok, _ = load_model(str(tiny_model_dir))
    before = margins(base, tok, TOY)
    save = tmp_path / "run"
    metrics = dpo_train.main(run_args(toy_file, save, tiny_model_dir, "--max_steps", 4, "--beta", 0.1))
    assert (save / "adapter_model.safetensors").is_file() and not (save / "model.safetensors").exists()
    run = json.loads((save / "run.json").read_text())
    assert run["method"] == "dpo" and run["args"]["beta"] == 0.1 and run["versions"]["trl"]
    assert run["reference"] == "base_adapter_disabled"
    m = run["metrics"]
    assert m["train_steps"] == 4 and m["data_rows"] == {"total": 8, "used": 8, "ok": 8}
    assert m["reward_accuracy"] == metrics["reward_accuracy"] and m["reward_margin"] > m["first_reward_margin"]
    trained, tok2, ms = load_model(str(save))
    assert ms.adapter == str(save)
    after = margins(trained, tok2, TOY)
    assert after.mean() > before.mean() + 0.5, (before, after)
    assert (after > before).all()


def test_reference_is_base_with_adapter_disabled(tiny_model_dir, toy_file, tmp_path):
    args = run_args(toy_file, tmp_path / "run", tiny_model_dir, "--max_steps", 2)
    model, tok, ms, peft_config = dpo_train.load_policy(args)
    dataset, _ = dpo_train.encode_pairs(tok, dpo_train.read_pairs(str(toy_file)), args.max_len)
    trainer = dpo_trainer.build_trainer(args, model, tok, dataset, peft_config, callbacks=[])
    assert trainer.ref_model is None  # no second model object
    assert list(trainer.model.peft_config) == ["default"]  # no reference adapter either: the reference is the base
    trainer.train()
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    base, _, _ = load_model(str(tiny_model_dir))
    rows = TOY[:4]
    assert torch.allclose(ref_chosen, answer_logps(base, tok, rows, "chosen"), atol=1e-4)
    assert torch.allclose(ref_rejected, answer_logps(base, tok, rows, "rejected"), atol=1e-4)
    policy = trainer.model.eval()
    assert not torch.allclose(answer_logps(policy, tok, rows, "chosen"), ref_chosen, atol=1e-3)  # it did train


def test_sft_adapter_is_the_reference(tiny_model_dir, toy_file, tmp_path):
    import sft_train
    sft_data = tmp_path / "sft.jsonl"
    write_jsonl(sft_data, [{"input": r["prompt"], "output": "Bad"} for r in TOY])
    sft_dir = tmp_path / "sft"
    sft_train.main(sft_train.parse_args(["--student", str(tiny_model_dir), "--data", str(sft_data), "--save_dir",
                                         str(sft_dir), "--max_steps", "3", "--lr", "5e-2", "--max_len", "64",
                                         "--gradient_accumulation_steps", "1", "--logging_steps", "1"]))
    with pytest.raises(UserError, match="pass --student"):
        dpo_train.load_policy(run_args(toy_file, tmp_path / "x", "smollm2-135m", "--ref_model_dir", sft_dir))

    sft, tok, _ = load_model(str(sft_dir))
    sft_margins = margins(sft, tok, TOY)
    save = tmp_path / "sft_dpo"
    dpo_train.main(run_args(toy_file, save, tiny_model_dir, "--max_steps", 4, "--ref_model_dir", sft_dir))
    run = json.loads((save / "run.json").read_text())
    assert run["reference"] == "sft_adapter" and run["init_adapter"] == str(sft_dir)
    assert not (save / "ref").exists()  # TRL's frozen reference copy is not left in the run dir
    dpo, _, _ = load_model(str(save))
    assert (margins(dpo, tok, TOY) > sft_margins + 0.1).all()  # DPO undoes SFT's taught preference for "Bad"

    args = run_args(toy_file, tmp_path / "run", tiny_model_dir, "--max_steps", 2, "--ref_model_dir", sft_dir)
    model, tok, ms, peft_config = dpo_train.load_policy(args)
    assert ms.adapter == str(sft_dir) and peft_config is None
    dataset, _ = dpo_train.encode_pairs(tok, dpo_train.read_pairs(str(toy_file)), args.max_len)
    trainer = dpo_trainer.build_trainer(args, model, tok, dataset, peft_config, callbacks=[])
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default", "ref"}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in lora.items() if ".ref." in n)  # the reference stays put
    assert any(not torch.equal(now[n], w) for n, w in lora.items() if ".default." in n)  # the policy moves
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    base, _, _ = load_model(str(tiny_model_dir))
    assert torch.allclose(ref_chosen, answer_logps(sft, tok, TOY[:4], "chosen"), atol=1e-4)
    assert not torch.allclose(ref_chosen, answer_logps(base, tok, TOY[:4], "chosen"), atol=1e-3)


def test_resume_continues(tiny_model_dir, toy_file, tmp_path):
    save = tmp_path / "run"
    dpo_train.main(run_args(toy_file, save, tiny_model_dir, "--max_steps", 2, "--save_steps", 1))
    assert (save / "checkpoint-2").is_dir()
    m = dpo_train.main(run_args(toy_file, save, tiny_model_dir, "--max_steps", 3, "--save_steps", 1, "--resume"))
    assert m["train_steps"] == 3
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps and steps.count(1) == 1  # the resumed run did not start over
    with pytest.raises(UserError, match="no checkpoint"):
        dpo_train.main(run_args(toy_file, tmp_path / "empty", tiny_model_dir, "--resume"))


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "chosen": "a"}, "line 2: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "line 2: field 'chosen' must be a non-empty string"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' must be a non-empty string"),
    ({"prompt": "p", "chosen": "Good", "rejected": "Good "}, "line 2: 'chosen' and 'rejected' are the same"),
    (["p", "a", "b"], "line 2: expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tiny_model_dir, tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(TOY[0]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{data}: {message}")):
        dpo_train.main(run_args(data, tmp_path / "run", tiny_model_dir))
    assert not (tmp_path / "run").exists()  # nothing written


def test_idp_mode_checks_chosen_json(tmp_path):
    data = tmp_path / "idp_dpo.jsonl"
    good = {"prompt": "Invoice #1 total 5", "chosen": '{"total": 5}', "rejected": '{"total": "5"'}  # invalid: fine
    write_jsonl(data, [good])
    assert dpo_train.read_pairs(str(data), idp_mode=True) == [good]
    write_jsonl(data, [good, {**good, "chosen": '{"total": 5,}'}])
    with pytest.raises(UserError, match=r"line 2: --idp_mode: 'chosen' is not valid JSON"):
        dpo_train.read_pairs(str(data), idp_mode=True)
    assert len(dpo_train.read_pairs(str(data))) == 2  # without --idp_mode they are plain text
    write_jsonl(data, [{**good, "rejected": '{ "total" : 5 }'}])
    with pytest.raises(UserError, match="same JSON document"):
        dpo_train.read_pairs(str(data), idp_mode=True)


def test_length_problems_are_counted_skips(tiny_model_dir, capsys):
    tok = load_tokenizer(resolve_model(str(tiny_model_dir)))
    long_prompt = "word " * 80
    shared = "same start " * 40
    rows = TOY[:3] + [{"prompt": long_prompt, "chosen": "a", "rejected": "b"},
                      {"prompt": "p", "chosen": shared + "yes", "rejected": shared + "no"},
                      {"prompt": "p", "chosen": "x " * 60, "rejected": "y"}]
    dataset, counts = dpo_train.encode_pairs(tok, rows, max_len=64, source="toy.jsonl")
    assert counts == {"total": 6, "used": 4, "ok": 3, "prompt_over_max_len": 1, "same_after_cut": 1,
                      "truncated": 1}
    assert len(dataset) == 4 and all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 64 for r in dataset)
    err = capsys.readouterr().err
    assert "skipped 1 of 6 pairs of toy.jsonl" in err and "--max_len 64" in err
    short = len(tok(chat_prompt(tok, TOY[0]["prompt"]), add_special_tokens=False)["input_ids"])
    _, counts = dpo_train.encode_pairs(tok, TOY[:2] + [rows[4]], max_len=200, max_prompt_len=short - 1)
    assert counts["prompt_over_max_prompt_len"] == 2 and counts["used"] == 1
    with pytest.raises(UserError, match="no pair left to train on"):
        dpo_train.encode_pairs(tok, rows[3:4], max_len=64)


def test_prompt_ids_are_the_inference_prompt(tiny_model_dir):
    """The prompt is common.chat_prompt's, as TRL's conversational path would also give; each answer ends with the
    end-of-turn token (as in SFT), without the newline TRL's template path would add after it."""
    from trl.data_utils import _tokenize
    tok = load_tokenizer(resolve_model(str(tiny_model_dir)))
    row = TOY[0]
    ex, status = dpo_train.encode_pair(tok, row, max_len=512)
    assert status == "ok"
    assert ex["prompt_ids"] == tok(chat_prompt(tok, row["prompt"]), add_special_tokens=False)["input_ids"]
    assert ex["prompt_ids"] == _tokenize(tok, [{"role": "user", "content": row["prompt"]}],
                                         add_generation_prompt=True)["input_ids"]
    assert ex["chosen_ids"] == tok("Good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["rejected_ids"] == tok("Bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_loss_types_are_trls_and_reach_the_config(tmp_path):
    from trl import DPOConfig
    trl_help = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(dpo_train.LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", trl_help))
    args = dpo_train.parse_args(["--data", "d.jsonl", "--save_dir", str(tmp_path), "--beta", "0.25",
                                 "--loss_type", "ipo"])
    cfg = dpo_trainer.dpo_config(args)
    assert cfg.beta == 0.25 and cfg.loss_type == ["ipo"] and cfg.max_length is None
    with pytest.raises(SystemExit):
        dpo_train.parse_args(["--data", "d", "--save_dir", "s", "--loss_type", "bogus"])
    for extra, msg in ([["--loss_type", "exo_pair"], "label_smoothing > 0"],
                       [["--loss_type", "sigmoid", "sft", "--loss_weights", "1"], "2 --loss_type"],
                       [["--beta", "0"], "--beta must be > 0"],
                       [["--max_prompt_len", "2000"], "--max_prompt_len must be"]):
        with pytest.raises(UserError, match=re.escape(msg)):
            dpo_train.check_args(dpo_train.parse_args(["--data", "d", "--save_dir", "s", *extra]))
