"""The layout's rules, read from the source with ``ast`` (nothing here imports the modules it checks).

* ``cluster/`` is pure: no module in it imports ray, vllm or torch (at the top, inside a
  function, inside a ``try``, or by ``importlib.import_module``/``__import__`` with a constant
  name), except the adapter modules in ``ADAPTERS``, each for the one package it names; and no
  module in it imports ``deployments`` (which would bring Ray in behind the rule's back).
* ``deployments/`` never imports a command-line module (``cluster/cli/``, a ``__main__.py``), directly
  or through the ``cluster`` modules it imports.
* No function in ``cluster/`` or ``deployments/`` is longer than ``MAX_FUNCTION_LINES``, except
  those in ``LONG_FUNCTIONS``: a list that may only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "vllm", "torch")

# Modules of cluster/ that may import one of FORBIDDEN: path -> (the packages, why).
ADAPTERS: dict[str, tuple[frozenset[str], str]] = {
    "cluster/fixtures/tinymodel.py": (frozenset({"torch"}), "writes the tiny test fixtures: random fp16 weights, AWQ/GPTQ "
                             "packing and safetensors files are torch tensors (lazy imports; `make setup` runs it)"),
    "cluster/vllm_args.py": (frozenset({"vllm"}), "the names of vLLM's EngineArgs, which config.py checks "
                             "engine_kwargs against where vLLM is installed"),
}

MAX_FUNCTION_LINES = 60
# Functions allowed over MAX_FUNCTION_LINES, with their length (def line to last line) when listed.
# None is left; the list may only shrink, so a long function is split into named helpers instead.
LONG_FUNCTIONS: dict[str, int] = {}


def _py_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str = "", is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in ``tree``.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a module); relative imports are
    resolved against ``module``; ``importlib.import_module("x")`` and ``__import__("x")`` count
    when the name is a string constant.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if base:
                yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}" if base else alias.name
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value


def _package_of(name: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


def forbidden_imports(path: Path) -> list[str]:
    """``file:line imports X`` for each import of a FORBIDDEN package its adapter entry does not allow."""
    allowed = ADAPTERS.get(_rel(path), (frozenset(), ""))[0]
    return [
        f"{_rel(path)}:{line} imports {name}"
        for line, name in imported_modules(_tree(path))
        if (pkg := _package_of(name, FORBIDDEN)) and pkg not in allowed
    ]


def test_cluster_does_not_import_ray_vllm_or_torch():
    found = [hit for path in _py_files("cluster") for hit in forbidden_imports(path)]
    assert not found, (
        "cluster/ is pure Python; move this code to deployments/ or an adapter module "
        "(ADAPTERS in tests/unit/test_purity.py, with a reason):\n  " + "\n  ".join(found)
    )


def test_adapters_exist_and_use_what_they_are_allowed():
    for rel, (packages, _reason) in ADAPTERS.items():
        path = ROOT / rel
        assert path.is_file(), f"ADAPTERS names {rel}, which is gone: delete its entry"
        used = {_package_of(name, FORBIDDEN) for _, name in imported_modules(_tree(path))}
        assert packages <= used, f"{rel} no longer imports {sorted(packages - used)}: shrink its ADAPTERS entry"


def test_cluster_does_not_import_deployments():
    found = [
        f"{_rel(path)}:{line} imports {name}"
        for path in _py_files("cluster")
        for line, name in imported_modules(_tree(path), _module_name(path), path.name == "__init__.py")
        if _package_of(name, ("deployments",))
    ]
    assert not found, "cluster/ must not import the Ray Serve glue:\n  " + "\n  ".join(found)


def _internal_modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in ("cluster", "deployments") for p in _py_files(folder)}


def _internal_imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, module) for each kvpilot module importing ``name`` runs, parent packages included."""
    for line, imported in imported_modules(_tree(path), name, path.name == "__init__.py"):
        parts = imported.split(".")
        for i in range(1, len(parts) + 1):
            if (prefix := ".".join(parts[:i])) in modules and prefix != name:
                yield line, prefix


