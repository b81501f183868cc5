"""The study's numbers stay the same: a fast slice of benchmarks/study_identity.py in CI.

Full Nitsum (control loop, replay scoring, configurator, SLO lanes) and the Nitsum scheduler at
its best static plan, on 70B over 8 H200s at 2x saturation, must give exactly the goodput and the
re-cut timeline pinned in benchmarks/study_identity.json (the whole check, every preset on two
models, is `python benchmarks/study_identity.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nitsum_cli.main import run as nitsum

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
CASE = "llama-3.1-70b-8xh200"


def test_full_nitsum_and_its_best_static_plan_reproduce_the_pinned_study_slice(tmp_path: Path) -> None:
    rc = nitsum(
        [
            "sim",
            *("--model", "llama-3.1-70b", "--hardware", "h200", "--gpus", "8", "--duration", "20"),
            *("--rates", "2x", "--presets", "nitsum-static,nitsum"),
            *("--trace", f"{TRACES}/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3"),
            *("--trace", f"{TRACES}/AzureLLMInferenceTrace_code.csv:agent=1"),
            *("--tiers", str(ROOT / "docs" / "results" / CASE / "tiers.toml"), "--out", str(tmp_path)),
        ]
    )
    assert rc == 0
    (result,) = tmp_path.glob("sim-*.json")
    got = json.loads(result.read_text())
    pinned = json.loads((ROOT / "benchmarks" / "study_identity.json").read_text())[CASE]
    for row in got["rows"]:
        want = next(r for r in pinned["rows"] if r["preset"] == row["preset"] and r["rate"] == row["rate"])
        row.pop("sim_seconds")
        assert row == want, f"{row['preset']} at {row['rate']} req/s differs from the pinned study slice"
    rate = str(got["rows"][0]["rate"])
    assert got["timelines"][rate] == pinned["timelines"][rate]
