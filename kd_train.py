"""KD: distil a teacher into a QLoRA student, from the teacher's outputs (sequence-level) or its logits (token-level).

    python kd_train.py --student smollm2-135m --data data/creditmix_kd.jsonl --idp_mode --save_dir runs/creditmix_kd --epochs 2
    python kd_train.py --student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_kd.jsonl --idp_mode --save_dir runs/creditmix_kd --epochs 5 --max_steps 7115
    python kd_train.py --config recipes/quick/creditmix_kd.yaml --val_frac 0.01 --eval_steps 1   # + held-out loss each step
    python kd_train.py --student smollm2-135m --teacher runs/creditmix_sft --data data/creditmix_kd.jsonl --idp_mode --kd_loss forward_kl --alpha 0.5 --eval_kl data/creditmix_val.jsonl --save_dir runs/creditmix_kd_logit
    python kd_train.py --student smollm2-135m --teacher_cache runs/cache_creditmix_sft --data data/creditmix_kd.jsonl --idp_mode --save_dir runs/creditmix_kd_cached
    python kd_train.py --student smollm2-135m --teacher gemma3-270m --cross_tokenizer gold --data data/creditmix_kd.jsonl --idp_mode --save_dir runs/creditmix_kd_gemma

Three modes, one trainer (TRL's SFTTrainer, subclassed as TRL's GKDTrainer does):
- no --teacher: sequence-level KD, the README's: cross-entropy on {"input","teacher_output"} (fill teacher_output
  with teacher_generate.py). Any teacher, any tokenizer.
- --teacher MODEL: adds a token-level divergence between the teacher's and the student's next-token distributions on
  the completion tokens: loss = (1 - alpha) * ce + alpha * T^2 * kd. Same tokenizer needed. The teacher is loaded
  once, frozen (4-bit on CUDA); neither model's [tokens, vocab] logits are built (kd_losses.py, TRL's chunked kernels).
- --teacher_cache DIR: the same forward-KL mix from the teacher's top-k log-probabilities or its sampled ids
  (teacher_cache.py --sampling), cached once (same tokenizer, same --data and encoding flags, same --temperature):
  the teacher is never loaded.
- --teacher MODEL --cross_tokenizer gold|uld: the teacher has another tokenizer (e.g. gemma3-270m, 262k tokens, for
  the 49k-token SmolLM2): both tokenise the answer, positions that have seen the same answer text are paired and the
  divergence is taken there, over the two vocabularies (xtok_kd.py; docs/cross_tokenizer_kd.md).
- --teacher with --lmbda > 0: on-policy (GKD): that fraction of micro-batches has its completions sampled from the
  student (--max_new_tokens) and scored by the teacher; those batches train the divergence alone (no reference answer
  to take a CE against: a CE on the student's own samples would reinforce its mistakes).
"""
import json

import cli
from common import load_model, load_student
from fileio import UserError, note, read_records, sha256_file, user_errors
from kd_losses import KD_LOSSES, add_kd_data_args, canonical_rows, load_schema, target_key
from training import add_training_args, encode_rows, eval_source, held_out, log_callbacks, start, train_and_save


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("data")
    add_kd_data_args(g)
    g.add_argument("--eval_kl", default=None,
                   help='held-out JSONL ({"input", "teacher_output" or "output"}): KL(teacher||student) on its '
                        "answer tokens before and after training, into run.json (needs --teacher)")
    g = p.add_argument_group("teacher (logit-level KD)")
    g.add_argument("--teacher", default=None,
                   help="teacher for logit KD: hub id, local folder, run dir (adapter) or smollm2-135m; must share "
                        "the student's tokenizer. Default: none (sequence-level KD on teacher_output)")
    g.add_argument("--teacher_cache", default=None,
                   help="instead of --teacher: a folder of the teacher's top-k log-probabilities on this --data made "
                        "by teacher_cache.py; the teacher is never loaded (forward KL over the top k + a tail bucket, "
                        "or the cross-entropy against the teacher's sampled ids)")
    g.add_argument("--cache_sampling", default=None, choices=("topk", "sample"),
                   help="with --teacher_cache: the kind of targets the cache must hold (teacher_cache.py --sampling); "
                        "another is refused. Default: whichever it holds")
    g.add_argument("--cross_tokenizer", default=None, choices=("gold", "uld"),
                   help="the teacher's tokenizer differs from the student's: align on the answer text and use gold "
                        "(matched tokens: KL, the rest: sorted distance; measured better, xtok_compare.py) or uld "
                        "(sorted distance only). Default: none (the tokenizers must be identical)")
    g.add_argument("--kd_loss", default="forward_kl", choices=KD_LOSSES,
                   help="forward_kl = KL(teacher||student) (mode covering, Hinton), reverse_kl = KL(student||teacher) "
                        "(mode seeking, MiniLLM), jsd = generalised Jensen-Shannon (GKD)")
    g.add_argument("--jsd_beta", type=float, default=0.5,
                   help="jsd only: mixture weight of the teacher in (0, 1); 0.5 is the symmetric JSD, toward 0 it "
                        "acts like forward KL, toward 1 like reverse KL (TRL/GKD convention)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of both distributions in the divergence (and on-policy sampling); the "
                        "divergence is scaled by T^2 (Hinton et al. 2015)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the divergence: loss = (1 - alpha) * CE(teacher_output) + alpha * T^2 * KD")
    g.add_argument("--lmbda", type=float, default=0.0,
                   help="on-policy share: fraction of micro-batches whose completions the student samples (GKD); 0 = "
                        "all on teacher_output")
    g.add_argument("--max_new_tokens", type=int, default=128, help="on-policy: tokens the student may sample")
    add_training_args(p, max_len=1024, lr=2e-4, epochs=1.0, batch=1, accum=8)
    return cli.parse(p, argv)


