"""Write code for a task with a (fine-tuned) model; optionally plan first, then code. Prints the code.

    python infer_codegen.py --model_dir smollm2-135m --prompt "Write a function that sorts a list." --plan_then_code
    python infer_codegen.py --model_dir runs/kd_code --prompt "Write a function that sorts a list." --plan_then_code
    python infer_codegen.py --model_dir smollm2-135m --prompt "Write a function add(a, b) that returns a + b." --test "assert add(2, 3) == 5"

The prompt goes through the model's chat template (common.chat_prompt, the same builder the training rows use) with
an ask for one ```python block. --plan_then_code makes two generations: a short plan, then the code given that plan.
The code block is extracted from the answer (prose around it is dropped); the plan and, with --raw, the whole answer
go to stderr, the code to stdout. Greedy by default; --temperature > 0 samples (--num_samples answers, batched).
--test runs each answer with your asserts in the sandbox (sandbox.py) and says whether it passed.
"""
import sys

import codegen
import sandbox
import cli
from common import load_model
from fileio import UserError, user_errors, write_json
def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    cli.add_model_args(p)
    # data
    p.add_argument("--prompt", required=True, help='the task, e.g. "Write a function that sorts a list."')
    p.add_argument("--test", action="append", default=[],
                   help='an assert to run against each answer in the sandbox, e.g. "assert f([2, 1]) == [1, 2]"; '
                        "repeat for several")
    # run
    codegen.add_decoding_args(p, "answers to generate (needs --temperature > 0)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per answer when running --test")
    # output
    p.add_argument("--raw", action="store_true", help="also print each whole answer (to stderr)")
    p.add_argument("--out", default=None, help="write the answers (plan, raw answer, code, test result) as JSON")
    return cli.parse(p, argv)


def main(args):
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    if args.num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    if args.num_samples > 1 and args.temperature <= 0:
        raise UserError("--num_samples > 1 with greedy decoding gives identical answers: set --temperature > 0")
    cli.print_config("infer_codegen", args)
    # load
    from transformers import set_seed
    set_seed(args.seed)
    model, tok, _ = load_model(args.model_dir, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                               max_memory_gb=args.max_memory_gb)
    # run
    answers = codegen.answer(model, tok, [args.prompt], plan_then_code=args.plan_then_code,
                             plan_tokens=args.plan_tokens, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples,
                             batch_size=args.num_samples)[0]
    for a in answers:
        a["code"] = codegen.extract_code(a["raw"])
    if args.test:
        tests = "\n".join(args.test)
        results = sandbox.run_programs([a["code"] + "\n\n" + tests + "\n" for a in answers],
                                       sandbox.Limits(timeout_s=args.timeout))
        for a, r in zip(answers, results):
            a["test"] = {"status": r.status, "reason": r.reason}
    # save
    for i, a in enumerate(answers):
        if len(answers) > 1:
            print(f"# ---- sample {i + 1}/{len(answers)} ----")
        if a["plan"] is not None:
            print("# plan:\n" + a["plan"].strip() + "\n", file=sys.stderr)
        if args.raw:
            print("# raw answer:\n" + a["raw"] + "\n", file=sys.stderr)
        print(a["code"] if a["code"] else "# (no code in the answer; rerun with --raw to see it)")
        if "test" in a:
            t = a["test"]
            print(f"# test: {t['status']}" + (f" ({t['reason']})" if t["reason"] else ""), file=sys.stderr)
        sys.stdout.flush()
    if args.out:
        write_json(args.out, {"model_dir": args.model_dir, "prompt": args.prompt, "args": vars(args),
                              "answers": answers})
    return answers


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
