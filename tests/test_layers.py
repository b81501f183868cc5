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
OUTSIDE = (
    "nitsum_cli",
    "nitsum_router",
    "nitsum_tp_controller",
    "nitsum_kv_broker",
    "nitsum_gpu_worker",
    "nitsum_loadgen",
)


def _package(path: Path) -> list[str]:
    """The dotted package ``path`` is in (``nitsum_core.policy`` for a file in policy/)."""
    return ["nitsum_core", *path.parent.relative_to(CORE).parts]


def _imports(path: Path, package: list[str] | None = None) -> set[str]:
    """Every module name ``path`` imports, at any depth (function-local imports included),
    relative imports resolved and ``importlib.import_module("...")`` / ``__import__("...")`` of a
    literal name counted too. ``package``: the file's package, if not where it stands."""
    package = package or _package(path)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            names.add(node.args[0].value)
    return names


def _core_part(name: str) -> str | None:
    """The layer (or top-level shared module) a ``nitsum_core...`` import names."""
    parts = name.split(".")
    if parts[0] != "nitsum_core" or len(parts) < 2:
        return None
    return parts[1]


def _layer_files(layer: str) -> list[Path]:
    return sorted((CORE / layer).rglob("*.py"))


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


def test_the_shared_top_level_modules_import_no_layer_but_wire_and_no_torch() -> None:
    wrong = []
    for path in sorted(CORE.glob("*.py")):
        for name in _imports(path):
            part = _core_part(name)
            if part in LAYERS and part != "wire":
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.split(".")[0] == "torch":
                wrong.append(f"{path.relative_to(ROOT)} imports torch")
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


def test_the_import_reader_sees_relative_and_dynamic_imports(tmp_path: Path) -> None:
    # The rules above are only as good as this reader: a file in policy/ written three ways.
    sample_text = (
        "from ..engine import model\n"
        "from . import plan\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('nitsum_core.sim.simulator')\n"
        "    __import__('torch')\n"
    )
    probe = tmp_path / "policy" / "_layer_probe.py"
    probe.parent.mkdir()
    probe.write_text(sample_text)
    names = _imports(probe, package=["nitsum_core", "policy"])
    assert {"nitsum_core.engine", "nitsum_core.policy", "nitsum_core.sim.simulator", "torch"} <= names
