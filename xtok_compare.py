"""Cross-tokenizer KD on the tiny pair (or a real one), two experiments through kd_train.py and sft_train.py:

- compare the losses (default): train the same student from the same teacher with each --cross_tokenizer loss
  for --max_steps of pure KD (alpha 1) and print the held-out divergence and top-1 agreement with the teacher at
  the aligned positions, before and after;
- --gap: teacher, SFT student and KD student side by side on a task where the teacher, after its own SFT, beats
  the student. A CreditMix-style 3-way label decided by one feature of the prompt ("Delay from due date" 0-2 Good,
  3-6 Standard, 7-9 Bad, two other features as distractors); the teacher is SFT-trained (sft_train.py) on
  --teacher_rows rows for --teacher_steps; the student trains --max_steps on a small transfer set whose labels
  are --noise noisy, once with sft_train.py (the hard labels) and once with kd_train.py --teacher <the teacher's
  run> --cross_tokenizer gold --alpha 0.5 (the same hard labels plus the teacher's distributions). All are scored
  on held-out prompts (clean labels, none trained on) by a tokenizer-independent metric: label accuracy from each
  model's total log-probability of each label (with its end token) after its own prompt, and the gold label's
  cross-entropy in nats per character (xtok_kd.label_eval).

    python xtok_compare.py --save_dir runs/xtok_compare_tiny
    python xtok_compare.py --gap --save_dir runs/xtok_gap_tiny
    python xtok_compare.py --student smollm2-135m --teacher gemma3-270m --data data/creditmix_kd.jsonl --eval_kl data/creditmix_val.jsonl --idp_mode --save_dir runs/xtok_compare_gemma

Without --student/--teacher it builds the tiny pair of the tests (a 2-layer random Llama with SmolLM2's tokenizer
as the student; as the teacher one with a SentencePiece-style '▁' BPE trained on the data and a sharpened head, so
its next-token distributions are peaked and worth imitating) and synthetic rows. With --gap both tiny models get
a head scaled by --head_scale (LoRA leaves the head frozen: a random one scaled 1 cannot become confident over
SmolLM2's 49k tokens), and --student/--teacher, when given, are the bases the two are trained from.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import cli
import creditmix
from common import CHATML_TEMPLATE
from fileio import UserError, user_errors, write_json, write_jsonl


# the two modes' defaults of the flags they share (the --gap ones: measured in docs/cross_tokenizer_kd.md)
MODE_DEFAULTS = {"compare": {"max_steps": 40, "lr": 2e-3, "batch": 4, "losses": "gold,uld"},
                 "gap": {"max_steps": 600, "lr": 5e-3, "batch": 8, "losses": "gold"}}


def parse_args(argv=None):
    p = cli.parser(__doc__)
    d, g_ = MODE_DEFAULTS["compare"], MODE_DEFAULTS["gap"]
    g = p.add_argument_group("model")
    g.add_argument("--student", default=None, help="student model (default: the tiny pair, built in --save_dir)")
    g.add_argument("--teacher", default=None, help="teacher with another tokenizer (default: the tiny pair's)")
    g.add_argument("--head_scale", type=float, default=20.0, help="--gap, tiny pair: LM-head scale of both models")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="KD JSONL to train on (default: synthetic rows; not with --gap)")
    g.add_argument("--eval_kl", default=None,
                   help="held-out JSONL (default: synthetic rows not trained on; not with --gap)")
    g.add_argument("--idp_mode", action="store_true", help="passed to kd_train.py")
    g.add_argument("--teacher_rows", type=int, default=2000, help="--gap: the teacher's SFT rows")
    g.add_argument("--transfer_rows", type=int, default=100, help="--gap: the students' rows (SFT and KD)")
    g.add_argument("--held_rows", type=int, default=150, help="--gap: held-out prompts (distinct, never trained on)")
    g.add_argument("--teacher_noise", type=float, default=0.1,
                   help="--gap: share of the teacher's labels replaced by another label")
    g.add_argument("--noise", type=float, default=0.3,
                   help="--gap: share of the transfer set's labels replaced by another label")
    g = p.add_argument_group("training")
    g.add_argument("--gap", action="store_true",
                   help="teacher / SFT student / KD student on a task the teacher has learnt (see above)")
    g.add_argument("--losses", default=None,
                   help=f"comma-separated --cross_tokenizer losses: one KD run each (default: {d['losses']}; "
                        f"--gap: {g_['losses']})")
    g.add_argument("--max_steps", type=int, default=None,
                   help=f"optimizer steps per student run (default: {d['max_steps']}; --gap: {g_['max_steps']})")
    g.add_argument("--teacher_steps", type=int, default=600, help="--gap: optimizer steps of the teacher's SFT")
    g.add_argument("--alpha", type=float, default=0.5, help="--gap: kd_train.py --alpha of the KD student")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (LoRA) (default: {d['lr']}; --gap: {g_['lr']})")
    g.add_argument("--batch", type=int, default=None, help=f"rows per step (default: {d['batch']}; --gap: "
                                                           f"{g_['batch']})")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows, the tiny models and training")
    g = p.add_argument_group("output")
    g.add_argument("--save_dir", required=True, help="folder for the tiny pair, the data and one run per model")
    args = p.parse_args(argv)
    for k, v in MODE_DEFAULTS["gap" if args.gap else "compare"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


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


def tiny_pair(folder: Path, texts: list[str], seed: int, student_head: float = 1.0,
              teacher_head: float = 40.0) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    import models
    stok = AutoTokenizer.from_pretrained(models.embedded_model_dir())
    student = tiny_llama(folder / "tiny-student", stok, seed, head_scale=student_head)
    teacher = tiny_llama(folder / "tiny-teacher", metaspace_tokenizer(texts), seed + 1, head_scale=teacher_head)
    return student, teacher


# ----------------------------------------------------------------------------------------------------------------
# --gap: a task the teacher learns and the student, from a small noisy transfer set, does not

def rule_label(delay: int) -> int:
    """The task's rule: index into creditmix.LABELS from the delay digit (0-2 Good, 3-6 Standard, 7-9 Bad)."""
    return 0 if delay <= 2 else 1 if delay <= 6 else 2


