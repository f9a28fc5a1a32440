"""The source files a stage's result depends on, derived from its imports (not listed by hand).

A stage's output is a function of its config, its inputs and the code that computes it. That code
is every repository module the stage's module imports, directly or through other modules, at the
top or inside a function (a lazy import runs when the stage does), plus the parent packages'
``__init__.py`` files (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``), plus
the non-Python sources a module compiles or reads at run time (:data:`DATA_FILES`). The closure
is found statically with :mod:`ast`, so it covers branches not taken on this machine (e.g. the
CUDA path) and costs no imports.

Both consumers take it from here: the stage fingerprint that skips unchanged stages
(:mod:`tasks.runner`) and the ``deps`` of each stage in ``dvc.yaml`` (:mod:`tasks.stages`).
Editing any file in the closure reruns the stage under either.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsify", "tasks", "flows")  # the repository's own top-level packages


def _kernel_sources() -> tuple[str, ...]:
    from sparsify.inference.kernels.loader import HEADERS, SOURCES  # the files the JIT build compiles

    return tuple(f"sparsify/inference/kernels/{name}" for name in (*SOURCES, *HEADERS))


# Files that a module reads or compiles at run time, which an import graph cannot see.
DATA_FILES = {"sparsify.inference.kernels.loader": _kernel_sources}


def module_file(module: str) -> Path | None:
    """The repository file of a dotted module name (a package's ``__init__.py``), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Dotted names of the repository modules that ``tree`` (the source of ``module``) imports."""
    package = module if module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import name`: name may be a submodule (then importing it runs its file too)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if module_file(m) is not None}


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """Every repository module that importing and running ``module`` may execute, sorted."""
    if module_file(module) is None:
        raise ValueError(f"{module!r} is not a module of this repository ({', '.join(PACKAGES)})")
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for m in _with_parents(name):
            if m in seen or module_file(m) is None:
                continue
            seen.add(m)
            path = module_file(m)
            todo.extend(_imported(m, ast.parse(path.read_text(), filename=str(path))))
    return tuple(sorted(seen))


@cache
def code_files(module: str) -> tuple[str, ...]:
    """The files (relative to the repository, sorted) of :func:`module_closure` plus their :data:`DATA_FILES`."""
    files = set()
    for m in module_closure(module):
        files.add(module_file(m).relative_to(REPO).as_posix())
        if m in DATA_FILES:
            files.update(DATA_FILES[m]())
    return tuple(sorted(files))