# ----------------------------------------------------------------------------------------------------------------
# data

def check_args(args) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1] (got {args.alpha})")
    if not 0.0 <= args.lmbda <= 1.0:
        raise UserError(f"--lmbda must be in [0, 1] (got {args.lmbda})")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {args.temperature})")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if args.kd_loss == "jsd" and not 0.0 < args.jsd_beta < 1.0:
        raise UserError(f"--jsd_beta must be strictly between 0 and 1 (got {args.jsd_beta})")
    if args.schema and not args.idp_mode:
        raise UserError("--schema orders canonical JSON targets: it needs --idp_mode")
    if args.cross_tokenizer:
        for flag, bad in (("--teacher_cache", args.teacher_cache), ("--lmbda", args.lmbda > 0),
                          ("--kd_loss " + args.kd_loss, args.kd_loss != "forward_kl"),
                          ("--eval_data/--val_frac", args.eval_data or args.val_frac)):
            if bad:  # (a held-out loss during training would need the teacher's side too: --eval_kl measures it)
                raise UserError(f"{flag} does not combine with --cross_tokenizer (its own divergence, on the "
                                "teacher_output answers of a live --teacher)")
        if args.teacher is None:
            raise UserError("--cross_tokenizer needs --teacher (a model with another tokenizer)")
    if args.teacher_cache:
        for flag, bad in (("--teacher", args.teacher), ("--lmbda", args.lmbda > 0), ("--eval_kl", args.eval_kl),
                          ("--kd_loss " + args.kd_loss, args.kd_loss != "forward_kl"),
                          ("--eval_data/--val_frac", args.eval_data or args.val_frac)):
            if bad:
                raise UserError(f"{flag} needs a live teacher: --teacher_cache trains forward KL on cached targets")
    elif args.cache_sampling:
        raise UserError("--cache_sampling checks a --teacher_cache: it needs one")
    elif args.teacher is None:
        for flag, bad in (("--lmbda", args.lmbda > 0), ("--eval_kl", args.eval_kl)):
            if bad:
                raise UserError(f"{flag} needs --teacher (logit-level KD)")
        note("no --teacher: sequence-level KD (cross-entropy on teacher_output, as the README's KD)")
    elif args.alpha == 0 and args.lmbda == 0:
        note("--alpha 0: the divergence has no weight; it is computed and logged only")


def kd_record(args, teacher_spec=None, cache=None, xtok=None) -> dict:
    if cache is not None:
        m = cache.meta
        return {"mode": "cached", "teacher": m["teacher"], "teacher_cache": args.teacher_cache,
                "sampling": m.get("sampling", "topk"), "top_k": m.get("top_k"), "draws": m.get("draws"),
                "seed": m.get("seed"), "teacher_mass_outside": (m.get("teacher_mass_outside") or {}).get("mean"),
                "kd_loss": "forward_kl", "temperature": args.temperature, "alpha": args.alpha}
    mode = "sequence" if args.teacher is None else ("on_policy" if args.lmbda > 0 else "logit")
    if args.teacher is None:
        return {"mode": mode, "teacher": None}
    cross = {} if xtok is None else {
        "cross_tokenizer": args.cross_tokenizer, "matched_tokens": xtok.matched,
        "teacher_prompt": "the teacher's chat template" if xtok.own_template else "plain user text + newline",
        "aligned_share": xtok.report["aligned_share"], "aligned_positions": xtok.report["aligned_positions"],
        "answer_positions": xtok.report["answer_positions"]}
    return {"mode": mode, **cross, "teacher": args.teacher, "teacher_base": teacher_spec.base_spec,
            "teacher_adapter": teacher_spec.adapter, "kd_loss": args.kd_loss,
            "jsd_beta": args.jsd_beta if args.kd_loss == "jsd" else None, "temperature": args.temperature,
            "alpha": args.alpha, "lmbda": args.lmbda, "max_new_tokens": args.max_new_tokens if args.lmbda else None}


# ----------------------------------------------------------------------------------------------------------------
# trainer

