"""The published goodput study says what its results JSON says (docs/results).

Sweeps are re-run for some presets at a time (`nitsum sim --update`) and the markdown copied into
docs/results/README.md by hand, so the README's per-model tables once kept stale numbers through
several re-runs unnoticed. These tests tie each published table to the JSON it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nitsum_cli.sim import goodput_row

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SWEEPS = sorted(RESULTS.glob("**/sim-*.json"))


def _goodput_table(markdown: str) -> list[str]:
    """The lines of the first table whose header starts with 'rate (req/s)'."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| rate (req/s) |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_there_are_sweeps_to_check() -> None:
    # Three models on two sets of tier targets (docs/results/README.md).
    assert len(SWEEPS) == 6


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: str(p.relative_to(RESULTS).parent))
def test_each_sweep_markdown_table_matches_its_json(sweep: Path) -> None:
    rows = json.loads(sweep.read_text())["rows"]
    header, _, *body = _goodput_table(sweep.with_suffix(".md").read_text())
    presets = [cell.strip() for cell in header.strip("|").split("|")][2:]
    rates = sorted({r["rate"] for r in rows})
    assert len(body) == len(rates)
    for line, rate in zip(body, rates, strict=True):
        at = {r["preset"]: r for r in rows if r["rate"] == rate}
        first = at[presets[0]]
        load = first["offered_rps"] / first["saturation_rps"]
        expected = goodput_row(rate, load, [at[p]["goodput_rps"] for p in presets])
        assert line == expected, f"{sweep.with_suffix('.md')}: table row differs from the JSON"


def test_readme_per_model_tables_are_the_sweeps_own() -> None:
    readme = (RESULTS / "README.md").read_text()
    sections = re.split(r"^## ", readme, flags=re.MULTILINE)
    checked = 0
    for section in sections:
        if "| rate (req/s) |" not in section:
            continue
        details = re.search(r"Details: \[[^]]+\]\(([^)]+\.md)\)", section)
        assert details, f"section {section.splitlines()[0]!r} does not link the sweep it shows"
        source = (RESULTS / details.group(1)).read_text()
        assert _goodput_table(section) == _goodput_table(source), (
            f"docs/results/README.md section {section.splitlines()[0]!r} differs from {details.group(1)}"
        )
        checked += 1
    assert checked == 3
