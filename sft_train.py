"""SFT: supervised fine-tuning of a QLoRA student on {"input","output"} pairs, loss on the output only.

    python sft_train.py --student smollm2-135m --data data/creditmix_sft.jsonl --save_dir runs/creditmix_sft --epochs 2
    python sft_train.py --student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_sft.jsonl --save_dir runs/creditmix_sft --epochs 5 --max_steps 7115
    python sft_train.py --student smollm2-135m --data data/creditmix_sft.jsonl --save_dir runs/creditmix_sft --resume
    python sft_train.py --config recipes/quick/creditmix_sft.yaml --max_steps 4     # a recipe (docs/recipes.md) + an override

Saves the LoRA adapter (not the base weights), the tokenizer, run.json, metrics.jsonl and TensorBoard logs.
"""
import cli
from common import load_student
from fileio import read_records, user_errors
from training import (add_training_args, encode_rows, eval_source, held_out, log_callbacks, start, train_and_save,
                      trl_config, trl_kwargs)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help='JSONL of {"input": prompt, "output": answer}')
    add_training_args(p, max_len=1024, lr=2e-4, epochs=1.0, batch=1, accum=8)
    return cli.parse(p, argv)


def read_rows(path: str) -> list[dict]:
    return read_records(path, required=("input", "output"), nonempty=("input", "output"))


def main(args):
    from trl import SFTConfig, SFTTrainer

    started = start("sft_train", args)
    # load
    rows, held = held_out(args, read_rows(args.data), read_rows)
    model, tok, ms = load_student(args.student, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                  lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    dataset, report = encode_rows(tok, rows, "input", "output", args.max_len, source=args.data)
    eval_dataset = None
    if held is not None:
        eval_dataset, report["eval"] = encode_rows(tok, held, "input", "output", args.max_len, source=eval_source(args))
    # run
    config = trl_config(SFTConfig, trl_kwargs(args, args.save_dir))
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tok, callbacks=log_callbacks(args))
    # save
    return train_and_save(trainer, tok, args, script="sft_train.py", method="sft", base_model=ms.base_spec,
                          data=args.data, started=started, data_report=report)


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
