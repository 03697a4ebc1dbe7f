"""Every fenced command in README.md and docs/*.md runs as written in a fresh clone; every script's --help shows
its defaults.

How a page is checked (write pages this way):
- ```bash / ```sh / ```shell blocks are checked, one command per line (a line ending in \\ joins the next); ```text,
  ```console, ```json, ```python and the rest are not.
- A command that cannot run in a fresh clone on a CPU says why with a comment `# needs KIND: where it comes from`,
  KIND one of data, hub, gpu, server, network, long; the text after the colon is required. On its own line the
  marker applies to the commands below it up to the next blank line; at the end of a command, to that command.
- Every command: `python X.py ARGS` (also after `accelerate launch`/`torchrun`): X.py --help exits 0 and
  X.parse_args(ARGS) accepts exactly these arguments (nothing runs); `make T`: T is a Makefile target; `bash F`:
  F exists and passes `bash -n`; `uvicorn M:app`: M defines app. Other programs need a marker, except a few plain
  shell tools (ALWAYS_OK).
- An unmarked command must also run in a fresh clone: each path it reads (data, schema, model, run) is tracked by
  git or written by an earlier command of the same page or of README.md (read first; `make demo` writes
  runs/demo/...); a hub model id needs `# needs hub:`.
- README.md's unmarked commands run for real, in order, in a copy of the tracked files, as two-step variants
  (TWO_STEP appends e.g. --max_steps 2 on one row a step), after `make demo` with DEMO_STEPS=2 on one row a step
  and its evaluations on 2 rows per class.
"""
import argparse
import fnmatch
import functools
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED_LANGS = {"bash", "sh", "shell"}
KINDS = {"data", "hub", "gpu", "server", "network", "long"}
MARKER = re.compile(r"^#\s*needs\s+(?P<kind>[\w-]+)\s*:\s*(?P<text>.*)$")
ALWAYS_OK = {"cd", "export", "printf", "echo", "cat", "ls", "jq", "head", "tail", "mkdir", "rm", "cp", "diff", "git",
             "true", "wc", "tee", "sort", "grep"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
# flags whose value is a path the command reads / writes (Namespace attribute names)
INPUTS = ("data", "src", "schema", "schemas", "document_file", "input", "samples", "eval_kl", "predictions",
          "teacher_cache")
MODELS = ("student", "teacher", "model_dir", "ref_model_dir")
OUTPUTS = ("save_dir", "outdir", "out", "output", "save_samples")
EMBEDDED = "smollm2-135m"
# the cheap variant of each script that README.md's real run uses (appended: argparse keeps the last value)
TRAIN_2 = ["--max_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]
TWO_STEP = {
    "sft_train.py": TRAIN_2, "kd_train.py": TRAIN_2 + ["--max_new_tokens", "8"], "dpo_train.py": TRAIN_2,
    "infer_idp.py": ["--max_new_tokens", "64"], "infer_codegen.py": ["--max_new_tokens", "16", "--plan_tokens", "16"],
    "eval_creditmix.py": ["--limit", "2"], "eval_idp.py": ["--limit", "2", "--max_new_tokens", "64"],
    "eval_codegen.py": ["--limit", "1", "--max_new_tokens", "16"], "eval_kl.py": ["--limit", "2"],
    "teacher_generate.py": ["--limit", "2", "--max_new_tokens", "8"],
}


@dataclass
class Command:
    page: str
    line: int
    text: str                                   # the command without its trailing comment
    needs: dict = field(default_factory=dict)   # kind -> where it comes from

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text[:120]}"


# ----------------------------------------------------------------------------------------------------------------
# reading pages

def scan_quotes(text: str) -> tuple[int | None, str | None]:
    """(where a shell comment starts: a # outside quotes, after a blank or at the start, else None; the quote still
    open at the end of text, else None)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return i, None
    return None, quote


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line."""
    i, _ = scan_quotes(line)
    return (line.rstrip(), "") if i is None else (line[:i].rstrip(), line[i:])


def open_quote(text: str) -> bool:
    """Whether text ends inside a quoted string (so the shell reads the next line as part of the command)."""
    return scan_quotes(text)[1] is not None


def fenced_blocks(path: Path):
    """(language, first body line number, body lines) of every fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)[^`]*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start, body = i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        yield lang, start, body
        i += 1


def page_commands(path: Path) -> tuple[list[Command], list[str]]:
    """The checked commands of a page, and the problems with its markers."""
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    cmds, problems = [], []

    def marker(comment: str, line: int) -> dict:
        m = MARKER.match(comment.strip())
        if not m:
            return {}
        if m["kind"] not in KINDS:
            problems.append(f"{name}:{line}: unknown marker kind {m['kind']!r} (one of {', '.join(sorted(KINDS))})")
        elif not m["text"].strip():
            problems.append(f"{name}:{line}: '# needs {m['kind']}:' must say where it comes from / why")
        return {m["kind"]: m["text"].strip()}

    for lang, start, body in fenced_blocks(path):
        if lang not in CHECKED_LANGS:
            continue
        block_needs, pending, first = {}, "", None
        for n, raw in enumerate(body, start):
            line = raw.strip()
            if not line and not pending:
                block_needs = {}
                continue
            if line.startswith("#") and not pending:
                block_needs.update(marker(line, n))
                continue
            if line.endswith("\\"):
                pending, first = pending + line[:-1] + " ", first or n
                continue
            if open_quote(pending + line):  # a quoted string spans lines: the command goes on
                pending, first = pending + line + "\n", first or n
                continue
            code, comment = split_comment(pending + line)
            cmds.append(Command(name, first or n, code, {**block_needs, **marker(comment, n)}))
            pending, first = "", None
    return cmds, problems


# ----------------------------------------------------------------------------------------------------------------
# what a fresh clone holds

@functools.cache
def tracked() -> frozenset:
    """Files a fresh clone has (tracked, or new and not ignored), and their folders."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    paths = {p for p in out if (ROOT / p).exists()}
    for p in list(paths):
        paths.update(str(parent) for parent in Path(p).parents if str(parent) != ".")
    return frozenset(paths)


@functools.cache
def make_targets() -> frozenset:
    text = (ROOT / "Makefile").read_text()
    names = set()
    for m in re.finditer(r"^([\w./-]+(?:\s+[\w./-]+)*)\s*:(?!=)", text, re.M):
        names.update(m.group(1).split())
    return frozenset(names)


@functools.cache
def help_exit(script: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


@functools.cache
def has_app(module: str) -> bool:
    r = subprocess.run([sys.executable, "-c", f"import {module}; {module}.app"], cwd=ROOT, capture_output=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return r.returncode == 0


def top_level_scripts() -> list[str]:
    return sorted(p.name for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8"))


def parse_exact(script: str, argv: list[str]):
    """script's parse_args(argv) in this process: (Namespace, None) or (None, argparse's message)."""
    module = importlib.import_module(Path(script).stem)
    err = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            return module.parse_args(argv), None
    except SystemExit as e:
        return None, (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]


# ----------------------------------------------------------------------------------------------------------------
# checking commands

def is_pathlike(spec: str) -> bool:
    return spec.startswith(("runs/", "./", "../", "/", "~", "data/")) or spec.endswith(".gguf") or \
        (ROOT / spec).exists()


class Checker:
    """Walks a page's commands in order, remembering what earlier commands wrote."""

    def __init__(self, produced: dict | None = None):
        self.produced = dict(produced or {})   # path -> Command that wrote it
        self.by_marked = {}                    # path -> a marked Command that wrote it
        self.problems = []

    # paths
    def available(self, path: str) -> bool:
        p = os.path.normpath(path.rstrip("/")) if path not in ("", ".") else "."
        if p == "." or p in tracked() or p in self.produced:
            return True
        if any(ch in p for ch in "*?["):
            return any(fnmatch.fnmatch(q, p) for q in list(tracked()) + list(self.produced))
        return any(p.startswith(q + "/") or q.startswith(p + "/") for q in self.produced)

    def wrote(self, cmd: Command, path: str | None) -> None:
        if path:
            (self.by_marked if cmd.needs else self.produced)[os.path.normpath(path.rstrip("/"))] = cmd

    def need(self, cmd: Command, path: str, what: str) -> None:
        if cmd.needs or self.available(path):
            return
        norm = os.path.normpath(path)
        src = next((c for q, c in self.by_marked.items() if norm == q or norm.startswith(q + "/")), None)
        hint = (f"it is written by {src.page}:{src.line}, marked 'needs {next(iter(src.needs))}': mark this one too"
                if src else "not in a fresh clone and not written by an earlier command of this page or README.md")
        if path.startswith("../shared"):
            hint = "real data: add '# needs data: <what it is and where it comes from>'"
        self.problems.append(f"{cmd.where()}\n    {what} {path!r}: {hint}")

    def model(self, cmd: Command, spec: str, flag: str) -> None:
        if spec == EMBEDDED or cmd.needs:
            return
        if is_pathlike(spec):
            self.need(cmd, spec, f"--{flag}")
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
            self.problems.append(f"{cmd.where()}\n    --{flag} {spec} is a hub model: add '# needs hub: {spec}'")
        else:
            self.problems.append(f"{cmd.where()}\n    --{flag} {spec!r}: neither {EMBEDDED}, a path nor a hub id")

    # commands
    def check(self, cmd: Command) -> None:
        try:
            lex = shlex.shlex(cmd.text, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            tokens = list(lex)
        except ValueError as e:
            self.problems.append(f"{cmd.where()}\n    cannot be split into words: {e}")
            return
        seg, segments = [], []
        for t in tokens + [";"]:
            if t in ("&&", "||", ";", "|", "&"):
                segments.append(seg)
                seg = []
            else:
                seg.append(t)
        for seg in filter(None, segments):
            env = {}
            while seg and re.match(r"^[A-Za-z_]\w*=", seg[0]):
                k, v = seg.pop(0).split("=", 1)
                env[k] = v
            words, i = [], 0
            while i < len(seg):          # redirections: > FILE writes FILE, < FILE reads it
                if seg[i] in (">", ">>") and i + 1 < len(seg):
                    self.wrote(cmd, seg[i + 1])
                    i += 2
                elif seg[i] == "<" and i + 1 < len(seg):
                    self.need(cmd, seg[i + 1], "stdin")
                    i += 2
                else:
                    words.append(seg[i])
                    i += 1
            if words:
                self.program(cmd, words, env)

    def program(self, cmd: Command, w: list[str], env: dict) -> None:
        prog = w[0]
        if prog in PYTHONS and len(w) > 2 and w[1] == "-m":
            if w[2] == "pytest":
                self.pytest_paths(cmd, w[3:])
            elif not cmd.needs:
                self.problems.append(f"{cmd.where()}\n    python -m {w[2]}: not a checked form; add a marker")
        elif prog in PYTHONS and len(w) > 1 and w[1] == "-c":
            pass
        elif prog in PYTHONS and len(w) > 1:
            self.script(cmd, w[1], w[2:], env)
        elif prog in ("accelerate", "torchrun"):
            k = next((i for i, t in enumerate(w) if t.endswith(".py")), None)
            if k is None:
                self.problems.append(f"{cmd.where()}\n    {prog}: no script named")
                return
            if "--config_file" in w[:k]:
                self.need(cmd, w[w.index("--config_file") + 1], "--config_file")
            self.script(cmd, w[k], w[k + 1:], env)
        elif prog == "make":
            for t in w[1:]:
                if "=" not in t and not t.startswith("-") and t not in make_targets():
                    self.problems.append(f"{cmd.where()}\n    make {t}: no such Makefile target")
            if any(t in ("setup", "demo", "test", "bench") for t in w[1:]):
                self.wrote(cmd, ".venv")
            if "demo" in w[1:]:
                self.demo_outputs(cmd)
        elif prog in ("bash", "sh", ".") or (prog == "source" and w[1:2] != [".venv/bin/activate"]):
            f = next((t for t in w[1:] if not t.startswith("-")), None)
            if not f or not (ROOT / f).is_file():
                self.problems.append(f"{cmd.where()}\n    {prog} {f}: no such file")
            elif subprocess.run(["bash", "-n", str(ROOT / f)], capture_output=True).returncode:
                self.problems.append(f"{cmd.where()}\n    {f}: bash -n fails")
        elif prog == "source":
            self.need(cmd, ".venv", "the venv (make setup)")
        elif prog == "uvicorn":
            mod = (w[1] if len(w) > 1 else "").split(":")[0]
            if "server" not in cmd.needs:
                self.problems.append(f"{cmd.where()}\n    uvicorn runs until stopped: add '# needs server: ...'")
            if not (ROOT / f"{mod}.py").is_file() or not has_app(mod):
                self.problems.append(f"{cmd.where()}\n    uvicorn {w[1]}: {mod}.py does not define app")
            for k, v in env.items():
                if k.startswith("MODEL_") and v != EMBEDDED and is_pathlike(v):
                    self.need(cmd, v, k)
        elif prog in (".venv/bin/pytest", "pytest"):
            self.pytest_paths(cmd, w[1:])
        elif prog in ALWAYS_OK:
            pass
        elif not cmd.needs:
            self.problems.append(f"{cmd.where()}\n    {prog}: not something the check can run; add "
                                 "'# needs KIND: ...' (server, network, ...)")

    def pytest_paths(self, cmd: Command, args: list[str]) -> None:
        skip_next = False
        for t in args:
            if skip_next:
                skip_next = False
            elif t in ("-m", "-k", "-p", "-c", "--maxfail", "-n"):
                skip_next = True
            elif not t.startswith("-") and not (ROOT / t.split("::")[0]).exists():
                self.problems.append(f"{cmd.where()}\n    pytest {t}: no such test path")

    def script(self, cmd: Command, script: str, argv: list[str], env: dict) -> None:
        if script not in top_level_scripts():
            self.problems.append(f"{cmd.where()}\n    {script}: not a script of this repository")
            return
        rc, out = help_exit(script)
        if rc:
            self.problems.append(f"{cmd.where()}\n    python {script} --help exits {rc}: {out.strip()[-300:]}")
            return
        ns, err = parse_exact(script, argv)
        if ns is None:
            self.problems.append(f"{cmd.where()}\n    {script} refuses these arguments: {err}")
            return
        for attr in INPUTS:
            for v in _values(getattr(ns, attr, None)):
                self.need(cmd, v, f"--{attr}")
        for attr in MODELS:
            for v in _values(getattr(ns, attr, None)):
                self.model(cmd, v, attr)
        if script == "compare_runs.py":
            for v in ns.runs:
                self.need(cmd, v, "run")
        for attr in OUTPUTS:
            for v in _values(getattr(ns, attr, None)):
                self.wrote(cmd, v)
        model = getattr(ns, "model_dir", None)
        if script.startswith("eval_") and model and not is_pathlike(model):
            self.wrote(cmd, f"{env.get('DISTILL_SLM_RUNS', 'runs')}/base-{Path(model).name}")
        if script == "eval_kl.py" and not is_pathlike(ns.student):
            self.wrote(cmd, f"{env.get('DISTILL_SLM_RUNS', 'runs')}/base-{Path(ns.student).name}")

    def demo_outputs(self, cmd: Command) -> None:
        """What `make demo` writes: its recipe's own commands, checked like a page's (the Makefile is a page)."""
        for c in demo_recipe():
            self.check(Command("Makefile (make -n demo)", cmd.line, c.text))


def read_paths(cmd: Command) -> list[str]:
    """The paths one simple command reads: its script's input and model flags, MODEL_* variables."""
    words = shlex.split(cmd.text)
    paths = [v for w in words if (m := re.match(r"^MODEL_\w+=(.+)$", w)) and is_pathlike(v := m.group(1))]
    words = [w for w in words if not re.match(r"^[A-Za-z_]\w*=", w)]
    if words and words[0] in PYTHONS and len(words) > 1 and words[1].endswith(".py"):
        ns, err = parse_exact(words[1], words[2:])
        assert ns is not None, f"{cmd.where()}: {err}"
        for attr in INPUTS + MODELS:
            paths += [v for v in _values(getattr(ns, attr, None)) if attr in INPUTS or is_pathlike(v)]
    return paths


def _values(v) -> list[str]:
    if v is None or isinstance(v, bool):
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


@functools.cache
def demo_recipe() -> tuple:
    """The python commands `make demo` runs (setup assumed done), as Command objects."""
    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    cmds = []
    for line in out.replace("\\\n", " ").splitlines():
        words = line.split()
        if any(w.endswith(".py") for w in words[:3]) and "echo" not in words[:1]:
            cmds.append(Command("Makefile", 0, line.replace(".venv/bin/python", "python")))
    return tuple(cmds)


@functools.cache
def readme_checker() -> Checker:
    ck = Checker()
    cmds, problems = page_commands(ROOT / "README.md")
    ck.problems += problems
    for c in cmds:
        ck.check(c)
    return ck


# ----------------------------------------------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_parse_every_command_of(page):
    """Each command parses as written; unmarked ones only read what a fresh clone (+ the page so far) has."""
    if page.name == "README.md":
        ck = readme_checker()
    else:
        readme = readme_checker()
        ck = Checker(readme.produced)
        cmds, problems = page_commands(page)
        ck.problems += problems
        for c in cmds:
            ck.check(c)
    assert not ck.problems, f"{len(ck.problems)} command(s) in {page.name} would not run as written:\n" + \
        "\n".join(ck.problems)


def test_parse_the_commands_make_demo_runs_and_prints():
    """The demo's recipe reads only what the clone has; the commands it suggests at the end name paths it wrote."""
    ck = Checker()
    ck.demo_outputs(Command("Makefile", 0, "make demo"))
    printed = demo_printed_commands(subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo"], cwd=ROOT,
                                                   capture_output=True, text=True, check=True).stdout)
    assert len(printed) >= 3, f"make demo should end with the next commands to try; it prints {printed}"
    for c in printed:
        ck.check(c)
    assert not ck.problems, "\n".join(ck.problems)


def demo_printed_commands(text: str) -> list[Command]:
    """The indented commands the demo echoes at its end (`  python ...`, `  MODEL_...=... uvicorn ...`)."""
    cmds = []
    for line in text.splitlines():
        if line.startswith("echo "):
            try:
                line = " ".join(shlex.split(line)[1:])
            except ValueError:
                continue
        m = re.match(r"^\s{2,}((?:[A-Z_]+=\S+\s+)*(?:python|uvicorn|make)\s.*)$", line)
        if m:
            code, comment = split_comment(m.group(1))
            needs = {"server": "the demo's run"} if "uvicorn" in code else {}
            cmds.append(Command("make demo (printed)", 0, code, needs))
    return cmds


def test_marker_convention_is_understood(tmp_path):
    """The checker can fail: a hub id, a missing file and real data without a marker are reported; marked, not."""
    page = tmp_path / "_docs_probe.md"  # outside the repo: another worker may be listing the clone's files
    page.write_text("```bash\npython sft_train.py --student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_sft.jsonl "
                    "--save_dir runs/x\npython infer_idp.py --model_dir runs/nowhere --schema data/idp_schema.json "
                    "--document hi\npython eval_idp.py --model_dir smollm2-135m --data ../shared/data/idp/sroie.jsonl "
                    "--schema data/idp_schema.json\n"
                    "python sft_train.py --student smollm2-135m --data data/creditmix_sft.jsonl --save_dir runs/x "
                    "--no_such_flag\ncurl -s http://localhost:8000/health\n\n"
                    "# needs hub: Qwen/Qwen2.5-3B-Instruct\n"
                    "python sft_train.py --student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_sft.jsonl "
                    "--save_dir runs/y\ncurl -s http://localhost:8000/health  # needs server: a running server\n"
                    "python infer_idp.py --model_dir runs/y --schema data/idp_schema.json --document hi  "
                    "# needs hub: trained from the hub model above\n"
                    "python sft_train.py --student smollm2-135m --data data/creditmix_sft.jsonl --save_dir runs/z\n"
                    "python infer_creditmix.py --model_dir runs/z --features 'Age: 23'\n```\n", encoding="utf-8")
    try:
        cmds, problems = page_commands(page)
        ck = Checker()
        for c in cmds:
            ck.check(c)
    finally:
        page.unlink()
    assert not problems
    found = "\n".join(ck.problems)
    assert len(ck.problems) == 5, found
    for what in ("is a hub model", "runs/nowhere", "needs data", "--no_such_flag", "curl"):
        assert what in found, (what, found)


@pytest.mark.parametrize("script", top_level_scripts())
def test_help_shows_every_default(script, monkeypatch):
    """`python X.py --help` exits 0 and shows the default of every flag that has one (store_true flags aside)."""
    rc, out = help_exit(script)
    assert rc == 0, out
    parser = capture_parser(script, monkeypatch)
    missing = []
    for opt, block in option_blocks(out).items():
        dest = option_dest(opt)
        default = parser.get_default(dest) if dest else None
        if default is None or isinstance(default, bool) or default == argparse.SUPPRESS:
            continue
        shown = " ".join(str(default).split())
        if shown not in " ".join(block.split()):
            missing.append(f"{opt} (default {default!r})")
    assert not missing, f"python {script} --help hides these defaults: {', '.join(missing)}"


class ParserBuilt(Exception):
    """Raised in place of parsing: capture_parser has the script's ArgumentParser."""


def capture_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser script.parse_args builds (stopped before parsing)."""
    seen = []

    def grab(self, args=None, namespace=None):
        seen.append(self)
        raise ParserBuilt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    module = importlib.import_module(Path(script).stem)
    with pytest.raises(ParserBuilt):
        module.parse_args([])
    return seen[0]


def option_blocks(help_text: str) -> dict:
    """--flag -> its help text, from `--help` output (an option line and its indented continuation lines)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^\s{1,4}(-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith(" " * 6):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def option_dest(option: str) -> str | None:
    """The Namespace attribute a long option sets, derived as argparse does (a custom dest= is not seen: such a flag
    is skipped, never wrongly reported)."""
    if option in ("-h", "--help"):
        return None
    return option.lstrip("-").replace("-", "_")


# ----------------------------------------------------------------------------------------------------------------
# README.md for real, in a fresh copy

@pytest.mark.real_model
def test_readme_commands_run_as_two_step_variants(tmp_path):
    """make demo (2 SFT steps of one row), the commands it prints, then every unmarked README command, in order, in a
    copy of the tracked files with the venv's python first on PATH (what `source .venv/bin/activate` does)."""
    clone = tmp_path / "clone"
    for rel in sorted(tracked()):
        src = ROOT / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_SLM_RUNS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))

    def run(argv, what, extra_env=None):
        r = subprocess.run(argv, cwd=clone, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{what}\nexit {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}"
        return r.stdout

    demo = run(["make", "-o", ".venv/.installed", "demo", f"PY={sys.executable}", "DEMO_STEPS=2",
                "DEMO_TRAIN_ARGS=--per_device_train_batch_size 1", "DEMO_EVAL_ARGS=--limit 2"], "make demo")
    printed = demo_printed_commands(demo)
    assert len(printed) >= 3, demo[-2000:]
    for c in printed:   # what the demo suggests reads paths it wrote
        for path in read_paths(c):
            assert (clone / path).exists(), f"make demo suggests {c.text!r}, but {path} does not exist"
    cmds, _ = page_commands(ROOT / "README.md")
    for c in cmds:
        if c.needs:
            continue
        words = shlex.split(c.text)
        extra_env = {}
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            k, v = words.pop(0).split("=", 1)
            extra_env[k] = v
        if not words or words[0] in ("make", "source", "cd") or (words[0] in PYTHONS and words[1:2] == ["-m"]):
            continue  # make demo ran above; make test is this suite; activation is the PATH above
        if words[0] in PYTHONS and words[1].endswith(".py"):
            run([sys.executable, words[1], *words[2:], *TWO_STEP.get(words[1], [])], c.where(), extra_env)
        else:
            run(["bash", "-c", c.text], c.where(), extra_env)


def test_a_quoted_string_spanning_lines_is_one_command(tmp_path):
    """A JSON body over several lines inside '...' is one command, its marker applies to all of it."""
    page = tmp_path / "_docs_probe_quotes.md"
    page.write_text("```bash\n# needs server: a running server\ncurl -s http://localhost:8000/x -d '{\"a\": 1,\n"
                    "  \"b\": \"#2\"}'\necho done\n```\n", encoding="utf-8")
    try:
        cmds, problems = page_commands(page)
    finally:
        page.unlink()
    assert not problems
    assert [c.text.split()[0] for c in cmds] == ["curl", "echo"], cmds
    assert '"b": "#2"}\'' in cmds[0].text and cmds[0].needs == {"server": "a running server"}
