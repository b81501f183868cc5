"""``nitsum``: start the stack, talk to it, inspect it, benchmark it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from nitsum_core.engine.checkpoints import DEFAULT_MODEL
from nitsum_core.errors import NitsumError

from nitsum_cli import pool

DEMO_PROMPTS = [
    ("interactive", "What is the capital of France?"),
    ("agent", "Write a Python function that reverses a string."),
    ("background", "Summarise in one sentence why the sky is blue."),
]


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", type=int, default=2, help="CPU worker processes (device slots) to start (default 2)"
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="'smollm2' (default), a .gguf file or an HF safetensors dir"
    )
    p.add_argument("--tiers", default=None, help="tier TOML file (default: packaged default_tiers.toml)")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker in MiB (default 512)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context window in tokens (default 4096)")
    p.add_argument(
        "--tpot-sized-steps",
        action="store_true",
        help="workers cut prompt chunks to keep decoding requests within their tiers' TPOT targets "
        "(default: the whole token budget every step, as vLLM's chunked prefill)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default (cores-1)/workers, at least 1)",
    )
    p.add_argument(
        "--auto",
        action="store_true",
        help="let the configurator re-cut the pool (TP degrees, tiers per instance) every second; "
        "where TP 1 cannot decode a tier within its TPOT target, the pool first moves to the tier file's boot cut",
    )
    p.add_argument(
        "--coefficients",
        default=None,
        help="perf-model coefficients JSON from `nitsum profile` for --auto (default: unfitted roofline)",
    )
    p.add_argument(
        "--replay-workers",
        type=_count,
        default=0,
        help="for --auto: processes the controller replays a window's candidate cuts in, side by "
        "side (default 0: one after another)",
    )


def _add_url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats-url",
        default=None,
        help="NATS URL of a running stack (default: $NITSUM_NATS_URL, else the stack `nitsum up` started here)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nitsum",
        description="Nitsum: tiered LLM serving over NATS. Start a stack with `nitsum up`, then use "
        "`nitsum generate`, `nitsum status` and `nitsum bench` against it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start NATS (embedded unless --nats-url), the services and N CPU workers")
    _add_stack_args(up)
    up.add_argument(
        "--nats-url", default=None, help="use this NATS server instead of starting an embedded one"
    )
    up.add_argument(
        "--demo", action="store_true", help="run a short demo against the stack, then shut it down"
    )
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for the stack to be ready")

    gen = sub.add_parser("generate", help="stream one completion from a running stack")
    gen.add_argument("prompt", help="the prompt (sent as a chat user message unless --raw)")
    _add_url_arg(gen)
    gen.add_argument(
        "--raw", action="store_true", help="send the prompt as plain text, without the chat template"
    )
    gen.add_argument("--system", default=None, help="system message for chat prompts")
    gen.add_argument("--tier", default="interactive", help="tier name (default interactive)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")

    rc = sub.add_parser(
        "reconfigure",
        help="switch the pool's TP cut at runtime (requests in flight keep generating)",
        description="Switch a running stack to a new topology with the full protocol: hold, pause at a "
        "step boundary, migrate KV head-units, commit (CAS), resume. Aborts back to the old epoch on "
        "any failure. Example: `nitsum reconfigure --tp 2,2` on a 4-worker pool.",
    )
    _add_url_arg(rc)
    what = rc.add_mutually_exclusive_group(required=True)
    what.add_argument("--tp", default=None, help="instance TP degrees in slot order, e.g. 2,2 or 4 or 1,1,2")
    what.add_argument(
        "--file",
        default=None,
        help='JSON topology: {"instances": [{"slots": [0, 1], "role": "mixed", "tiers": []}, ...]}',
    )
    rc.add_argument("--timeout", type=float, default=30.0, help="seconds allowed for the KV migration")
    rc.add_argument("--json", action="store_true", help="print the result as JSON")

    st = sub.add_parser("status", help="topology, workers, queue depths and registered services")
    _add_url_arg(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")

    bench = sub.add_parser(
        "bench",
        help="replay a trace (or the built-in synthetic workload) and report TTFT/TPOT and goodput",
        description="Open-loop replay through the client SDK. Without --trace, a synthetic workload fitted "
        "to the Azure 2023 conversation trace is used (see docs/benchmarks.md). Token counts are scaled "
        "to what the CPU backend can serve. Uses the running stack, or starts a temporary one.",
    )
    _add_url_arg(bench)
    _add_stack_args(bench)
    bench.add_argument("--trace", default=None, help="trace CSV (Azure 2023/2024 or BurstGPT format)")
    bench.add_argument("--format", default="auto", choices=["auto", "azure", "burstgpt"])
    bench.add_argument("--requests", type=int, default=40, help="number of requests (default 40)")
    bench.add_argument("--start", type=float, default=0.0, help="skip this many seconds of the trace")
    bench.add_argument(
        "--rate", type=float, default=0.5, help="mean arrival rate in req/s after scaling (default 0.5)"
    )
    bench.add_argument("--token-scale", type=float, default=0.125, help="multiply token counts (default 1/8)")
    bench.add_argument("--max-prompt", type=int, default=512, help="cap on prompt tokens after scaling")
    bench.add_argument("--max-output", type=int, default=128, help="cap on output tokens after scaling")
    bench.add_argument(
        "--tier-mix", default="interactive=0.5,agent=0.3,background=0.2", help="tier fractions"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--out", default=None, help="results JSON path (default bench_results/bench-<time>.json)"
    )
    from nitsum_cli import profile, sim

    sim.add_parser(sub)
    profile.add_parser(sub)
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more; got {text!r}")
    return value


def _stack_config(a: argparse.Namespace, nats_url: str | None):  # noqa: ANN202
    from nitsum_cli.stack import StackConfig

    return StackConfig(
        workers=a.workers,
        model=a.model,
        nats_url=nats_url,
        tiers_file=a.tiers,
        threads_per_worker=a.threads,
        kv_cache_mb=a.kv_cache_mb,
        max_model_len=a.max_model_len,
        tpot_sized_steps=a.tpot_sized_steps,
        auto=a.auto,
        coefficients=a.coefficients,
        replay_workers=a.replay_workers,
    )


# ---- up -----------------------------------------------------------------------------------------
async def _up(a: argparse.Namespace) -> int:
    from nitsum_cli.stack import Stack

    if a.workers < 1:
        raise NitsumError("--workers must be at least 1")
    stack = Stack(_stack_config(a, a.nats_url))
    print(
        f"starting Nitsum: {a.workers} CPU worker(s), model {a.model} (logs in {stack.log_dir})", flush=True
    )
    t0 = time.monotonic()
    status = await stack.start(timeout_s=a.timeout)
    stack.write_stack_file()
    print(f"ready in {time.monotonic() - t0:.1f}s on {stack.nats_url}; topology epoch {status.epoch}, "
          f"{len(status.workers)} worker(s), tiers {', '.join(status.tiers)}", flush=True)  # fmt: skip
    try:
        if a.demo:
            await _demo(stack.nats_url)
            return 0
        print(
            'serving; try `nitsum generate "Hello"` or `nitsum status` in another shell. Ctrl-C stops.',
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            for name, proc in stack.procs.items():
                if proc.poll() is not None and not name.startswith("worker"):
                    print(f"{name} exited with code {proc.returncode}; see {stack.log_dir / (name + '.log')}")
                    return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return 0
    finally:
        print("stopping the stack", flush=True)
        stack.stop()


async def _demo(url: str) -> None:
    from nitsum_core.client import NitsumClient

    async with NitsumClient(url) as client:
        for tier, prompt in DEMO_PROMPTS:
            print(f"\n[{tier}] user: {prompt}\nassistant: ", end="", flush=True)
            usage = None
            async for chunk in client.generate(
                messages=[{"role": "user", "content": prompt}], tier=tier, max_tokens=64
            ):
                print(chunk.text, end="", flush=True)
                usage = chunk.usage or usage
            if usage:
                print(f"\n  ({usage.completion_tokens} tokens, TTFT {usage.ttft_s * 1000:.0f} ms, "
                      f"TPOT {usage.tpot_s * 1000:.1f} ms, worker {usage.worker_slot})")  # fmt: skip
        print("\nconcurrent: 6 requests at once (continuous batching across 2 workers)")
        t0 = time.monotonic()
        results = await asyncio.gather(
            *[
                client.complete(
                    messages=[{"role": "user", "content": f"Name {n} colours."}], max_tokens=24, tier="agent"
                )
                for n in range(2, 8)
            ]
        )
        for r in results:
            print(f"  worker {r.usage.worker_slot}: {r.text.strip()[:60]!r}")
        print(f"  {len(results)} done in {time.monotonic() - t0:.2f}s")
        print()
        # Worker rows come from heartbeats (every 0.5 s): printed at once, they still showed the
        # last requests running and their KV held, which read like a leak.
        await asyncio.sleep(1.0)
        pool.print_status(await client.status())


# ---- generate -----------------------------------------------------------------------------------
async def _generate(a: argparse.Namespace) -> int:
    from nitsum_core.client import NitsumClient

    url = pool.resolve_url(a.nats_url)
    kwargs: dict = dict(
        tier=a.tier,
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
        stop=a.stop,
    )
    if not a.raw:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}
        ]
        kwargs["messages"] = msgs
        prompt = None
    else:
        prompt = a.prompt
    usage = None
    async with NitsumClient(url) as client:
        async for chunk in client.generate(prompt, **kwargs):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            usage = chunk.usage or usage
    print()
    if usage:
        print(
            f"[{usage.completion_tokens} tokens, prompt {usage.prompt_tokens}, TTFT {usage.ttft_s * 1000:.0f} ms, "
            f"TPOT {usage.tpot_s * 1000:.1f} ms, worker {usage.worker_slot}]",
            file=sys.stderr,
        )
    return 0


# ---- bench --------------------------------------------------------------------------------------
def _bench_workload(a: argparse.Namespace):  # noqa: ANN202
    from nitsum_core import workload as wl

    if a.trace:
        reqs = wl.read_trace(a.trace, a.format)
        if a.start:
            reqs = wl.window(reqs, a.start, float("inf"))
        source = str(a.trace)
    else:
        reqs = wl.synthetic_azure_conv(a.requests, seed=a.seed)
        source = "synthetic (Azure 2023 conversation fit)"
    reqs = reqs[: a.requests]
    reqs = wl.scale_rate(reqs, a.rate)
    reqs = wl.scale_tokens(reqs, a.token_scale, a.max_prompt, a.max_output)
    reqs = wl.assign_tiers(reqs, wl.parse_tier_mix(a.tier_mix), seed=a.seed)
    return reqs, source


async def _bench(a: argparse.Namespace) -> int:
    import os

    from nitsum_core.config import load_tiers
    from nitsum_core.policy.goodput import format_report, summarize
    from nitsum_loadgen.replay import replay, stderr_progress

    from nitsum_cli.stack import Stack, running_stack_url

    tiers = load_tiers(a.tiers)
    reqs, source = _bench_workload(a)
    unknown = {r.tier for r in reqs} - set(tiers)
    if unknown:
        raise NitsumError(f"--tier-mix names unknown tiers {sorted(unknown)}; known: {sorted(tiers)}")
    url = a.nats_url or os.environ.get("NITSUM_NATS_URL") or running_stack_url()
    stack = None
    if url is None:
        stack = Stack(_stack_config(a, None))
        print(
            f"no running stack: starting a temporary one with {a.workers} worker(s)",
            file=sys.stderr,
            flush=True,
        )
        await stack.start()
        url = stack.nats_url
    # SIGTERM (a CI timeout, `kill`) stops the replay as Ctrl-C does, so the temporary stack's
    # processes are stopped below instead of being left running.
    import signal

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        span = reqs[-1].arrival_s if reqs else 0.0
        print(f"replaying {len(reqs)} requests from {source} over {span:.0f}s "
              f"(rate {a.rate} req/s, tokens x{a.token_scale})", file=sys.stderr, flush=True)  # fmt: skip
        records, elapsed = await replay(url, reqs, seed=a.seed, progress=stderr_progress)
    except asyncio.CancelledError:
        print("interrupted: no report written", file=sys.stderr, flush=True)
        return 130
    finally:
        if stack:
            print("stopping the temporary stack", file=sys.stderr, flush=True)
            stack.stop()
    workers = a.workers
    report = summarize(records, tiers, elapsed, workers)
    print(format_report(report))
    out = Path(a.out) if a.out else Path("bench_results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "source": source,
        "args": {k: v for k, v in vars(a).items() if k != "command"},
        "report": report.to_dict(),
        "requests": [r.__dict__ for r in records],
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"results written to {out}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """Run one ``nitsum`` command in this process; its exit status."""
    args = build_parser().parse_args(argv)
    handler = {
        "up": _up,
        "generate": _generate,
        "status": pool.status,
        "bench": _bench,
        "reconfigure": pool.reconfigure,
    }.get(args.command)
    try:
        if args.command == "sim":
            from nitsum_cli import sim

            code = sim.run(args)
        elif args.command == "profile":
            from nitsum_cli import profile

            code = profile.run(args)
        else:
            code = asyncio.run(handler(args))
    except NitsumError as exc:
        print(f"nitsum {args.command}: error [{exc.code}]: {exc.message}", file=sys.stderr)
        code = 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"nitsum {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    return code


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
