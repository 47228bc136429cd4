"""`make test-fast` (pytest -m "not slow") still tests every module of lcd.

A module counts as tested by the fast suite when a test not marked ``slow`` uses a name defined in it (a class,
function or constant imported from it, or the module itself), directly or through a fixture, a helper function
or a module-level constant of its test file. Modules that define no function or class (re-export lists such as
``lcd/tasks/__init__.py``, ``lcd/__main__.py``) are left out.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"


def lcd_modules() -> dict[str, Path]:
    """Dotted name -> file of every module under src/lcd."""
    modules = {}
    for path in sorted((SRC / "lcd").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def defines_code(path: Path) -> bool:
    return any(isinstance(node, ast.FunctionDef | ast.ClassDef) for node in ast.parse(path.read_text()).body)


def is_slow(node: ast.AST) -> bool:
    """A ``pytest.mark.slow`` mark (decorator or ``pytestmark``)."""
    return any(isinstance(n, ast.Attribute) and n.attr == "slow" for n in ast.walk(node))


class SourceFile:
    """The names each part of one test file uses, and where its imported names come from."""

    def __init__(self, path: Path, modules: dict[str, Path]) -> None:
        self.tree = ast.parse(path.read_text())
        self.modules = modules
        self.origin: dict[str, set[str]] = {}  # local name -> lcd modules it stands for
        self.defs: dict[str, ast.AST] = {}  # module-level functions, classes and assignments by name
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                for local, module in self.imports(node):
                    self.origin.setdefault(local, set()).add(module)
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                self.defs[node.name] = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.defs[name.id] = node

    def imports(self, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
        """(local name, lcd module) of each lcd name an import statement binds: the module that defines it,
        and for a class also those of its lcd base classes (whose methods it runs)."""
        found = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lcd":
                    found.append((alias.asname or alias.name.split(".")[0], alias.name))
            return found
        if node.module is None or node.module.split(".")[0] != "lcd":
            return found
        for alias in node.names:
            local, dotted = alias.asname or alias.name, f"{node.module}.{alias.name}"
            if dotted in self.modules:
                found.append((local, dotted))
                continue
            obj = getattr(importlib.import_module(node.module), alias.name)
            owners = [getattr(obj, "__module__", None)] + [c.__module__ for c in getattr(obj, "__mro__", ())]
            found += [(local, owner) for owner in owners if owner in self.modules] or [(local, node.module)]
        return found

    def used(self, node: ast.AST, fixtures: dict[str, ast.FunctionDef], seen: set[int] | None = None) -> set[str]:
        """Every name ``node`` uses, following the file's own helpers, constants and fixtures."""
        seen = set() if seen is None else seen
        if id(node) in seen:
            return set()
        seen.add(id(node))
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom | ast.Import):  # an import inside a test uses what it imports
                names |= {local for local, _ in self.imports(n)}
        if isinstance(node, ast.FunctionDef):
            names |= {arg.arg for arg in node.args.args}
        for name in list(names):
            for target in (self.defs.get(name), fixtures.get(name)):
                if target is not None and target is not node:
                    names |= self.used(target, fixtures, seen)
        return names

    def fast_tests(self) -> list[ast.FunctionDef]:
        marked = any(
            isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
            and is_slow(n)
            for n in self.tree.body
        )  # fmt: skip
        if marked:
            return []
        return [
            n
            for n in self.tree.body
            if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test_")
            and not any(is_slow(d) for d in n.decorator_list)
        ]


def fixtures_of(file: SourceFile) -> dict[str, ast.FunctionDef]:
    return {
        n.name: n
        for n in file.tree.body
        if isinstance(n, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in n.decorator_list)
    }


def modules_reached_by_fast_tests() -> dict[str, set[str]]:
    """lcd module -> the fast tests that use it."""
    modules = lcd_modules()
    conftest = SourceFile(ROOT / "tests" / "conftest.py", modules)
    reached: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        file = SourceFile(path, modules)
        fixtures = {**fixtures_of(conftest), **fixtures_of(file)}
        for test in file.fast_tests():
            for name in file.used(test, fixtures):
                for module in file.origin.get(name, set()) | conftest.origin.get(name, set()):
                    reached.setdefault(module, set()).add(f"{path.name}::{test.name}")
    return reached


def test_the_check_sees_fast_tests_and_skips_slow_ones():
    reached = modules_reached_by_fast_tests()
    assert "test_layers.py::test_select_layers_takes_every_form_of_the_one_vocabulary" in reached["lcd.layers"]
    # test_decodability's Gemma test (slow) and test_hf_models' hub tests (fast) both use lcd.models.hf
    assert not any("gemma3_270m" in test for tests in reached.values() for test in tests)
    assert "test_hf_models.py::test_bad_names_fail_before_loading" in reached["lcd.models.hf"]
    assert not any(test.startswith("test_ddp.py") for tests in reached.values() for test in tests)  # pytestmark


def test_every_module_has_a_fast_test():
    reached = modules_reached_by_fast_tests()
    with_code = [name for name, path in lcd_modules().items() if defines_code(path)]
    assert len(with_code) > 30
    missing = [name for name in with_code if name not in reached]
    assert not missing, f"no fast test (one not marked slow) uses these modules: {missing}"
