"""Compare the cross-tokenizer losses (gold, uld): train the same student from the same teacher with each for
--max_steps of pure KD (alpha 1) through kd_train.py, and print the held-out divergence and top-1 agreement with
the teacher at the aligned positions, before and after.

    python xtok_compare.py --save_dir runs/xtok_compare_tiny
    python xtok_compare.py --student smollm2-135m --teacher gemma3-270m --data data/creditmix_kd.jsonl --eval_kl data/creditmix_val.jsonl --idp_mode --save_dir runs/xtok_compare_gemma

Without --student/--teacher it builds the tiny pair of the tests (a 2-layer random Llama with SmolLM2's tokenizer
as the student; as the teacher one with a SentencePiece-style '▁' BPE trained on the data and a sharpened head, so
its next-token distributions are peaked and worth imitating) and synthetic rows.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import cli
from fileio import user_errors, write_jsonl


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--student", default=None, help="student model (default: the tiny pair, built in --save_dir)")
    g.add_argument("--teacher", default=None, help="teacher with another tokenizer (default: the tiny pair's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="KD JSONL to train on (default: synthetic rows)")
    g.add_argument("--eval_kl", default=None, help="held-out JSONL (default: synthetic rows not trained on)")
    g.add_argument("--idp_mode", action="store_true", help="passed to kd_train.py")
    g = p.add_argument_group("training")
    g.add_argument("--losses", default="gold,uld", help="comma-separated --cross_tokenizer losses to compare")
    g.add_argument("--max_steps", type=int, default=40, help="optimizer steps per loss")
    g.add_argument("--lr", type=float, default=2e-3, help="learning rate (LoRA)")
    g.add_argument("--batch", type=int, default=4, help="rows per step")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows and of training")
    g = p.add_argument_group("output")
    g.add_argument("--save_dir", required=True, help="folder for the tiny pair, the data and one run per loss")
    return p.parse_args(argv)


WORDS = ("invoice total vendor customer income label answer capital France Paris number function return value "
         "date amount currency good bad standard the of is and a to in").split()


def synthetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            ans = json.dumps({"vendor": rng.choice(WORDS).title() + " LLC", "total": round(rng.uniform(1, 999), 2)},
                             separators=(",", ":"))
        elif kind == 1:
            ans = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
        else:
            ans = rng.choice(["Good", "Standard", "Bad"])
        rows.append({"input": f"Row {i}: " + " ".join(rng.choice(WORDS) for _ in range(6)), "teacher_output": ans})
    return rows


def metaspace_tokenizer(texts, vocab_size: int = 400):
    """A SentencePiece-style BPE ('▁' marks a space, <bos> first, as Gemma's) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tk.decoder = decoders.Metaspace(prepend_scheme="never")
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_llama(out: Path, tok, seed: int, head_scale: float = 1.0, **cfg) -> Path:
    """A 2-layer random Llama for `tok`, its LM head multiplied by head_scale (peaked distributions)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=head_scale == 1.0, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), **cfg}))
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_pair(folder: Path, texts: list[str], seed: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    import models
    stok = AutoTokenizer.from_pretrained(models.embedded_model_dir())
    student = tiny_llama(folder / "tiny-student", stok, seed)
    teacher = tiny_llama(folder / "tiny-teacher", metaspace_tokenizer(texts), seed + 1, head_scale=40.0)
    return student, teacher


def main(args):
    save = Path(args.save_dir)
    save.mkdir(parents=True, exist_ok=True)
    # load
    data, held = args.data, args.eval_kl
    if data is None:
        rows = synthetic_rows(48, args.seed)
        data, held = save / "train.jsonl", save / "held.jsonl"
        write_jsonl(data, rows[:40])
        write_jsonl(held, [{"input": r["input"], "output": r["teacher_output"]} for r in rows[40:]])
    student, teacher = args.student, args.teacher
    if student is None or teacher is None:
        texts = [r["input"] + "\n" + r["teacher_output"] for r in synthetic_rows(48, args.seed)]
        s, t = tiny_pair(save, texts, args.seed)
        student, teacher = student or str(s), teacher or str(t)
    # run
    results = []
    for loss in args.losses.split(","):
        run = save / f"kd_{loss}"
        cmd = [sys.executable, str(Path(__file__).with_name("kd_train.py")), "--student", student, "--teacher",
               teacher, "--cross_tokenizer", loss, "--alpha", "1", "--data", str(data), "--eval_kl", str(held),
               "--max_steps", str(args.max_steps), "--lr", str(args.lr), "--per_device_train_batch_size",
               str(args.batch), "--gradient_accumulation_steps", "1", "--seed", str(args.seed), "--save_dir",
               str(run), "--logging_steps", "10", *(["--idp_mode"] if args.idp_mode else [])]
        subprocess.run(cmd, check=True)
        m = json.loads((run / "run.json").read_text())["metrics"]
        results.append({"loss": loss, **{k: m.get(k) for k in (
            "kl_before", "kl_after", "uld_before", "uld_after", "top1_agreement_before", "top1_agreement_after",
            "kl_aligned_share")}})
    # save
    write_jsonl(save / "compare.jsonl", results)
    cols = ["loss", "kl_before", "kl_after", "uld_before", "uld_after", "top1_agreement_before",
            "top1_agreement_after", "kl_aligned_share"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return results


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