def _cli_modules(modules: dict[str, Path]) -> set[str]:
    cli_package = ROOT / "cluster" / "cli"
    return {name for name, path in modules.items() if path.name == "__main__.py" or path.parent == cli_package}


def _import_chain(start: str, target: str, via: dict[str, tuple[str, int]], modules: dict[str, Path]) -> str:
    steps = []
    while target != start:
        importer, line = via[target]
        steps.append(f"{_rel(modules[importer])}:{line} imports {target}")
        target = importer
    return " → ".join(reversed(steps))


def test_deployments_do_not_import_a_cli_module():
    modules = _internal_modules()
    cli = _cli_modules(modules)
    assert {"cluster.cli.kvpilot", "cluster.cli.simulate", "cluster.cli.bench"} <= cli
    found = set()
    for start in sorted(m for m in modules if m.split(".")[0] == "deployments"):
        via: dict[str, tuple[str, int]] = {start: (start, 0)}  # module -> (its importer, the line), breadth first
        todo = [start]
        while todo:
            name = todo.pop(0)
            for line, imported in _internal_imports(name, modules[name], modules):
                if imported not in via:
                    via[imported] = (name, line)
                    if imported in cli:
                        found.add(_import_chain(start, imported, via, modules))
                    else:
                        todo.append(imported)
    assert not found, ("deployments/ must not import the command line; move what it needs to a "
                       "non-CLI module:\n  " + "\n  ".join(sorted(found)))


def function_lengths(path: Path) -> Iterator[tuple[str, int, int]]:
    """(qualified name, line, length from ``def`` to its last line) of every function in ``path``."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child.lineno, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(_tree(path), "")


def test_no_function_is_longer_than_the_limit():
    lengths = {
        f"{_rel(path)}::{name}": (line, n)
        for folder in ("cluster", "deployments")
        for path in _py_files(folder)
        for name, line, n in function_lengths(path)
    }
    too_long = [f"{key.split('::')[0]}:{line} {key.split('::')[1]} is {n} lines"
                for key, (line, n) in lengths.items() if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS]
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines; split them into named helpers:\n  "
                          + "\n  ".join(too_long))
    for key, listed in LONG_FUNCTIONS.items():
        assert key in lengths, f"LONG_FUNCTIONS names {key}, which is gone: delete its entry"
        n = lengths[key][1]
        assert n > MAX_FUNCTION_LINES, f"{key} is {n} lines now: delete its LONG_FUNCTIONS entry"
        assert n <= listed, f"{key} grew from {listed} to {n} lines; split it instead (LONG_FUNCTIONS only shrinks)"


# The scanners themselves, on source that breaks each rule.

_BAD = '''
import os, ray
import torch.nn as nn
from vllm.engine import arg_utils
from ray import serve
import importlib

def f():
    import vllm
    try:
        from torch import Tensor
    except ImportError:
        pass
    importlib.import_module("ray.serve")
    __import__("torch")

import rayon, torchvision_like
from safetensors.torch import save_file
from . import torch
'''


def test_scanner_finds_every_form_of_import():
    hits = [(line, name) for line, name in imported_modules(ast.parse(_BAD), "cluster.x")
            if _package_of(name, FORBIDDEN)]
    assert sorted({line for line, _ in hits}) == [2, 3, 4, 5, 9, 11, 14, 15]
    assert ("cluster.torch" in {name for _, name in imported_modules(ast.parse(_BAD), "cluster.x")})


@pytest.mark.parametrize(("text", "length"), [("def f():\n    pass\n", 2), ("class C:\n    def m(self):\n\n        return 1\n", 3)])
def test_function_lengths_count_def_to_last_line(tmp_path, text, length):
    path = tmp_path / "m.py"
    path.write_text(text)
    assert [n for _, _, n in function_lengths(path)] == [length]
