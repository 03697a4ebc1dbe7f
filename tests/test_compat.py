"""compat.py: every private library name the project relies on still exists in the installed versions. A failure
names the library and its version: that is where an upgrade has to start."""
import importlib
import inspect
import re
from importlib.metadata import version

import pytest

import compat


def _present(dotted: str) -> bool:
    """A module attribute, a class attribute, or an instance attribute that the class's source assigns."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            obj = getattr(obj, name)
        last = parts[-1]
        if hasattr(obj, last):
            return True
        if inspect.isclass(obj):  # set in __init__ or the training loop, not on the class
            assigned = re.compile(rf"self\.{last}\s*(:[^=\n]*)?=")  # also an annotated assignment
            return any(assigned.search(inspect.getsource(c)) for c in obj.__mro__ if c.__module__ != "builtins")
        return False
    return False


@pytest.mark.parametrize("dotted,lib", sorted(compat.PRIVATE.items()))
def test_private_name_still_exists(dotted, lib):
    assert _present(dotted), f"{lib} {version(lib)} no longer has {dotted}: see compat.py for what it stands in for"


def test_the_check_can_fail():
    assert not _present("trl.trainer.utils._no_such_name")
    assert not _present("transformers.Trainer._no_such_attribute")


def test_no_private_library_names_outside_compat():
    """The project's modules reach private names of TRL / transformers / PEFT only through compat.py."""
    import re
    from pathlib import Path
    root = Path(compat.__file__).parent
    pattern = re.compile(r"from (trl|transformers|peft)[\w.]* import [^\n]*\b_[a-z]|\b(trl|transformers)\.[\w.]*\._[a-z]")
    offenders = [f"{p.name}:{i}" for p in sorted(root.glob("*.py")) if p.name != "compat.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
