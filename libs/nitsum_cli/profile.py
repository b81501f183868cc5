"""``nitsum profile``: measure the real engine step by step and fit the performance model to it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from nitsum_core.config import state_dir
from nitsum_core.engine import profiling
from nitsum_core.engine.checkpoints import DEFAULT_MODEL, resolve_checkpoint
from nitsum_core.engine.engine import Engine
from nitsum_core.engine.model import load_model
from nitsum_core.perf.perf_model import HARDWARE, PerfModel


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="time the real engine on this backend and fit the performance model's coefficients",
        description="Runs prefill and decode steps of known shapes on the real model, on the CPU (float32, "
        "what the serving path runs) or on one CUDA GPU (--device cuda, bfloat16), "
        "fits the roofline coefficients the simulator uses, saves them as JSON and prints predicted vs "
        "measured step time. Pass the JSON to `nitsum sim --coefficients`.",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="'smollm2', a .gguf file or an HF safetensors directory"
    )
    p.add_argument(
        "--hardware",
        default=None,
        choices=sorted(HARDWARE),
        help="hardware spec the fit is relative to (default: cpu, or the GPU's by its name with --device cuda)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the model runs (cuda: the current GPU)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="weights, activations and KV (default: float32 on cpu, bfloat16 on cuda); must match the "
        "hardware spec's bytes per value",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timings per probe (median)")
    p.add_argument(
        "--quick", action="store_true", help="4 small probes instead of the backend's full set (smoke test)"
    )
    p.add_argument(
        "--out", default=None, help="coefficients JSON (default $NITSUM_HOME/profiles/<model>-<hw>.json)"
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Substrings of torch.cuda.get_device_name() -> hardware spec ("NVIDIA H100 80GB HBM3" -> h100-sxm).
GPU_NAMES = {"H200": "h200", "H100": "h100-sxm", "A100": "a100-sxm"}


def gpu_hardware(device_name: str) -> str | None:
    """The hardware spec of a GPU by its CUDA device name, or None for one without a spec."""
    return next((spec for key, spec in GPU_NAMES.items() if key in device_name.upper()), None)


def _check_backend(a: argparse.Namespace) -> str | None:
    """Why this device / hardware / dtype combination cannot be profiled, or None (fills in a
    missing ``--hardware``)."""
    if a.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"--device cuda: torch sees no CUDA device (torch {torch.__version__}, {build})"
    gpu_specs = ", ".join(h for h in sorted(HARDWARE) if h != "cpu")
    if a.hardware is None and a.device == "cpu":
        a.hardware = "cpu"
    elif a.hardware is None:
        name = torch.cuda.get_device_name()
        a.hardware = gpu_hardware(name)
        if a.hardware is None:
            return f"no hardware spec for {name!r}: pass --hardware ({gpu_specs})"
    hw = HARDWARE[a.hardware]
    if (a.device == "cuda") != (a.hardware != "cpu"):
        return (
            f"--hardware {a.hardware} does not describe --device {a.device}: profile a GPU spec "
            f"({gpu_specs}) with --device cuda, and 'cpu' with --device cpu"
        )
    if DTYPES[a.dtype].itemsize != hw.dtype_bytes:
        return (
            f"--dtype {a.dtype} takes {DTYPES[a.dtype].itemsize} bytes a value but the {a.hardware} spec "
            f"assumes {hw.dtype_bytes}: the fitted coefficients would absorb the difference"
        )
    return None


def run(a: argparse.Namespace) -> int:
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    problem = _check_backend(a)
    if problem:
        print(f"nitsum profile: {problem}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.model)
    model = load_model(ckpt, device=a.device, dtype=DTYPES[a.dtype])
    if a.quick:
        probes = profiling.QUICK_PROBES
    else:
        probes = profiling.GPU_PROBES if a.device == "cuda" else profiling.DEFAULT_PROBES
    cfg = profiling.engine_config(probes, model.kv_bytes_per_token)
    print(f"{Path(str(ckpt)).name} on {a.device} ({a.dtype}), {len(probes)} probes:", flush=True)
    samples = []
    for probe in probes:
        measured = profiling.time_probe(lambda: Engine(model, cfg, set()), probe, a.repeats)
        samples.append(profiling.Sample(probe, measured))
        print(f"  {probe.label:<16} {measured * 1000:9.2f} ms", flush=True)
    base = PerfModel(model.spec, HARDWARE[a.hardware])
    before = profiling.with_predictions(base, samples)
    coef = profiling.fit(base, samples)
    after = profiling.with_predictions(PerfModel(model.spec, HARDWARE[a.hardware], coef), samples)
    print(f"\n{'probe':<16}{'measured ms':>12}{'predicted ms':>13}{'error':>8}")
    for s in after:
        print(
            f"{s.probe.label:<16}{s.measured_s * 1000:12.2f}{s.predicted_s * 1000:13.2f}{s.error * 100:7.0f}%"
        )
    print(
        f"median |error|: {profiling.median_abs_error(after) * 100:.0f}% fitted "
        f"(vs {profiling.median_abs_error(before) * 100:.0f}% with unit coefficients)"
    )
    print(f"coefficients: {coef}")
    name = Path(str(ckpt)).name
    out = Path(a.out) if a.out else state_dir() / "profiles" / f"{name}-{a.hardware}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    coef.save(out)
    report = out.with_suffix(".report.json")
    report.write_text(
        json.dumps(
            {
                "model": str(ckpt),
                "hardware": a.hardware,
                "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "dtype": a.dtype,
                "threads": torch.get_num_threads(),
                "written_at": time.time(),
                "coefficients": json.loads(out.read_text()),
                "samples": [
                    {"probe": s.probe.label, "measured_s": s.measured_s, "predicted_s": s.predicted_s}
                    for s in after
                ],
                "median_abs_error": profiling.median_abs_error(after),
                "median_abs_error_unfitted": profiling.median_abs_error(before),
                "mean_sq_log_error": profiling.mean_sq_log_error(after),
                "mean_sq_log_error_unfitted": profiling.mean_sq_log_error(before),
            },
            indent=2,
        )
    )
    print(f"wrote {out} and {report}")
    return 0
