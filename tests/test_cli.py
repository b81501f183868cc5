"""The `nitsum` command line against a real stack started by `nitsum up` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nitsum_core.engine.checkpoints import model_cache_dir

NITSUM = [sys.executable, "-m", "nitsum_cli.main"]


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NITSUM, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_explains_every_command() -> None:
    out = subprocess.run([*NITSUM, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("up", "generate", "status", "bench"):
        assert cmd in out
        sub = subprocess.run([*NITSUM, cmd, "--help"], capture_output=True, text=True, check=True).stdout
        assert "usage: nitsum " + cmd in sub


def test_a_bad_replay_worker_count_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {**os.environ, "NITSUM_HOME": str(tmp_path)}
    res = run("up", "--auto", "--replay-workers", "-1", env=env)
    assert res.returncode == 2 and "--replay-workers: expected a whole number, 0 or more" in res.stderr
    assert not any(tmp_path.iterdir())  # no stack was started


def test_generate_without_a_stack_says_what_to_do(tmp_path: Path) -> None:
    env = {**os.environ, "NITSUM_HOME": str(tmp_path)}
    env.pop("NITSUM_NATS_URL", None)
    res = run("generate", "hello", env=env)
    assert res.returncode == 2 and "nitsum up" in res.stderr


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    """`nitsum up` in the background, found by the other commands through its stack file."""
    home = tmp_path_factory.mktemp("cli-home")
    # A fresh state dir, but the converted model stays in the shared cache (no 40 s re-conversion).
    env = {**os.environ, "NITSUM_HOME": str(home), "NITSUM_MODEL_CACHE": str(model_cache_dir())}
    env.pop("NITSUM_NATS_URL", None)
    proc = subprocess.Popen(
        [*NITSUM, "up", "--workers", "1", "--kv-cache-mb", "128"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "serving;" in line:
            break
        if proc.poll() is not None:
            pytest.fail("nitsum up exited early:\n" + "".join(lines))
    else:
        proc.kill()
        pytest.fail("nitsum up not ready:\n" + "".join(lines))
    yield env
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def test_generate_status_and_bench(up: dict[str, str], tmp_path: Path) -> None:
    gen = run("generate", "What is the capital of France?", "--max-tokens", "16", env=up)
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout and "TTFT" in gen.stderr

    bad = run("generate", "hi", "--tier", "gold", env=up)
    assert bad.returncode == 2 and "unknown_tier" in bad.stderr and "known tiers" in bad.stderr

    st = run("status", "--json", env=up)
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["topology"]["epoch"] >= 1 and info["router"]["workers"][0]["alive"]
    assert info["services"]["nitsum-gpu-worker"] == 1 and info["router"]["completed"] >= 1
    table = run("status", env=up)
    assert "queue depth by tier" in table.stdout

    out = tmp_path / "bench.json"
    bench = run(
        "bench", "--requests", "6", "--rate", "2", "--max-output", "8", "--out", str(out), env=up, timeout=300
    )
    assert bench.returncode == 0, bench.stderr
    assert "goodput" in bench.stdout and out.exists()
    result = json.loads(out.read_text())
    assert len(result["requests"]) == 6 and all(r["error"] is None for r in result["requests"])
    assert sum(t["requests"] for t in result["report"]["tiers"]) == 6


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_bench_stopped_by_sigterm_stops_its_temporary_stack(tmp_path: Path) -> None:
    env = {**os.environ, "NITSUM_HOME": str(tmp_path), "NITSUM_MODEL_CACHE": str(model_cache_dir())}
    env.pop("NITSUM_NATS_URL", None)
    proc = subprocess.Popen(
        [*NITSUM, "bench", "--workers", "1", "--kv-cache-mb", "128", "--requests", "200", "--rate", "1"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("replaying" in line for line in lines):
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            pytest.fail("nitsum bench exited early:\n" + "".join(lines))
        lines.append(line)
    stack = _children(proc.pid)  # nats-server and the four services
    assert len(stack) >= 5, "".join(lines)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "stopping the temporary stack" in err
    assert [pid for pid in stack if _alive(pid)] == []
