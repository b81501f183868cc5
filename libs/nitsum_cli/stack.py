"""Start and stop a whole Nitsum stack as real processes: NATS, controller, broker, router, workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nitsum_core.config import state_dir
from nitsum_core.engine.checkpoints import DEFAULT_MODEL, resolve_checkpoint
from nitsum_core.wire import subjects
from nitsum_core.wire.bus import EmbeddedNats, connect
from nitsum_core.wire.codec import decode
from nitsum_core.wire.control import RouterStatus
from nitsum_core.wire.cut import Topology

STACK_FILE = "stack.json"


@dataclass
class StackConfig:
    workers: int = 2
    model: str = DEFAULT_MODEL
    nats_url: str | None = None  # None: start an embedded nats-server
    tiers_file: str | None = None
    threads_per_worker: int | None = None  # None: (cores - 1) // workers, at least 1
    kv_cache_mb: int = 512
    max_model_len: int = 4096
    tpot_sized_steps: bool = False  # workers cut prompt chunks to their decodes' TPOT targets
    worker_timeout_s: float = 2.0
    tp_pool: bool = True  # workers join one gloo world so instances can run and switch at TP > 1
    auto: bool = False  # the configurator drives the topology (tp_controller --auto)
    coefficients: str | None = None  # perf-model coefficients for --auto (`nitsum profile`)
    replay_workers: int = 0  # processes the controller replays candidate cuts in, for --auto
    home: Path = field(default_factory=state_dir)


class Stack:
    """A running stack. ``start()`` returns once every worker is in the topology and serving."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: EmbeddedNats | None = None
        self.nats_url = config.nats_url or ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = config.home / "logs"
        self.pool_id = uuid.uuid4().hex[:12]  # fresh per launch: no stale rendezvous address

    def _spawn(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        cmd = [sys.executable, "-m", module, "--nats-url", self.nats_url, *args]
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def _threads(self) -> int:
        if self.config.threads_per_worker:
            return self.config.threads_per_worker
        # Leave one core to the control plane (NATS, router, controller, broker): a worker whose
        # OpenMP team spans every core stalls whenever they run (measured: +169 ms TTFT with
        # 2 threads on 2 cores vs +3 ms with 1; docs/benchmarks.md).
        return max(1, ((os.cpu_count() or 1) - 1) // max(1, self.config.workers))

    def launch(self) -> None:
        """Start every process (does not wait for readiness)."""
        cfg = self.config
        # Convert the checkpoint once here so that workers and router don't race to do it.
        resolve_checkpoint(cfg.model)
        if not cfg.nats_url:
            self.nats = EmbeddedNats(cfg.home / "nats")
            self.nats_url = self.nats.start()
        tiers = ["--tiers", cfg.tiers_file] if cfg.tiers_file else []
        auto = ["--auto", "--model", cfg.model, *tiers] if cfg.auto else []
        if cfg.auto and cfg.coefficients:
            auto += ["--coefficients", cfg.coefficients]
        if cfg.auto and cfg.replay_workers:
            auto += ["--replay-workers", str(cfg.replay_workers)]
        self._spawn(
            "tp_controller", "nitsum_tp_controller", "--worker-timeout", str(cfg.worker_timeout_s), *auto
        )
        self._spawn("kv_broker", "nitsum_kv_broker")
        self._spawn(
            "router",
            "nitsum_router",
            "--model",
            cfg.model,
            "--worker-timeout",
            str(cfg.worker_timeout_s),
            *tiers,
        )
        for slot in range(cfg.workers):
            self.start_worker(slot)

    def start_worker(self, slot: int) -> None:
        cfg = self.config
        threads = str(self._threads())
        pool = ["--pool-size", str(cfg.workers), "--pool-id", self.pool_id] if cfg.tp_pool else []
        self._spawn(
            f"worker{slot}",
            "nitsum_gpu_worker",
            "--slot", str(slot),
            "--model", cfg.model,
            "--threads", threads,
            "--kv-cache-mb", str(cfg.kv_cache_mb),
            "--max-model-len", str(cfg.max_model_len),
            *(["--tpot-sized-steps"] if cfg.tpot_sized_steps else []),
            *pool,
            env={"OMP_NUM_THREADS": threads},
        )  # fmt: skip

    async def wait_ready(self, timeout_s: float = 180.0) -> RouterStatus:
        """Poll the router until every worker is alive and in the topology; raise with the logs' tail if not."""
        deadline = time.monotonic() + timeout_s
        nc = await connect(self.nats_url, name="nitsum-stack")
        try:
            while time.monotonic() < deadline:
                self._check_children()
                try:
                    msg = await nc.request(subjects.ROUTER_STATUS, b"", timeout=1.0)
                    status = decode(RouterStatus, msg.data)
                    alive = sum(w.alive for w in status.workers)
                    pooled = self.config.workers == 1 or not self.config.tp_pool
                    joined = pooled or sum(w.pool_joined for w in status.workers) >= self.config.workers
                    topo = await nc.request(subjects.CONTROLLER_TOPOLOGY, b"", timeout=1.0)
                    slots = decode(Topology, topo.data).slots
                    if (
                        alive >= self.config.workers
                        and len(slots) >= self.config.workers
                        and status.epoch >= 1
                        and joined
                    ):
                        return status
                except Exception:
                    pass
                await asyncio.sleep(0.3)
        finally:
            await nc.close()
        raise TimeoutError(f"stack not ready within {timeout_s}s; logs in {self.log_dir}")

    def _check_children(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up:\n{tail}")

    async def start(self, timeout_s: float = 180.0) -> RouterStatus:
        try:
            self.launch()
            return await self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def write_stack_file(self) -> Path:
        path = self.config.home / STACK_FILE
        pids = {name: p.pid for name, p in self.procs.items()}
        path.write_text(
            json.dumps({"nats_url": self.nats_url, "pid": os.getpid(), "children": pids}, indent=2)
        )
        return path

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.nats:
            self.nats.stop()
            self.nats = None
        stack_file = self.config.home / STACK_FILE
        if stack_file.exists():
            try:
                if json.loads(stack_file.read_text()).get("pid") == os.getpid():
                    stack_file.unlink()
            except (OSError, ValueError):
                pass


def running_stack_url(home: Path | None = None) -> str | None:
    """The NATS URL of a stack started by ``nitsum up`` on this machine, if its process is alive."""
    path = (home or state_dir()) / STACK_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info.get("nats_url")
