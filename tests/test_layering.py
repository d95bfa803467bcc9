"""Import layering: every module of lit_fewstep imports only from its own floor or the floors below.

Floors (the rule as written in `lit_fewstep/__init__.py`):

    0  lit_fewstep (the package's __init__), utils, conditioning
    1  diffusion, nets, data, metrics, teachers (external teacher networks: diffusers; they build nets, not methods)
    2  methods (incl. methods.sampling: load a checkpoint for sampling, draw)
    3  evaluation, callbacks
    4  cli, __main__

Every import counts, at module level and inside functions (a lazy import is still a dependency: it only hides
the circle until the function runs), and so does `importlib.import_module("lit_fewstep...")` with a literal name.
Not counted: code under `if __name__ == "__main__":` (a script entry point; `python -m lit_fewstep.data.pairs`
forwards to the CLI there) and the one lazy alias `lit_fewstep.metrics.__getattr__` -> `lit_fewstep.callbacks`
(configs name the callbacks `lit_fewstep.metrics.<Name>`).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "lit_fewstep"
FLOORS = {
    "lit_fewstep": 0, "utils": 0, "conditioning": 0,
    "diffusion": 1, "nets": 1, "data": 1, "metrics": 1, "teachers": 1,
    "methods": 2,
    "evaluation": 3, "callbacks": 3,
    "cli": 4, "__main__": 4,
}
ENTRY_POINTS = {"lit_fewstep.cli", "lit_fewstep.__main__"}
# (importer, imported, the function it may appear in): lazy aliases, each with its reason in the module docstring.
ALIASES = {("lit_fewstep.metrics", "lit_fewstep.callbacks", "__getattr__")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    function: str | None  # the innermost enclosing function, None at module level

    def __str__(self) -> str:
        where = "module level" if self.function is None else f"in {self.function}()"
        return f"{self.importer}:{self.line} ({where}) imports {self.imported}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1] if len(parts) > 1 else parts[0])


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def imports_of(source: str, name: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every lit_fewstep module that the code of module `name` imports (relative imports resolved)."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.AST, function: str | None) -> None:
        if target == "lit_fewstep" or target.startswith("lit_fewstep."):
            found.append(Import(name, target, node.lineno, function))

    def visit(node: ast.AST, function: str | None) -> None:
        if _is_main_guard(node):
            for child in node.orelse:  # only the `if` branch is the script's
                visit(child, function)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            targets = []  # `from lit_fewstep import cli` imports the module lit_fewstep.cli
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                target = submodule if submodule in known else source_module
                if target not in targets:
                    targets.append(target)
            for target in targets:
                add(target, node, function)
        elif isinstance(node, ast.Call):
            func = node.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (callee in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                add(node.args[0].value, node, function)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name if function is None else f"{function}.{node.name}"
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), None)
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    known = set(modules)
    return [imp for name, path in modules.items()
            for imp in imports_of(path.read_text(), name, path.name == "__init__.py", known)]


def violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if (imp.importer, imp.imported, imp.function) in ALIASES:
            continue
        low, high = floor(imp.importer), floor(imp.imported)
        if low is None or high is None:
            continue  # test_every_module_has_a_floor reports it
        if high > low:
            bad.append(f"{imp} (floor {low} imports floor {high})")
    return bad


# ------------------------------------------------------------------------------------------------ the rule
def test_every_module_has_a_floor():
    missing = [name for name in all_modules() if floor(name) is None]
    assert not missing, f"modules outside the layer rule (give them a floor in FLOORS and lit_fewstep/__init__.py): {missing}"


def test_no_module_imports_a_floor_above_its_own():
    bad = violations(all_imports())
    assert not bad, "imports against the layer rule (lit_fewstep/__init__.py):\n" + "\n".join(bad)


def test_nothing_below_the_methods_imports_methods_evaluation_or_cli():
    above = ("lit_fewstep.methods", "lit_fewstep.evaluation", "lit_fewstep.callbacks", "lit_fewstep.cli")
    bad = [str(imp) for imp in all_imports() if floor(imp.importer) is not None and floor(imp.importer) < 2
           and imp.imported.startswith(above) and (imp.importer, imp.imported, imp.function) not in ALIASES]
    assert not bad, "\n".join(bad)


def test_only_the_entry_points_import_the_cli():
    bad = [str(imp) for imp in all_imports()
           if imp.imported.startswith("lit_fewstep.cli") and imp.importer not in ENTRY_POINTS]
    assert not bad, "\n".join(bad)


def test_methods_import_neither_evaluation_nor_cli():
    bad = [str(imp) for imp in all_imports() if imp.importer.startswith("lit_fewstep.methods")
           and imp.imported.startswith(("lit_fewstep.evaluation", "lit_fewstep.callbacks", "lit_fewstep.cli"))]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_literal_imports():
    """The analysis itself: what the parent commit had (a metrics module importing the CLI inside a function,
    data importing methods) is found; the __main__ guard and the metrics alias are not."""
    known = {"lit_fewstep.cli", "lit_fewstep.methods", "lit_fewstep.methods.base", "lit_fewstep.callbacks",
             "lit_fewstep.metrics", "lit_fewstep.metrics.callbacks", "lit_fewstep.data.pairs"}
    source = (
        "import importlib\n"
        "def compute():\n"
        "    from ..cli import _load, draw\n"
        "def load():\n"
        "    from ..methods.base import load_teacher\n"
        "    importlib.import_module('lit_fewstep.evaluation')\n"
        "from lit_fewstep import cli\n"
        "if __name__ == '__main__':\n"
        "    from lit_fewstep.cli import pairs_main\n"
    )
    found = imports_of(source, "lit_fewstep.metrics.callbacks", False, known)
    assert [(i.imported, i.function) for i in found] == [
        ("lit_fewstep.cli", "compute"), ("lit_fewstep.methods.base", "load"), ("lit_fewstep.evaluation", "load"),
        ("lit_fewstep.cli", None)]
    assert len(violations(found)) == 4
    alias = "def __getattr__(name):\n    from lit_fewstep import callbacks\n"
    assert violations(imports_of(alias, "lit_fewstep.metrics", True, known)) == []
    assert violations(imports_of(alias, "lit_fewstep.data", True, known)) != []  # an alias only where declared


# ------------------------------------------------------------------------------------------------ at run time
def _python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *(("-c", code) if code else ()), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_lower_floors_load_no_method_and_the_callback_aliases_resolve():
    code = """
