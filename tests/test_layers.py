"""The core's import directions (docs/modules.md), read from the source so a new import that
breaks a layer fails here, and a file-size bound that keeps each module to one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "libs" / "nitsum_core"
LAYERS = ("wire", "perf", "policy", "engine", "sim")
# What each layer may import from the core besides itself and the top-level shared modules
# (errors, config, logs, workload). Torch is allowed in the engine only.
ALLOWED = {
    "wire": set(),
    "perf": set(),
    "policy": {"wire", "perf"},
    "engine": {"wire", "perf", "policy"},
    "sim": {"perf", "policy", "wire"},
}
SHARED = {"errors", "config", "logs", "workload"}
OUTSIDE = ("nitsum_cli", "nitsum_router", "nitsum_tp_controller", "nitsum_kv_broker", "nitsum_gpu_worker")


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (function-local imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _core_part(name: str) -> str | None:
    """The layer (or top-level shared module) a ``nitsum_core...`` import names."""
    parts = name.split(".")
    if parts[0] != "nitsum_core" or len(parts) < 2:
        return None
    return parts[1]


def _layer_files(layer: str) -> list[Path]:
    return sorted((CORE / layer).glob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    wrong = []
    for path in _layer_files(layer):
        for name in _imports(path):
            part = _core_part(name)
            if part is not None and part not in (layer, *ALLOWED[layer], *SHARED, "__version__"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.split(".")[0] == "torch" and layer != "engine":
                wrong.append(f"{path.relative_to(ROOT)} imports torch")
    assert not wrong, "\n".join(wrong)


def test_the_shared_top_level_modules_import_no_layer_but_wire() -> None:
    wrong = []
    for path in sorted(CORE.glob("*.py")):
        for name in _imports(path):
            part = _core_part(name)
            if part in LAYERS and part != "wire":
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_nothing_in_core_imports_a_service_or_the_cli() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(CORE.rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[0] in OUTSIDE
    ]
    assert not wrong, "\n".join(wrong)


def test_no_source_file_is_over_500_lines() -> None:
    roots = [ROOT / d for d in ("libs", "services", "loadgen", "tests", "benchmarks")]
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 500
    ]
    assert not long, "\n".join(long)


def test_production_code_reads_no_test_hooks() -> None:
    roots = [ROOT / d for d in ("libs", "services", "loadgen")]
    hooked = [
        str(path.relative_to(ROOT))
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if "NITSUM_TEST_" in path.read_text()
    ]
    assert not hooked, f"test hooks in production code: {hooked}"
