"""The command line every script shares: the help formatter (docstring as written, defaults shown), --config YAML
files (keys are the flag names, the command line overrides the file), the model-loading flags, and the printed
resolved configuration.

Why argparse and not TRL's TrlParser / transformers' HfArgumentParser: those build the command line from config
dataclasses (SFTConfig alone has ~200 fields), so the README's flag names (--lr, --epochs, --save_dir, --student)
would become learning_rate / num_train_epochs / output_dir and --help would list every TrainingArguments field.
A recipe here is the README's flags in YAML: yaml.safe_load, each key checked against the script's own flags and
converted by the flag's own type and choices, becomes that flag's default, so the command line still wins.

argparse is used through a few of its non-public names, here only: ArgumentParser._actions,
_option_string_actions and _mutually_exclusive_groups (the declared flags) and HelpFormatter._get_help_string (the
hook ArgumentDefaultsHelpFormatter itself overrides).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fileio import UserError, note
from models import DEFAULT_STUDENT, EMBEDDED_ALIAS
from precision import DEFAULT_MAX_MEMORY_GB

MODEL_SPEC = f"hub id, local folder, .gguf, run dir (its adapter on its base) or {EMBEDDED_ALIAS}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description (the script's docstring) as written, so its commands stay copy-pasteable, and each flag's
    default after its help. Not shown where there is nothing to show: required flags, switches (off unless given)
    and None (each such help says what happens when the flag is absent)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings or action.required or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared formatter; `doc` (the module docstring) is shown as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------------------------------------------
# shared flags

def add_load_args(p, quantize: bool = True, training: bool = False) -> None:
    """--quantize and --trust_remote_code: how every script that loads a model loads it (quantize=False: a script
    that picks the precision itself, as export.py), and for inference --max_memory_gb, the budget --quantize auto
    fits (training declares its own --max_memory_gb: the training cap). The rule is precision.choose_precision."""
    if quantize and training:
        p.add_argument("--quantize", default="auto", choices=["auto", "4bit", "none"],
                       help="auto: 4-bit NF4 (QLoRA) on CUDA, unquantised on CPU; 4bit: always (needs CUDA); "
                            "none: never quantise (bf16 LoRA)")
    elif quantize:
        p.add_argument("--quantize", default="auto", choices=["auto", "4bit", "none"],
                       help="auto on CUDA: a model in bf16 where its weights fit --max_memory_gb, else 4-bit NF4; a "
                            "run dir on the precision its adapter was trained on (run.json); unquantised on CPU. "
                            "4bit: always (needs CUDA); none: never quantise")
        p.add_argument("--max_memory_gb", type=float, default=DEFAULT_MAX_MEMORY_GB,
                       help="GiB of GPU memory --quantize auto may use: bf16 when the weights plus a margin for "
                            "activations and KV cache fit this and the GPU's free memory; 0 = free memory only")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code from the hub (off: safer)")


def add_model_args(p, default: str | None = DEFAULT_STUDENT, required: bool = False, note_: str = "") -> None:
    """The model flags of every inference/evaluation script: --model_dir, --quantize, --trust_remote_code."""
    p.add_argument("--model_dir", default=None if required else default, required=required,
                   help="run dir (adapter + its base), model folder, hub id, .gguf or smollm2-135m" + note_)
    add_load_args(p)


# ----------------------------------------------------------------------------------------------------------------
# --config

class Args(argparse.Namespace):
    """argparse's Namespace plus `sources`: where each value came from. A slot, so vars(args) (what run.json's
    "args" records) holds the flags only."""
    __slots__ = ("sources",)


def _flags(p: argparse.ArgumentParser) -> dict:
    """{dest: action} of the flags a config file may set (not --help, --config or hidden ones)."""
    return {a.dest: a for a in p._actions
            if a.option_strings and a.dest not in ("help", "config") and a.help is not argparse.SUPPRESS}


def _yaml_keys(path: Path, text: str) -> dict:
    """{key: (value, line)} of a flat YAML mapping; bad YAML, a duplicate key or a nested mapping is a UserError."""
    import yaml
    try:
        node, data = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: line {node.start_mark.line + 1}: a config is a mapping of flag: value lines")
    lines = {}
    for k, _ in node.value:
        if k.value in lines:
            raise UserError(f"{path}: line {k.start_mark.line + 1}: '{k.value}' is given twice (first on line "
                            f"{lines[k.value]})")
        lines[k.value] = k.start_mark.line + 1
    out = {}
    for (key, value), line in zip(data.items(), lines.values()):
        if isinstance(value, dict):
            raise UserError(f"{path}: line {line}: {key}: a flag takes a value or a list, not a mapping")
        out[str(key)] = (value, line)
    return out


def _convert(action, value, where: str):
    """A YAML value through the flag's own rules: its type (a YAML string such as 1e-3 too), nargs and choices."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise UserError(f"{where}: {flag} is a switch: write true or false, not {value!r}")
        return action.const if value else action.default
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if isinstance(value, list) and not many:
        raise UserError(f"{where}: {flag} takes one value, not a list")
    values = (value if isinstance(value, list) else [value]) if many else [value]
    out = []
    for v in values:
        if isinstance(v, (dict, list)):
            raise UserError(f"{where}: {flag}: {v!r} is not a single value")
        if v is None:
            out.append(None)
            continue
        if action.type is not None:
            if action.type is int and isinstance(v, float) and not v.is_integer():
                raise UserError(f"{where}: {flag} takes a whole number, not {v}")
            try:
                v = action.type(v if isinstance(v, str) or action.type in (int, float) else str(v))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise UserError(f"{where}: {flag}: {v!r} is not a valid value ({e})") from None
        elif not isinstance(v, str):
            v = str(v)
        if action.choices is not None and v not in action.choices:
            raise UserError(f"{where}: {flag}: {v!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(v)
    return out if many else out[0]


def read_config(path: str, p: argparse.ArgumentParser) -> dict:
    """{dest: (value, line)} of a --config file, each key a flag of `p` and each value converted as that flag's."""
    f = Path(path)
    if not f.is_file():
        raise UserError(f"--config {path}: no such file")
    flags, prog = _flags(p), Path(p.prog).name
    out = {}
    for key, (value, line) in _yaml_keys(f, f.read_text(encoding="utf-8")).items():
        dest = key.lstrip("-").replace("-", "_")
        if dest == "config":
            raise UserError(f"{path}: line {line}: a config file cannot name another config")
        if dest not in flags:
            import difflib
            close = difflib.get_close_matches(dest, flags, n=1)
            raise UserError(f"{path}: line {line}: unknown key '{key}': not a flag of {prog}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
        out[dest] = (_convert(flags[dest], value, f"{path}: line {line}"), line)
    return out


def _given(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line itself sets (abbreviations and --flag=value included): argv parsed again with
    every default suppressed and nothing required."""
    saved = [(a, a.default, a.required) for a in p._actions]
    groups = [(g, g.required) for g in p._mutually_exclusive_groups]
    try:
        for a in p._actions:
            a.default, a.required = argparse.SUPPRESS, False
        for g, _ in groups:
            g.required = False
        ns, _ = p.parse_known_args(argv)
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        for g, required in groups:
            g.required = required
    return set(vars(ns)) - {"config"}


def parse(p: argparse.ArgumentParser, argv=None) -> Args:
    """p.parse_args(argv) with --config FILE.yaml: the file's values become the flags' defaults, so the command line
    overrides them (a repeatable flag given on the command line replaces the file's list) and a file may give a
    required flag. args.sources says which value came from where."""
    if not any("--config" in a.option_strings for a in p._actions):
        p.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML file of flag: value lines (the flags' names, e.g. recipes/*.yaml); flags given on "
                            "the command line override it, and --no_FLAG turns off a switch it turns on")
    for a in list(_flags(p).values()):  # --no_<switch>: turns off a switch a config file turned on (not in --help)
        if a.nargs == 0 and a.const is True and f"--no_{a.dest}" not in p._option_string_actions:
            p.add_argument(f"--no_{a.dest}", dest=a.dest, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    file_values = {k: v for k, (v, _) in read_config(path, p).items()} if path else {}
    flags = _flags(p)
    for dest, value in file_values.items():
        flags[dest].default, flags[dest].required = value, False
    args = p.parse_args(argv, namespace=Args())
    if not path:
        args.sources = {"file": None}
        return args
    given = _given(p, argv)
    for dest in given & set(file_values):
        if isinstance(flags[dest], argparse._AppendAction):  # argparse appends to the default: keep the CLI's only
            setattr(args, dest, getattr(args, dest)[len(file_values[dest]):])
    args.sources = {"file": path, "from_file": sorted(set(file_values) - given), "from_command_line": sorted(given),
                    "overridden": {k: file_values[k] for k in sorted(given & set(file_values))}}
    for k, old in args.sources["overridden"].items():
        note(f"--{k} {getattr(args, k)} on the command line overrides {path}'s {k}: {old}", once=False)
    return args


def config_record(args) -> dict | None:
    """What run.json records of --config: the file, which keys came from it, which from the command line, and the
    file's values the command line replaced. None when no config file was used."""
    sources = getattr(args, "sources", None)
    return sources if sources and sources.get("file") else None


def print_config(title: str, args) -> None:
    """Print the resolved configuration at start, and where it came from when a --config file was used."""
    items = vars(args) if not isinstance(args, dict) else args
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in items.items()), file=sys.stderr, flush=True)
    src = config_record(args)
    if src:
        print(f"{title}: from {src['file']}: {', '.join(src['from_file']) or '-'}; from the command line: "
              f"{', '.join(src['from_command_line']) or '-'}", file=sys.stderr, flush=True)
