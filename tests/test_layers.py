"""The layers of the package, as the README's Architecture section states them: a module imports only from layers
below its own (or from its own package), and one stage takes from another only its artifact readers (`load_*`).

`metadiff.run` (the run loop) may be imported only by entry points, which hand its `train` to the pipeline as the
stage runner; a module that imports it would tie itself to the whole run loop (and once made the store and the run
loop import each other). Read from the source with `ast`, so imports inside functions count too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "metadiff"
RUN_LOOP = "metadiff.run"
# Entry points: the run loop itself and `python -m metadiff.bench` (passes `train` to the sampling benchmark).
MAY_IMPORT_RUN = {"metadiff.run", "metadiff.bench.__main__", "metadiff.bench.gpu_check.__main__"}


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
        f"{module_name(path)} imports {RUN_LOOP}: take the stage runner as a parameter (see metadiff.pipeline)"
    )


def test_the_store_sits_below_the_pipeline_and_the_run_loop() -> None:
    assert not {m for m in imports_of("metadiff.store") if _is(m, "metadiff.pipeline") or _is(m, RUN_LOOP)}


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import metadiff.run", "metadiff.stages.x"),
        ("from metadiff.run import train", "metadiff.stages.x"),
        ("from metadiff import run", "metadiff.stages.x"),
        ("def f():\n    from metadiff.run import train", "metadiff.stages.x"),
        ("from ..run import train", "metadiff.stages.x"),
        ("from .. import run", "metadiff.stages.x"),
        ("from . import run", "metadiff.x"),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, module: str) -> None:
    # the tests above would pass vacuously if the parser missed a form of import
    assert any(_is(m, RUN_LOOP) for m in imported_modules(source, module)), source


def stated_layers() -> dict[str, int]:
    """package -> layer (1 = lowest), read from the numbered list under "Layers" in the README's Architecture
    section, so the picture a reader sees is the one this test enforces."""
    text = (ROOT / "README.md").read_text().split("## Architecture", 1)[1]
    block = text.split("Layers, lowest first", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.strip().splitlines():
        number, _, names = line.strip().partition(".")
        for name in names.split():
            layers[name] = int(number)
    return layers


def package_of(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_stated_layer() -> None:
    layers = stated_layers()
    packages = {package_of(module_name(p)) for p in MODULES if module_name(p) != "metadiff"}
    assert packages - set(layers) == set(), f"packages missing from the README's layer list: {packages - set(layers)}"
    assert set(layers) - packages == set(), f"layers naming no package: {set(layers) - packages}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_go_only_downward(path: Path) -> None:
    layers, name = stated_layers(), module_name(path)
    if name == "metadiff":
        return
    own = package_of(name)
    upward = sorted(
        m
        for m in imports_of_file(path)
        if m.startswith("metadiff.")
        and package_of(m) != own
        and package_of(m) in layers
        and layers[package_of(m)] >= layers[own]
    )
    assert not upward, f"{name} (layer {layers[own]}) imports from its layer or above: {upward}"


STAGE_IMPORT = re.compile(r"^metadiff\.stages\.(?!base\.)(\w+)\.(\w+)$")


@pytest.mark.parametrize("path", sorted((SRC / "stages").glob("*.py")), ids=module_name)
def test_a_stage_takes_only_artifact_readers_from_another_stage(path: Path) -> None:
    own = module_name(path).rpartition(".")[2]
    taken = [m for m in imports_of_file(path) if (hit := STAGE_IMPORT.match(m)) and hit[1] != own]
    helpers = [m for m in taken if not m.rpartition(".")[2].startswith("load_")]
    assert not helpers, f"{module_name(path)} imports another stage's helpers {helpers}: move them down a layer"


@pytest.mark.parametrize(
    ("source", "upward"),
    [("from metadiff.stages.dfml import load_meta_model", False), ("from metadiff.stages.dfml import save_grid", True)],
)
def test_the_stage_rule_tells_readers_from_helpers(source: str, upward: bool) -> None:
    taken = [m for m in imported_modules(source, "metadiff.stages.diffusionmix") if STAGE_IMPORT.match(m)]
    assert any(not m.rpartition(".")[2].startswith("load_") for m in taken) is upward
