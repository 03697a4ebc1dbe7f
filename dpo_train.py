"""DPO: preference distillation of a QLoRA student on {"prompt","chosen","rejected"} rows, with TRL's DPOTrainer.

    python dpo_train.py --student smollm2-135m --data data/creditmix_dpo.jsonl --save_dir runs/creditmix_dpo --epochs 1 --beta 0.1 --max_len 256
    python dpo_train.py --student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_dpo.jsonl --save_dir runs/creditmix_dpo --epochs 5 --beta 0.1 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --max_len 256 --max_steps 7115
    python dpo_train.py --config recipes/quick/creditmix_dpo.yaml --report_to none
    python dpo_train.py --student smollm2-135m --ref_model_dir runs/creditmix_sft --data data/creditmix_dpo.jsonl --save_dir runs/creditmix_sft_dpo --max_len 256

The reference policy is never a second model in memory. A fresh student's reference is its own base with the LoRA
adapter disabled. With --ref_model_dir (an SFT run: DPO on top of SFT, the usual recipe) the policy starts from the
SFT adapter and the reference is the SFT policy: TRL keeps a frozen copy of that adapter beside the trained one,
over the same base weights.

Bad input. Errors (exit 2, naming file and line): a row that is not an object, a missing or empty `prompt`,
`chosen` or `rejected`, `chosen` equal to `rejected`, and with --idp_mode a `chosen` that is not valid JSON (or the
same JSON document as `rejected`). Counted skips (reported on stderr and in run.json's metrics.data_rows, because
they depend on the length flags, not on the file): pairs whose chat prompt leaves no room for an answer within
--max_len or is longer than --max_prompt_len, and pairs whose chosen and rejected become identical once cut to
--max_len. Answers longer than the room left are cut (counted as "truncated").

Saves the LoRA adapter (not the base weights), the tokenizer, run.json (with the final reward accuracy and margin),
metrics.jsonl and TensorBoard logs.
"""
import json
import shutil
from pathlib import Path

import cli
from common import encode_example, load_student, lora_config
from fileio import UserError, note, read_records_placed, user_errors
from models import resolve_model
from dpo_trainer import build_trainer
from training import (add_training_args, encode_counted, eval_source, gradient_checkpointing_on, held_out,
                      log_callbacks, start, train_and_save)

