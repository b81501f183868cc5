"""Check that the goodput study still gives the very same numbers: a small fixed case, bit for bit.

Runs `nitsum sim` on two short windows of the study's workload (Llama-3.1-8B on 8xH100 and
Llama-3.1-70B on 8xH200, 1x and 2x saturation, every preset) and compares every row and every
dynamic preset's timeline with `benchmarks/study_identity.json`. A refactoring that claims to keep
behaviour must pass this unchanged; a deliberate change of behaviour rewrites the JSON with
`--write` and states the before/after figures where it lands.

    python benchmarks/study_identity.py            # ~3 min on two cores; exit 1 on any difference
    python benchmarks/study_identity.py --write    # record the current figures
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nitsum_cli.main import run as nitsum

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
EXPECTED = Path(__file__).with_suffix(".json")
CASES = {
    "llama-3.1-8b-8xh100": ["--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--duration", "5"],
    "llama-3.1-70b-8xh200": ["--model", "llama-3.1-70b", "--hardware", "h200", "--duration", "20"],
}


def run_case(name: str, args: list[str], out: Path) -> dict:
    traces = [
        "--trace",
        f"{TRACES}/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3",
        "--trace",
        f"{TRACES}/AzureLLMInferenceTrace_code.csv:agent=1",
    ]
    tiers = ["--tiers", str(ROOT / "docs" / "results" / name / "tiers.toml")]
    rc = nitsum(["sim", *args, "--gpus", "8", "--rates", "1x,2x", *traces, *tiers, "--out", str(out)])
    if rc:
        raise SystemExit(f"nitsum sim failed on {name} (exit {rc})")
    (result,) = out.glob("sim-*.json")
    data = json.loads(result.read_text())
    rows = [{k: v for k, v in row.items() if k != "sim_seconds"} for row in data["rows"]]
    return {"rows": rows, "timelines": data["timelines"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the figures in {EXPECTED.name}")
    a = p.parse_args(argv)
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in CASES.items():
            got[name] = run_case(name, args, Path(tmp) / name)
    if a.write:
        EXPECTED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {EXPECTED}")
        return 0
    expected = json.loads(EXPECTED.read_text())
    differ = 0
    for name in CASES:
        for want, have in zip(expected[name]["rows"], got[name]["rows"], strict=True):
            same = want == have
            differ += not same
            verdict = "same" if same else f"DIFFERS (was {want['goodput_rps']:.4f})"
            print(
                f"{name:22} {have['preset']:14} {have['rate']:>7} req/s  {have['goodput_rps']:9.4f}  {verdict}"
            )
        if expected[name]["timelines"] != got[name]["timelines"]:
            differ += 1
            print(f"{name}: the dynamic presets' timelines differ")
    print("identical" if not differ else f"{differ} differences")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
