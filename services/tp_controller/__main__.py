"""``python -m nitsum_tp_controller``: run the TP controller (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.config import load_tiers
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.logs import run_async
from nitsum_core.perf.perf_model import HARDWARE, MODEL_CONFIGS, Coefficients, PerfModel, model_spec
from nitsum_core.wire.bus import env_nats_url
from nitsum_tp_controller.autopilot import AutoPilotConfig
from nitsum_tp_controller.controller import Controller


def main() -> None:
    p = argparse.ArgumentParser(
        prog="nitsum-tp-controller",
        description="Nitsum TP controller: owns the pool topology (epochs) in a JetStream KV bucket, "
        "written with compare-and-set, and runs topology switches. Without --auto the pool is one "
        "TP-1 instance per worker until `nitsum reconfigure` changes it; with --auto the configurator "
        "re-cuts it every control window from the routers' traffic reports.",
    )
    p.add_argument("--nats-url", default=env_nats_url() or "nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=2.0,
        help="seconds without heartbeat before a worker leaves the pool",
    )
    p.add_argument(
        "--auto",
        action="store_true",
        help="let the configurator drive the topology (first, where TP 1 cannot decode a tier within "
        "its TPOT target, the boot cut of the tier file: cuts.boot_plan)",
    )
    p.add_argument(
        "--model", default="smollm2", help="served model (checkpoint dir, .gguf or name), for --auto"
    )
    p.add_argument(
        "--hardware", default="cpu", choices=sorted(HARDWARE), help="hardware spec of the slots, for --auto"
    )
    p.add_argument(
        "--coefficients", default=None, help="perf-model coefficients JSON from `nitsum profile`, for --auto"
    )
    p.add_argument("--tiers", default=None, help="tier TOML (the routers' file), for --auto")
    p.add_argument("--window", type=float, default=1.0, help="control window in seconds (default 1)")
    p.add_argument(
        "--score",
        default="replay",
        choices=["replay", "roofline"],
        help="how --auto ranks candidate cuts: replay them through the simulator on the recent requests "
        "(default; 0.2-1.3 s of CPU per window on 8 GPUs at 50-400 req/s on a 2-core VM, docs/benchmarks.md "
        "section 7; grows with the pool) or the calibrated "
        "roofline capacity model (milliseconds at any pool size, ranks less well)",
    )
    p.add_argument(
        "--replay-workers",
        type=int,
        default=0,
        help="processes that replay a window's candidate cuts side by side (default 0: one after "
        "another in a thread); a window's replays take over 1 s of CPU at 400 req/s on 8 GPUs on a "
        "2-core VM, longer than the 1 s window, so give 2 or more where the controller has the cores",
    )
    a = p.parse_args()
    if a.replay_workers < 0:
        p.error(f"--replay-workers must be 0 or more, got {a.replay_workers}")
    pilot = None
    if a.auto:
        spec = model_spec(a.model if a.model in MODEL_CONFIGS else str(resolve_checkpoint(a.model)))
        coef = Coefficients.load(a.coefficients) if a.coefficients else None
        pilot = AutoPilotConfig(
            perf=PerfModel(spec, HARDWARE[a.hardware], coef),
            tiers=load_tiers(a.tiers),
            window_s=a.window,
            score=a.score,
            replay_workers=a.replay_workers,
        )
    run_async(Controller(a.nats_url, a.worker_timeout, autopilot=pilot).run())


if __name__ == "__main__":
    main()
