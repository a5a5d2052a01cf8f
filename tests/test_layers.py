"""The layers of the package: the artifact store below the pipeline, both below the run loop.

`metadiff.run` (the run loop) may be imported only by entry points, which hand its `train` to the pipeline as the
stage runner; a module that imports it would tie itself to the whole run loop (and once made the store and the run
loop import each other). Read from the source with `ast`, so imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "metadiff"
RUN_LOOP = "metadiff.run"
# Entry points: the run loop itself and `python -m metadiff.bench` (passes `train` to the sampling benchmark).
MAY_IMPORT_RUN = {"metadiff.run", "metadiff.bench.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module that the source of module `name` imports (absolute names; `from a import b` counts as `a` and
    `a.b`)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .run import train`, `from .. import run`
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def imports_of_file(path: Path) -> set[str]:
    return imported_modules(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_of(module: str) -> set[str]:
    return imports_of_file(next(p for p in SRC.rglob("*.py") if module_name(p) == module))


def _is(imported: str, module: str) -> bool:
    return imported == module or imported.startswith(module + ".")


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_only_entry_points_import_the_run_loop(path: Path) -> None:
    if module_name(path) in MAY_IMPORT_RUN:
        return
    assert not any(_is(m, RUN_LOOP) for m in imports_of_file(path)), (
        f"{module_name(path)} imports {RUN_LOOP}: take the stage runner as a parameter (see metadiff.pipeline)")


def test_the_store_sits_below_the_pipeline_and_the_run_loop() -> None:
    assert not {m for m in imports_of("metadiff.store") if _is(m, "metadiff.pipeline") or _is(m, RUN_LOOP)}


@pytest.mark.parametrize(("source", "module"), [
    ("import metadiff.run", "metadiff.stages.x"),
    ("from metadiff.run import train", "metadiff.stages.x"),
    ("from metadiff import run", "metadiff.stages.x"),
    ("def f():\n    from metadiff.run import train", "metadiff.stages.x"),
    ("from ..run import train", "metadiff.stages.x"),
    ("from .. import run", "metadiff.stages.x"),
    ("from . import run", "metadiff.x"),
])
def test_the_check_sees_every_form_of_import(source: str, module: str) -> None:
    # the tests above would pass vacuously if the parser missed a form of import
    assert any(_is(m, RUN_LOOP) for m in imported_modules(source, module)), source
