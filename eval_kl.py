"""Held-out KL(teacher||student): how far a student's next-token distributions are from its teacher's on the answer
tokens of a file (teacher-forced), as a token mean and on each row's first answer token (a classifier's decision).

    python eval_kl.py --teacher runs/creditmix_sft --student smollm2-135m --data data/creditmix_val.jsonl
    python eval_kl.py --teacher runs/cm6_teacher --student runs/cm6_kd --data runs/data_cm6/creditmix_val.jsonl --out kl.json

Filed like every evaluation under the student's run dir: evals/<task>__<data-stem>__<date>.json (metrics: kl, ...).
"""
import json

import cli
from common import load_model
from fileio import UserError, read_records, user_errors
from run_record import save_eval
from kd_losses import KD_LOSSES, canonical_rows, target_key


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--teacher", required=True, help=cli.MODEL_SPEC)
    g.add_argument("--student", required=True, help="the model compared with the teacher (same tokenizer)")
    cli.add_load_args(g)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help='JSONL of {"input", "teacher_output" or "output"}')
    g.add_argument("--idp_mode", action="store_true", help="JSON answers in canonical form, as kd_train.py trains")
    g.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    g.add_argument("--max_len", type=int, default=1024, help="max tokens per row (longer answers are cut)")
    g = p.add_argument_group("run")
    g.add_argument("--divergence", default="forward_kl", choices=KD_LOSSES,
                   help="forward_kl = KL(teacher||student); reverse_kl; jsd")
    g.add_argument("--jsd_beta", type=float, default=0.5, help="jsd only: the teacher's mixture weight")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both models")
    g.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="also write the metrics JSON here")
    return cli.parse(p, argv)


def main(args):
    from fileio import write_json
    from kd_losses import check_vocab, heldout_kl

    cli.print_config("eval_kl", args)
    # load
    rows = read_records(args.data, required=("input",), nonempty=("input",))
    key = target_key(rows, args.data)
    if args.idp_mode:
        rows = canonical_rows(rows, key, args.data)
    rows = rows[:args.limit] if args.limit > 0 else rows
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    teacher, ttok, _ = load_model(args.teacher, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                  max_memory_gb=args.max_memory_gb)
    student, tok, _ = load_model(args.student, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                 max_memory_gb=args.max_memory_gb)
    vocab = check_vocab(tok, ttok, student, teacher)
    # run
    metrics = heldout_kl(teacher, student, tok, rows, prompt_key="input", target_key=key, max_len=args.max_len,
                         batch_size=args.batch_size, vocab=vocab, kd_loss=args.divergence, jsd_beta=args.jsd_beta,
                         temperature=args.temperature)
    metrics["teacher"] = args.teacher
    # save
    path = save_eval(args.student, "kl", args.data, args, metrics, script="eval_kl.py")
    if args.out:
        write_json(args.out, metrics)
    print(json.dumps({**metrics, "saved": str(path)}))
    return metrics


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