FIELDS = ("prompt", "chosen", "rejected")
# TRL 1.16's DPO losses (trl/trainer/dpo_config.py, DPOConfig.loss_type); tests check the list against TRL's own.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# What the final log of TRL's DPOTrainer reports, and the names run.json gives them.
REWARD_KEYS = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
               "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
               "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help='JSONL (or JSON list) of {"prompt", "chosen", "rejected"}')
    g.add_argument("--idp_mode", action="store_true",
                   help="chosen/rejected are JSON documents: chosen must parse (rejected may be invalid on purpose)")
    g.add_argument("--max_prompt_len", type=int, default=None,
                   help="skip (and count) pairs whose chat prompt is longer than this many tokens "
                        "(default: any prompt that leaves room for an answer within --max_len)")
    g = p.add_argument_group("reference")
    g.add_argument("--ref_model_dir", default=None,
                   help="an SFT run dir: the policy starts from its adapter and the reference is that SFT policy "
                        "(default: the student's base with the adapter disabled). --student must be its base")
    # lr 5e-6: the learning rate of TRL 1.16's LoRA DPO example (trl/scripts/dpo.py).
    add_training_args(p, max_len=1024, lr=5e-6, epochs=1.0, batch=1, accum=8)
    g = p.add_argument_group("dpo")
    g.add_argument("--beta", type=float, default=0.1,
                   help="DPO beta (README: 0.1): higher stays closer to the reference; for ipo it is tau")
    g.add_argument("--loss_type", nargs="+", default=["sigmoid"], choices=LOSS_TYPES, metavar="LOSS",
                   help=f"TRL's DPO loss, or several summed with --loss_weights: {', '.join(LOSS_TYPES)}")
    g.add_argument("--loss_weights", nargs="+", type=float, default=None,
                   help="one weight per --loss_type (default: 1 each)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="flip probability for robust (in [0, 0.5)); epsilon for exo_pair (> 0, paper: 1e-3)")
    return cli.parse(p, argv)


def check_args(args) -> None:
    """Flag combinations TRL would reject deep inside its trainer, refused up front with a one-line reason."""
    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if args.loss_weights is not None and len(args.loss_weights) != len(args.loss_type):
        raise UserError(f"--loss_weights gives {len(args.loss_weights)} weights for {len(args.loss_type)} "
                        f"--loss_type values ({' '.join(args.loss_type)})")
    if "exo_pair" in args.loss_type and args.label_smoothing <= 0:
        raise UserError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in args.loss_type and not 0 <= args.label_smoothing < 0.5:
        raise UserError(f"--loss_type robust needs --label_smoothing in [0, 0.5), got {args.label_smoothing}")
    if args.max_prompt_len is not None and not 0 < args.max_prompt_len < args.max_len:
        raise UserError(f"--max_prompt_len must be between 1 and --max_len - 1 ({args.max_len - 1}), "
                        f"got {args.max_prompt_len}")
    if args.lora_dropout:
        note("DPO turns dropout off (TRL's disable_dropout) so that policy and reference agree at step 0: "
             "--lora_dropout has no effect here")


# ----------------------------------------------------------------------------------------------------------------
# data

def read_pairs(path: str, idp_mode: bool = False) -> list[dict]:
    """The preference rows, each checked: errors name the file and line (see the module docstring)."""
    placed = read_records_placed(path, required=FIELDS, nonempty=FIELDS)  # not an object / missing / empty: file:line
    rows = [r for _, r in placed]
    for where, r in placed:
        if r["chosen"].strip() == r["rejected"].strip():
            raise UserError(f"{path}: {where}: 'chosen' and 'rejected' are the same text: such a pair teaches "
                            "nothing; fix or remove it")
        if idp_mode:
            try:
                chosen = json.loads(r["chosen"])
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: {where}: --idp_mode: 'chosen' is not valid JSON ({e.msg} at character "
                                f"{e.pos})") from None
            try:
                same = json.loads(r["rejected"]) == chosen
            except json.JSONDecodeError:
                same = False  # an invalid rejected document is a fine negative
            if same:
                raise UserError(f"{path}: {where}: --idp_mode: 'rejected' is the same JSON document as 'chosen' "
                                "(only its formatting differs)")
    return rows


def encode_pair(tok, row: dict, max_len: int, max_prompt_len: int | None = None):
    """Token ids of one pair: (example, status). The prompt is common.chat_prompt's, each answer ends with the
    end-of-turn token, exactly as sft_train.py encodes a row (common.encode_example) and as inference sees it.
    Status: ok | truncated (an answer cut at max_len) | prompt_over_max_len | prompt_over_max_prompt_len |
    same_after_cut (chosen and rejected identical once cut); the last three are skips (example None)."""
    chosen, c_status = encode_example(tok, row["prompt"], row["chosen"], max_len)
    rejected, r_status = encode_example(tok, row["prompt"], row["rejected"], max_len)
    if chosen is None or rejected is None:
        return None, "prompt_over_max_len"
    n = chosen["labels"].count(-100)  # encode_example masks the prompt, and only the prompt, with -100
    if max_prompt_len is not None and n > max_prompt_len:
        return None, "prompt_over_max_prompt_len"
    ex = {"prompt_ids": chosen["input_ids"][:n], "chosen_ids": chosen["input_ids"][n:],
          "rejected_ids": rejected["input_ids"][n:]}
    if ex["chosen_ids"] == ex["rejected_ids"]:
        return None, "same_after_cut"
    return ex, "truncated" if "truncated" in (c_status, r_status) else "ok"


SKIPS = {"prompt_over_max_len": "have a chat prompt that leaves no room for an answer within --max_len {max_len}",
         "prompt_over_max_prompt_len": "have a chat prompt longer than --max_prompt_len {max_prompt_len}",
         "same_after_cut": "have chosen and rejected identical once cut to --max_len {max_len}"}


def encode_pairs(tok, rows: list[dict], max_len: int, max_prompt_len: int | None = None, source: str = "data"):
    """A datasets.Dataset of prompt_ids/chosen_ids/rejected_ids (TRL's tokenised preference format) and the counts
    of every status; each skip is reported."""
    from datasets import Dataset

    enc, counts = encode_counted(rows, lambda r: encode_pair(tok, r, max_len, max_prompt_len))
    if counts["truncated"]:
        note(f"{counts['truncated']} of {len(rows)} pairs of {source} are longer than --max_len {max_len}: "
             "their answers are cut there")
    for status, why in SKIPS.items():
        if counts[status]:
            note(f"skipped {counts[status]} of {len(rows)} pairs of {source}: they "
                 + why.format(max_len=max_len, max_prompt_len=max_prompt_len))
    if not enc:
        raise UserError(f"{source}: no pair left to train on ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return Dataset.from_list(enc), {"total": len(rows), "used": len(enc), **counts}


# ----------------------------------------------------------------------------------------------------------------
# model and trainer

def load_policy(args):
    """(model, tokenizer, ModelSpec, peft_config). A fresh student comes back unwrapped with a LoraConfig: TRL adds
    the adapter, and with no other adapter its reference is the base with the adapter disabled. A start from an SFT
    run comes back as a PeftModel with that adapter trainable (peft_config None): TRL 1.16 then copies it into a
    frozen adapter named "ref" and computes the reference through it (DPOTrainer.__init__), so the reference is the
    SFT policy. Either way the base weights are loaded once."""
    start_from = args.student
    if args.ref_model_dir:
        ref, student = resolve_model(args.ref_model_dir), resolve_model(args.student)
        if not ref.adapter:
            raise UserError(f"--ref_model_dir {args.ref_model_dir} holds no LoRA adapter (adapter_config.json): "
                            "give the run directory of an SFT run")
        if student.adapter or student.base != ref.base:
            raise UserError(f"--ref_model_dir {args.ref_model_dir} was trained on {ref.base_spec}, but --student is "
                            f"{args.student}: pass --student {ref.base_spec}")
        start_from = args.ref_model_dir
    model, tok, ms = load_student(start_from, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                  gradient_checkpointing=gradient_checkpointing_on(args.gradient_checkpointing),
                                  attach_lora=False)
    if ms.adapter:
        note(f"DPO continues the adapter of {ms.adapter}; the reference is that policy (a frozen copy of it)")
        return model, tok, ms, None
    return model, tok, ms, lora_config(model, args.lora_r, args.lora_alpha, args.lora_dropout)


def reward_summary(log_history: list[dict]) -> dict:
    """The last logged rewards (TRL averages them over the logging window) and the first, for before/after."""
    logs = [h for h in log_history if "rewards/accuracies" in h]
    if not logs:
        return {}
    out = {name: round(logs[-1][key], 6) for key, name in REWARD_KEYS.items() if key in logs[-1]}
    out["reward_step"] = logs[-1].get("step")
    out["first_reward_accuracy"] = round(logs[0]["rewards/accuracies"], 6)
    out["first_reward_margin"] = round(logs[0]["rewards/margins"], 6) if "rewards/margins" in logs[0] else None
    return out


def main(args):
    started = start("dpo_train", args)
    check_args(args)
    # load
    rows, eval_rows = held_out(args, read_pairs(args.data, args.idp_mode), lambda f: read_pairs(f, args.idp_mode))
    model, tok, ms, peft_config = load_policy(args)
    dataset, report = encode_pairs(tok, rows, args.max_len, args.max_prompt_len, source=args.data)
    eval_dataset = None
    if eval_rows is not None:
        eval_dataset, report["eval"] = encode_pairs(tok, eval_rows, args.max_len, args.max_prompt_len,
                                                    source=eval_source(args))
    # run
    from callbacks import RewardSummary
    rewards = {}  # filled at the end of training (RewardSummary), read by train_and_save for run.json
    trainer = build_trainer(args, model, tok, dataset, peft_config, eval_dataset=eval_dataset,
                            callbacks=log_callbacks(args) + [RewardSummary(rewards, reward_summary)])
    # save
    metrics = train_and_save(trainer, tok, args, script="dpo_train.py", method="dpo", base_model=ms.base_spec,
                             data=args.data, started=started, data_report=report, extra_metrics=rewards,
                             extra={"reference": "sft_adapter" if ms.adapter else "base_adapter_disabled",
                                    "init_adapter": ms.adapter})
    ref_copy = Path(args.save_dir) / "ref"
    if ms.adapter and (ref_copy / "adapter_config.json").is_file():
        shutil.rmtree(ref_copy)  # PEFT saved TRL's frozen copy of the SFT adapter too; the SFT run already holds it
    return metrics


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