def rule_prompt(cards: int, loans: int, delay: int) -> str:
    return creditmix.prompt_for(f"Num Credit Card: {cards}, Num of Loan: {loans}, Delay from due date: {delay}")


def gap_rows(seed: int, teacher_rows: int, transfer_rows: int, held_rows: int, teacher_noise: float,
             noise: float) -> tuple[list[dict], list[dict], list[dict]]:
    """(teacher's SFT rows, transfer rows, held-out rows) as {"input", "output"}. The 1,000 feature triples are
    shuffled; the first held_rows are held out (clean labels), the training rows are drawn from the rest, each
    label replaced by another one with probability teacher_noise / noise."""
    if not 0 < held_rows < 1000:
        raise UserError(f"--held_rows must be between 1 and 999 (the task has 1,000 prompts), got {held_rows}")
    for flag, v in (("--teacher_noise", teacher_noise), ("--noise", noise)):
        if not 0 <= v < 1:
            raise UserError(f"{flag} must be in [0, 1), got {v}")
    rng = random.Random(seed)
    triples = [(c, n, d) for c in range(10) for n in range(10) for d in range(10)]
    rng.shuffle(triples)
    held, pool = triples[:held_rows], triples[held_rows:]

    def draw(n, p):
        out = []
        for t in rng.choices(pool, k=n):
            y = rule_label(t[2])
            if rng.random() < p:
                y = rng.choice([k for k in range(3) if k != y])
            out.append({"input": rule_prompt(*t), "output": creditmix.LABELS[y]})
        return out
    return (draw(teacher_rows, teacher_noise), draw(transfer_rows, noise),
            [{"input": rule_prompt(*t), "output": creditmix.LABELS[rule_label(t[2])]} for t in held])


def train(script: str, model: str, data: Path, save: Path, steps: int, args, *extra: str) -> dict:
    """One run of a project trainer as a subprocess; its run.json."""
    cmd = [sys.executable, str(Path(__file__).with_name(script)), "--student", str(model), "--data", str(data),
           "--max_steps", str(steps), "--lr", str(args.lr), "--per_device_train_batch_size", str(args.batch),
           "--gradient_accumulation_steps", "1", "--seed", str(args.seed), "--save_dir", str(save), *extra]
    subprocess.run(cmd, check=True)
    return json.loads((save / "run.json").read_text())