def main(args):
    started = start("kd_train", args)
    check_args(args)
    # load
    schema = load_schema(args.schema)

    def read_rows(path):
        rows = read_records(path, required=("input", "teacher_output"), nonempty=("input", "teacher_output"))
        return canonical_rows(rows, "teacher_output", path, schema) if args.idp_mode else rows
    rows, eval_rows = held_out(args, read_rows(args.data), read_rows)
    held_rows = held_key = None
    if args.eval_kl:
        held_rows = read_records(args.eval_kl, required=("input",), nonempty=("input",))
        held_key = target_key(held_rows, args.eval_kl)
        if args.idp_mode:
            held_rows = canonical_rows(held_rows, held_key, args.eval_kl, schema)
    import kd_cache
    cache = kd_cache.TeacherCache(args.teacher_cache) if args.teacher_cache else None
    model, tok, ms = load_student(args.student, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                  lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    teacher = vocab = tms = xtok = None
    if args.teacher:
        from kd_losses import check_vocab
        teacher, ttok, tms = load_model(args.teacher, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                         auto="4bit")  # beside training: its memory
        if args.cross_tokenizer:
            import xtok_kd
            if ttok.get_vocab() == tok.get_vocab():
                note("--cross_tokenizer: teacher and student share one tokenizer; plain --teacher is exact and faster")
            xtok = xtok_kd.CrossVocab(tok, ttok, args.cross_tokenizer, xtok_kd.has_own_template(ttok))
            note(f"--cross_tokenizer {args.cross_tokenizer}: {xtok.matched} tokens matched by text between the "
                 f"student's {len(tok)} and the teacher's {len(ttok)}; teacher prompt: "
                 + ("its chat template" if xtok.own_template else "the plain user text (it has no chat template)"))
        else:
            vocab = check_vocab(tok, ttok, model, teacher)
    if xtok is not None:
        dataset, report = xtok_kd.encode_pairs(tok, ttok, rows, "input", "teacher_output", args.max_len,
                                               keep_whole=args.idp_mode, source=args.data,
                                               own_template=xtok.own_template)
        xtok.report = report
    else:
        dataset, report = encode_rows(tok, rows, "input", "teacher_output", args.max_len, keep_whole=args.idp_mode,
                                      source=args.data)
    if cache is not None:
        cache.check(data_sha256=sha256_file(args.data), tokenizer=kd_cache.tokenizer_fingerprint(tok),
                    rows_sha256=kd_cache.rows_fingerprint(dataset), temperature=args.temperature,
                    sampling=args.cache_sampling)
        dataset = dataset.add_column("kd_row", list(range(len(dataset))))
        note(f"--teacher_cache: {kd_cache.describe(cache.meta)}; the teacher is not loaded")
        if warning := kd_cache.coverage_note(cache.meta):
            note("--teacher_cache: " + warning)
    eval_dataset = None
    if eval_rows is not None:
        eval_dataset, report["eval"] = encode_rows(tok, eval_rows, "input", "teacher_output", args.max_len,
                                                   keep_whole=args.idp_mode, source=eval_source(args))
    # run
    from callbacks import KDRecord
    record, held = {}, None  # held: the held-out KL function, when --eval_kl is given
    if held_rows is not None:
        from kd_losses import heldout_kl

        def held(student):
            if xtok is not None:  # the gold divergence at the aligned positions, with ULD and top-1 agreement
                h = xtok_kd.heldout(teacher, student, tok, ttok, xtok, held_rows, prompt_key="input",
                                    target_key=held_key, max_len=args.max_len,
                                    batch_size=max(args.per_device_train_batch_size, 8))
                side = "before" if "kl_before" not in record else "after"
                record.update({f"uld_{side}": h["uld"], f"top1_agreement_{side}": h["top1_agreement"],
                               "kl_kind": "gold (matched KL + rest bucket + ULD of the unmatched), aligned positions",
                               "kl_aligned_share": h["aligned_share"]})
                return h
            return heldout_kl(teacher, student, tok, held_rows, prompt_key="input", target_key=held_key,
                              max_len=args.max_len, batch_size=max(args.per_device_train_batch_size, 8), vocab=vocab)
        before = held(model)
        record.update(kl_before=before["kl"], kl_first_token_before=before["kl_first_token"],
                      kl_rows=before["rows"], kl_data=args.eval_kl)
        print(json.dumps({"heldout_kl_before": before}))
    from kd_trainer import build_trainer
    trainer = build_trainer(args, model, tok, dataset, teacher=teacher, vocab=vocab, cache=cache, xtok=xtok,
                            eval_dataset=eval_dataset, callbacks=log_callbacks(args) + [KDRecord(record, held)])
    # save
    return train_and_save(trainer, tok, args, script="kd_train.py", method="kd", base_model=ms.base_spec,
                          data=args.data, started=started, data_report=report, extra_metrics=record,
                          extra={"kd": kd_record(args, tms, cache, xtok)})


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
