"""House rules a reader of the code relies on, checked over every Python file of the project: each class is
defined at module level (importable, found where its module is read, built once), no function outside the
server runs past 120 lines (the server's create_app keeps its routes as closures over the app's state), and no
script imports another script (what two scripts share lives in a module)."""
import ast
from pathlib import Path

from conftest import ROOT

MAX_FUNCTION_LINES = 120
SERVER = {"serve_creditmix.py", "serving.py"}


def project_files() -> list[Path]:
    return sorted(p for folder in ("", "tests", "docs", "gpu", "dev") for p in (ROOT / folder).glob("*.py"))


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def classes_inside_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{c.lineno} class {c.name} inside {f.name}()"
            for f in functions(tree) for c in ast.walk(f) if isinstance(c, ast.ClassDef)]


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{f.lineno} {f.name}() is {f.end_lineno - f.lineno + 1} lines"
            for f in functions(tree) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]


def is_script(path: Path) -> bool:
    return "if __name__ == \"__main__\":" in path.read_text(encoding="utf-8")


def imported_scripts(path: Path, scripts: set[str]) -> list[str]:
    """The top-level scripts `path` imports (anywhere in it, inside functions too)."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names.add(n.module.split(".")[0])
    return sorted(names & (scripts - {path.stem}))


def test_the_checks_see_what_they_look_for(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f():\n    class A:\n        pass\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert classes_inside_functions(p, tmp_path) == ["x.py:2 class A inside f()"]
    assert long_functions(p, tmp_path) == [f"x.py:1 f() is {MAX_FUNCTION_LINES + 3} lines"]
    p.write_text("class A:\n    def f(self):\n        pass\n")
    assert classes_inside_functions(p, tmp_path) == [] and long_functions(p, tmp_path) == []
    p.write_text("def main():\n    from sft_train import read_rows\n    import json, dpo_train.x\n")
    assert imported_scripts(p, {"sft_train", "dpo_train", "x"}) == ["dpo_train", "sft_train"]


def test_no_class_is_defined_inside_a_function():
    found = [line for p in project_files() for line in classes_inside_functions(p)]
    assert not found, "define these at module level:\n" + "\n".join(found)


def test_no_function_outside_the_server_is_longer_than_120_lines():
    found = [line for p in project_files() if p.name not in SERVER for line in long_functions(p)]
    assert not found, "split these into named steps:\n" + "\n".join(found)


def test_no_script_imports_a_script():
    top = sorted(ROOT.glob("*.py"))
    scripts = {p.stem for p in top if is_script(p)}
    assert {"sft_train", "bench", "serve_creditmix"} <= scripts
    found = [f"{p.name} imports {', '.join(m)}" for p in top for m in [imported_scripts(p, scripts)] if m]
    assert not found, "move what they share into a module:\n" + "\n".join(found)
