"""Classify a customer's credit mix (Good / Standard / Bad) by calibrated label ranking; prints the README's JSON.

    python infer_creditmix.py --model_dir smollm2-135m --features "Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments"
    python infer_creditmix.py --model_dir runs/creditmix_sft --features "Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments"

Each label is scored by its length-normalised log-likelihood at the assistant position; a prior is subtracted (by
default the calibration eval_creditmix.py picked for this model, else multi-null: the mean score over content-free
prompts); the highest calibrated score wins. Probabilities are softmax(calibrated scores / temperature).
"""
import json

import creditmix as cm
import cli
from common import load_model
from fileio import UserError, note, user_errors
from run_record import eval_run_dir
from scoring import CALIBRATIONS, read_calibration, response, served_prior


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    cli.add_model_args(p)
    # data
    p.add_argument("--features", action="append", required=True,
                   help='customer features, e.g. "Age: 23.0, Occupation: Scientist, …"; repeat for several')
    # run
    p.add_argument("--calibration", default="auto", choices=("auto", *CALIBRATIONS),
                   help="prior to subtract: auto (what eval_creditmix.py picked for this model on a validation "
                        "split, with its temperature; multi_null when it was never evaluated), multi_null "
                        "(content-free prompts, the README's), batch (mean over the given inputs; needs several), "
                        "none (raw scores)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass")
    return cli.parse(p, argv)


def main(args):
    if any(not f.strip() for f in args.features):
        raise UserError("--features is empty")
    if args.calibration == "batch" and len(args.features) < 2:
        raise UserError("--calibration batch needs several inputs (repeat --features), or use multi_null")
    # load
    model, tok, _ = load_model(args.model_dir, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                               max_memory_gb=args.max_memory_gb)
    # run
    raw = cm.label_scores(model, tok, [cm.prompt_for(f.strip()) for f in args.features], args.batch_size)
    recorded = read_calibration(eval_run_dir(args.model_dir, create=False)) if args.calibration == "auto" else None
    prior, temperature, used = served_prior(args.calibration, recorded, raw, lambda: cm.null_scores(model, tok))
    if args.calibration == "auto":
        note(f"--calibration auto: {used}, temperature {temperature:g}, picked by eval_creditmix.py on "
             f"{recorded['data']['path']}" if recorded else
             "--calibration auto: multi_null (no calibration recorded for this model: run eval_creditmix.py on a "
             "validation split to pick one)")
    out = [response(args.model_dir, cm.LABELS, r, prior, temperature=temperature) for r in raw]
    # save
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return out


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