import sys
import lit_fewstep.utils.checkpoint, lit_fewstep.diffusion, lit_fewstep.nets, lit_fewstep.data, lit_fewstep.data.pairs
import lit_fewstep.metrics
upper = sorted(m for m in sys.modules if m.startswith(("lit_fewstep.methods", "lit_fewstep.evaluation",
                                                     "lit_fewstep.callbacks", "lit_fewstep.cli")))
assert not upper, upper
import lit_fewstep.callbacks
from lit_fewstep.utils.config import resolve_class
from lightning.pytorch import Callback
for name in ("SampleGridCallback", "NFESweepCallback", "ThroughputCallback"):
    cls = getattr(lit_fewstep.callbacks, name)
    assert getattr(lit_fewstep.metrics, name) is cls
    assert resolve_class("lit_fewstep.metrics." + name, Callback) is cls
    assert name in dir(lit_fewstep.metrics)
print("ok")
"""
    result = _python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("command", [["-m", "lit_fewstep.data.pairs"], ["-m", "lit_fewstep", "pairs"]])
def test_pairs_command_from_both_entry_points(tmp_path, command):
    out = tmp_path / "pairs.pt"
    result = _python("", *command, "--teacher", str(PACKAGE / "assets" / "edm_tree.pt"), "--num", "4", "--nfe", "3",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 4 pairs" in result.stdout and out.is_file()
