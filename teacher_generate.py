"""Fill `teacher_output` with a teacher's answers: batched generation (left padding) from any model models.py
resolves, written as {"input", "teacher_output", ...the row's other fields} for kd_train.py's sequence-level KD.

    python teacher_generate.py --teacher smollm2-135m --data data/creditmix_kd.jsonl --out runs/creditmix_teacher_kd.jsonl --max_new_tokens 8
    python teacher_generate.py --teacher Qwen/Qwen2.5-7B-Instruct --data data/idp_kd.jsonl --out data/idp_kd_teacher.jsonl
    python teacher_generate.py --teacher Qwen/Qwen2.5-Coder-7B-Instruct --data data/codegen_kd.jsonl --out data/codegen_kd_teacher.jsonl --plan_then_code

Resumable: each batch is appended and flushed, so an interrupted run keeps what it wrote; rerun the same command and
it checks that the rows already in --out are this data's first rows (same input, same teacher) and continues after
them, never writing a row twice. A half-written last line is dropped. --overwrite starts over.
"""
import json
import os
from pathlib import Path

import cli
from common import chat_prompt, load_model
from fileio import UserError, check_output_file, jsonl_dumps, jsonl_lines, note, read_records_placed, user_errors


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--teacher", required=True, help=cli.MODEL_SPEC)
    cli.add_load_args(g)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help='JSONL (or JSON list) of {"input": prompt, ...}; "prompt" also read')
    g.add_argument("--input_key", default="auto", help="field holding the user prompt (auto: input, else prompt)")
    g.add_argument("--limit", type=int, default=0, help="answer only the first N rows (0: all)")
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="tokens per answer (per step with --plan_then_code)")
    g.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call; also the resume unit")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic); > 0: sampling")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=42, help="sampling seed")
    g.add_argument("--system", default=None, help="optional system message for the teacher")
    g.add_argument("--plan_then_code", action="store_true",
                   help="CodeGen: the teacher first writes a plan, then the code following it; teacher_output is "
                        "the trace 'Plan:\\n<plan>\\n\\n<code answer>' (prompts from codegen.py)")
    g.add_argument("--plan_tokens", type=int, default=256, help="--plan_then_code: tokens for the plan")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output JSONL; rows already there are kept and skipped (resume)")
    g.add_argument("--overwrite", action="store_true", help="discard an existing --out and start over")
    return cli.parse(p, argv)


def done_rows(out: Path, prompts: list[str], teacher: str) -> int:
    """How many rows --out already holds for this data and teacher (checked row by row). A half-written last line
    from an interrupted run is cut off the file."""
    if not out.exists():
        return 0
    raw = out.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        note(f"{out}: dropping a half-written last line from an interrupted run")
        with open(out, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{out}: not UTF-8 text, so not written by teacher_generate.py; use another --out or "
                        "--overwrite") from None
    lines = jsonl_lines(text)  # split on "\n" only, as written: a U+2028 in an answer is not a line break
    if len(lines) > len(prompts):
        raise UserError(f"{out} holds {len(lines)} rows but the data has {len(prompts)}: not a run on this data; "
                        "use another --out or --overwrite")
    for i, (lineno, line) in enumerate(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{out}:{lineno}: invalid JSON ({e.msg}); use another --out or --overwrite") from None
        if not isinstance(r, dict) or r.get("input") != prompts[i]:
            raise UserError(f"{out}:{lineno}: its input differs from row {i + 1} of the data: not a run on this "
                            "data; use another --out or --overwrite")
        if r.get("teacher") != teacher:
            raise UserError(f"{out}:{lineno}: written by teacher {r.get('teacher')!r}, not {teacher!r}; "
                            "use another --out or --overwrite")
    return len(lines)


def generate(model, tok, messages: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             system: str | None = None) -> tuple[list[str], list[bool]]:
    """One batch: chat-template prompts, left padding, generate; returns the answers and whether each ended on its
    own (False: cut by max_new_tokens)."""
    import torch
    tok.padding_side = "left"
    prompts = [chat_prompt(tok, m, system) for m in messages]
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos = model.generation_config.eos_token_id
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                              **kw)
    new = seqs[:, enc["input_ids"].shape[1]:]
    stops = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    ended = torch.isin(new, stops).any(1).tolist()
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)], ended


def main(args):
    import torch
    from tqdm.auto import tqdm

    cli.print_config("teacher_generate", args)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be >= 1")
    out = check_output_file(args.out, "--out")  # before anything loads
    # load
    placed = read_records_placed(args.data)
    rows = [r for _, r in placed]
    key = args.input_key if args.input_key != "auto" else ("input" if "input" in rows[0] else "prompt")
    for where, r in placed:
        if not isinstance(r.get(key), str) or not r[key].strip():
            raise UserError(f"{args.data}: {where}: field '{key}' must be a non-empty string")
    rows = rows[:args.limit] if args.limit > 0 else rows
    prompts = [r[key] for r in rows]
    if args.overwrite and out.exists():
        out.unlink()
    done = done_rows(out, prompts, args.teacher)
    if done == len(rows):
        print(json.dumps({"out": str(out), "rows": len(rows), "generated": 0, "kept": done}))
        return {"rows": len(rows), "generated": 0, "kept": done}
    if done:
        note(f"{out} already holds {done} of {len(rows)} rows: continuing after them")
    model, tok, _ = load_model(args.teacher, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                               max_memory_gb=args.max_memory_gb)
    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               system=args.system)
    if args.plan_then_code:
        from codegen import CODE_BLOCK_ASK, code_from_plan_request, plan_request
    # run
    cut = empty = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(rows), initial=done, desc="teacher", unit="row") as bar:
        for start in range(done, len(rows), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            if args.plan_then_code:
                tasks = [p[:-len(CODE_BLOCK_ASK)].rstrip() if p.endswith(CODE_BLOCK_ASK) else p for p in batch]
                plans, _ = generate(model, tok, [plan_request(t) for t in tasks],
                                    **dict(gen, max_new_tokens=args.plan_tokens))
                codes, ended = generate(model, tok, [code_from_plan_request(t, pl) for t, pl in zip(tasks, plans)],
                                        **gen)
                answers = [f"Plan:\n{pl}\n\n{c}" for pl, c in zip(plans, codes)]
            else:
                answers, ended = generate(model, tok, batch, **gen)
            cut += ended.count(False)
            empty += sum(not a for a in answers)
            for r, p, a in zip(rows[start:start + args.batch_size], batch, answers):
                f.write(jsonl_dumps({**r, "input": p, "teacher_output": a, "teacher": args.teacher}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    # save
    if cut:
        note(f"{cut} answers hit --max_new_tokens {args.max_new_tokens} and are cut: raise it, or kd_train.py "
             "trains on cut answers")
    if empty:
        note(f"{empty} answers are empty: kd_train.py refuses empty teacher_output; drop or redo those rows")
    summary = {"out": str(out), "rows": len(rows), "generated": len(rows) - done, "kept": done, "cut": cut,
               "empty": empty}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