def gap(args, save: Path) -> list[dict]:
    import xtok_kd
    # load
    t_rows, s_rows, held = gap_rows(args.seed, args.teacher_rows, args.transfer_rows, args.held_rows,
                                    args.teacher_noise, args.noise)
    write_jsonl(save / "teacher_sft.jsonl", t_rows)
    write_jsonl(save / "transfer_sft.jsonl", s_rows)
    write_jsonl(save / "transfer_kd.jsonl", [{"input": r["input"], "teacher_output": r["output"]} for r in s_rows])
    write_jsonl(save / "held.jsonl", held)
    student, teacher = args.student, args.teacher
    if student is None or teacher is None:  # the teacher's BPE also knows the ChatML prompt sft_train.py gives it
        texts = [r["input"] + "\n" + r["output"] for r in t_rows[:300]] + [CHATML_TEMPLATE]
        s, t = tiny_pair(save, texts, args.seed, args.head_scale, args.head_scale)
        student, teacher = student or str(s), teacher or str(t)
    # run
    quiet = ["--logging_steps", "50", "--report_to", "none"]
    runs = [("teacher (SFT)", save / "teacher_sft", True, train(
        "sft_train.py", teacher, save / "teacher_sft.jsonl", save / "teacher_sft", args.teacher_steps, args, *quiet))]
    runs.append(("student (SFT)", save / "student_sft", False, train(
        "sft_train.py", student, save / "transfer_sft.jsonl", save / "student_sft", args.max_steps, args, *quiet)))
    for loss in args.losses.split(","):
        run = save / f"student_kd_{loss}"
        runs.append((f"student (KD, {loss})", run, False, train(
            "kd_train.py", student, save / "transfer_kd.jsonl", run, args.max_steps, args, "--teacher",
            str(save / "teacher_sft"), "--cross_tokenizer", loss, "--alpha", str(args.alpha), *quiet)))
    prompts, gold = [r["input"] for r in held], [creditmix.LABELS.index(r["output"]) for r in held]
    results = []
    for name, run, is_teacher, rec in runs:
        m = xtok_kd.label_eval(str(run), prompts, gold, creditmix.LABELS, teacher=is_teacher)
        kd = rec.get("kd", {})
        results.append({"model": name, "run": str(run), "accuracy": m["accuracy"], "nats_per_char": m["nats_per_char"],
                        "held_rows": m["rows"], "train_rows": rec["metrics"]["data_rows"]["ok"],
                        "steps": rec["metrics"]["train_steps"], "prompt": m["prompt"],
                        "aligned_share": kd.get("aligned_share")})
    t_acc, s_acc = results[0]["accuracy"], results[1]["accuracy"]
    for r in results[2:]:  # the share of the teacher's lead over the SFT student the KD student recovers
        r["gap_closed"] = round((r["accuracy"] - s_acc) / (t_acc - s_acc), 4) if t_acc > s_acc else None
    # save
    write_json(save / "gap.json", {"results": results, "setup": {k: getattr(args, k) for k in (
        "seed", "teacher_rows", "transfer_rows", "held_rows", "teacher_noise", "noise", "teacher_steps",
        "max_steps", "lr", "batch", "alpha", "head_scale")} | {
        "student": student, "teacher": teacher}})
    cols = ["model", "train_rows", "steps", "accuracy", "nats_per_char", "gap_closed"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return results


def main(args):
    save = Path(args.save_dir)
    if args.gap and (args.data or args.eval_kl):
        raise UserError("--data/--eval_kl do not combine with --gap (it writes its own task's rows)")
    save.mkdir(parents=True, exist_ok=True)
    if args.gap:
        return gap(args, save)
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
        m = train("kd_train.py", student, Path(data), run, args.max_steps, args, "--teacher", teacher,
                  "--cross_tokenizer", loss, "--alpha", "1", "--eval_kl", str(held), "--logging_steps", "10",
                  *(["--idp_mode"] if args.idp_mode else []))["metrics"]
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
