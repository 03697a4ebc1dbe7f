"""Cache a teacher's next-token targets on the answers of a KD file, once, for kd_train.py --teacher_cache: the
teacher then never shares the GPU with the student.

    python teacher_cache.py --teacher smollm2-135m --data data/creditmix_kd.jsonl --idp_mode --out runs/cache_creditmix
    python kd_train.py --student smollm2-135m --teacher_cache runs/cache_creditmix --data data/creditmix_kd.jsonl --idp_mode --save_dir runs/creditmix_kd_cached --max_steps 2
    python teacher_cache.py --teacher smollm2-135m --data data/creditmix_kd.jsonl --idp_mode --temperature 2 --sampling sample --out runs/cache_creditmix_t2

--sampling topk (the default) keeps the teacher's top-k log-probabilities and one bucket for the rest of its mass;
--sampling sample draws --draws ids per answer token from the teacher at --temperature and keeps the distinct
ids with their frequencies (random-sampling KD, Anshumann et al. 2025): an unbiased target at any temperature, where
the top k can miss most of a tempered teacher's mass (meta.json's teacher_mass_outside says how much; a note when it
is more than 10%). kd_cache.py has the format and the loss.

The answers are encoded exactly as kd_train.py encodes them (same --max_len, --idp_mode, --schema), with the
teacher's tokenizer, which must be the student's (kd_train.py checks the ids). Storage: 4k + 2 bytes per answer
token (258 at the default k = 64); sampled at most 4N + 4 (260 at the default N = 64). Resumable: shards of
--shard_rows rows are written whole as they finish; rerun the same command to continue after an interruption (the
draws are seeded per batch: the same as an uninterrupted run's). --overwrite starts over.
"""
import json
import shutil
from pathlib import Path

import kd_cache
import cli
from common import load_model
from fileio import UserError, check_output_dir, note, read_records, user_errors, write_json
from kd_losses import add_kd_data_args, canonical_rows, load_schema


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--teacher", required=True, help=cli.MODEL_SPEC)
    cli.add_load_args(g)
    g = p.add_argument_group("data (as given to kd_train.py)")
    add_kd_data_args(g)
    g.add_argument("--max_len", type=int, default=1024, help="as kd_train.py --max_len (tokens per example)")
    g = p.add_argument_group("cache")
    g.add_argument("--sampling", default="topk", choices=kd_cache.SAMPLING,
                   help="topk: the teacher's --top_k most likely ids and a tail bucket (loses the tail's shape); "
                        "sample: --draws ids drawn from the teacher, the distinct ids with their frequencies "
                        "(unbiased, noisier)")
    g.add_argument("--top_k", type=int, default=64, help="--sampling topk: log-probabilities kept per answer token")
    g.add_argument("--draws", type=int, default=64,
                   help="--sampling sample: draws per answer token, with replacement (at most this many ids kept)")
    g.add_argument("--seed", type=int, default=0, help="--sampling sample: seed of the draws")
    g.add_argument("--temperature", type=float, default=1.0, help="teacher softmax temperature (kd_train.py's)")
    g.add_argument("--batch_size", type=int, default=8, help="rows per teacher forward pass")
    g.add_argument("--shard_rows", type=int, default=256, help="rows per shard file (the resume unit)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="cache folder (created)")
    g.add_argument("--overwrite", action="store_true", help="discard an existing cache at --out")
    return cli.parse(p, argv)


def check_out(args, meta: dict) -> int:
    """The first shard still to write: 0 for a new cache, more when resuming the same one; refuses another."""
    out = Path(args.out)
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    if not out.exists():
        return 0
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a cache folder")
    old = out / "meta.json"
    if not old.is_file():
        raise UserError(f"--out {out} exists and is not a teacher cache: choose another path or pass --overwrite")
    prev = json.loads(old.read_text(encoding="utf-8"))
    same = {k: prev.get(k) for k in meta if k != "complete"} == {k: meta[k] for k in meta if k != "complete"}
    if not same:
        raise UserError(f"--out {out} holds a cache made with other settings ({kd_cache.describe(prev)}, data "
                        f"{prev.get('data')}): pass --overwrite to replace it")
    done = 0
    while kd_cache.shard_path(out, done).is_file():
        done += 1
    return done


def main(args):
    cli.print_config("teacher_cache", args)
    if args.top_k < 1 or args.draws < 1 or args.temperature <= 0 or args.shard_rows < 1:
        raise UserError("--top_k, --draws and --shard_rows must be >= 1 and --temperature > 0")
    sampled = args.sampling == "sample"
    check_output_dir(args.out, "--out")  # before the teacher loads
    # load
    from training import encode_rows
    rows = read_records(args.data, required=("input", "teacher_output"), nonempty=("input", "teacher_output"))
    if args.idp_mode:
        rows = canonical_rows(rows, "teacher_output", args.data, load_schema(args.schema))
    teacher, tok, _ = load_model(args.teacher, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                 max_memory_gb=args.max_memory_gb)
    dataset, _ = encode_rows(tok, rows, "input", "teacher_output", args.max_len, keep_whole=args.idp_mode,
                             source=args.data)
    meta = kd_cache.cache_meta(args.teacher, args.data, tok, dataset, temperature=args.temperature,
                               shard_rows=args.shard_rows, sampling=args.sampling,
                               top_k=None if sampled else args.top_k, draws=args.draws if sampled else None,
                               seed=args.seed if sampled else None,
                               encoding={"max_len": args.max_len, "idp_mode": args.idp_mode, "schema": args.schema})
    first = check_out(args, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "meta.json", {**meta, "complete": False})
    # run
    kd_cache.write_shards(teacher, tok, dataset, out, first=first, top_k=args.top_k, temperature=args.temperature,
                          shard_rows=args.shard_rows, batch_size=args.batch_size, sampling=args.sampling,
                          draws=args.draws, seed=args.seed)
    # save
    done = kd_cache.finish(out, meta)
    size = sum(p.stat().st_size for p in out.glob("shard-*.npz"))
    tokens = sum(sum(x != -100 for x in ex["labels"][1:]) for ex in dataset)
    summary = {"out": str(out), "rows": len(dataset), "shards": -(-len(dataset) // args.shard_rows),
               "resumed_at_shard": first, "answer_tokens": tokens, "sampling": args.sampling,
               **({"draws": args.draws, "seed": args.seed} if sampled else {"top_k": args.top_k}),
               "temperature": args.temperature, "teacher_mass_outside": done["teacher_mass_outside"], "bytes": size,
               "bytes_per_answer_token": round(size / max(tokens, 1), 1)}
    print(json.dumps(summary))
    if warning := kd_cache.coverage_note(done):
        note(warning)
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
