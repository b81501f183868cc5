"""The per-rank engine: scheduler + block manager + model runner + sampling + stop conditions.

Synchronous and thread-confined: the gpu_worker service runs ``step()`` in its own thread so the
asyncio loop stays free for NATS. Benchmarks and tests call it in-process. TTFT deadlines are
``time.monotonic()`` times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nitsum_core.engine.model import AttentionMetadata, LlamaModel, ModelShard
from nitsum_core.engine.sampling import sample_one
from nitsum_core.perf.step_time import StepTimeModel
from nitsum_core.policy.kv_cache import BlockManager
from nitsum_core.policy.scheduler import EngineSequence, ScheduledSeq, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_model_len: int = 4096
    # Size each step to the TPOT targets of the sequences decoding in it (scheduler module
    # docstring), by the step time this engine learns from its own steps. Off by default: on the
    # CPU stack in overload it cost 9-13 % of goodput (docs/benchmarks.md section 3). Decodes then
    # sit at their target and prompts wait; it pays where decodes' TPOT matters more than the
    # prompts' TTFT (benchmarks/tpot_steps.py: chats 100 % on target instead of 0 %).
    tpot_sized_steps: bool = False


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


class ExportedRequest(NamedTuple):
    """A request's whole engine-side state, as handed from an old instance leader to a new one."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int
    priority: int
    params: RequestParams
    rng_state: bytes | None
    block_table: list[int]
    # Seconds to its TTFT deadline at export; None: no deadline, or its first token is out.
    ttft_left_s: float | None = None
    tpot_s: float | None = None  # its TPOT target; None: none
    # Seconds since its first output token at export (None: not out yet): the new leader keeps
    # paying back time it is behind its TPOT target, the pause included.
    since_first_s: float | None = None


class StepOutput(NamedTuple):
    """New token(s) of one request after a step; ``finish_reason`` is set when it is done."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None


def kv_num_blocks(model: LlamaModel | ModelShard, config: EngineConfig) -> int:
    """KV blocks that ``config.kv_cache_mb`` holds for this model (or TP shard: its heads only)."""
    return max(1, (config.kv_cache_mb * 1024 * 1024) // (model.kv_bytes_per_token * config.block_size))


class Engine:
    def __init__(
        self,
        model: LlamaModel | ModelShard,
        config: EngineConfig,
        eos_token_ids: set[int],
        before_forward: Callable[[torch.Tensor, AttentionMetadata], None] | None = None,
        kv: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        # A TP leader ships each step's inputs to its followers here (nitsum_core.engine.tp.leader_hook).
        self.before_forward = before_forward
        self.config = config
        self.eos_token_ids = eos_token_ids
        spec = model.spec
        # A worker that switches TP passes a view of its head-unit pool (``kv``); its block count
        # follows from the view's size. Standalone engines size their own cache from the config.
        num_blocks = kv.shape[2] // config.block_size if kv is not None else kv_num_blocks(model, config)
        self.max_model_len = min(config.max_model_len, spec.max_position_embeddings)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_batched_tokens, self.max_model_len), self.blocks
        )
        # Learnt from every step, and only kept where it sizes them: unused, it is hot-path work.
        self.step_time = StepTimeModel() if config.tpot_sized_steps else None
        self.scheduler.step_time = self.step_time
        self.kv = kv if kv is not None else model.new_kv_cache(num_blocks * config.block_size)
        self._params: dict[str, RequestParams] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._seqs: dict[str, EngineSequence] = {}
        self.steps = 0
        self.tokens_generated = 0
        self.tokens_prefilled = 0  # prompt/context tokens run through the model (re-prefill shows here)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: RequestParams,
        priority: int = 0,
        ttft_deadline: float | None = None,
        tpot_s: float | None = None,
    ) -> None:
        """Queue a request; ``ttft_deadline`` (a ``time.monotonic()`` time) is when its first token
        is due: once it cannot be met, its prompt runs after those that still can meet theirs.
        ``tpot_s`` is its mean time-per-output-token target: steps it decodes in are sized to it."""
        if request_id in self._params:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context window of {self.max_model_len} tokens"
            )
        if len(prompt_ids) + params.max_tokens > self.capacity_tokens:
            raise ValueError(f"request needs more KV than this worker holds ({self.capacity_tokens} tokens)")
        self._params[request_id] = params
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else hash(request_id) & 0x7FFFFFFF)
            self._generators[request_id] = gen
        seq = EngineSequence(
            request_id, list(prompt_ids), len(prompt_ids), priority, ttft_deadline=ttft_deadline
        )
        seq.tpot_s, seq.max_tokens = tpot_s, params.max_tokens
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def num_tokens(self, request_id: str) -> int:
        """Prompt + generated tokens of a live request (0 if unknown)."""
        seq = self._seqs.get(request_id)
        return len(seq.token_ids) if seq else 0

    def abort(self, request_id: str) -> bool:
        self._params.pop(request_id, None)
        self._generators.pop(request_id, None)
        self._seqs.pop(request_id, None)
        return self.scheduler.remove(request_id) is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def export(self) -> list[ExportedRequest]:
        """Every live request's state, running ones first in batch order, then the waiting queue.

        The KV of ``num_computed`` tokens lives in ``block_table``; the new leader continues the
        sequence from there (docs/architecture.md, switch protocol), so nothing is recomputed.
        """
        out: list[ExportedRequest] = []
        now = time.monotonic()
        for seq in self.scheduler.running + self.scheduler.waiting_in_order():
            gen = self._generators.get(seq.seq_id)
            out.append(
                ExportedRequest(
                    seq.seq_id,
                    list(seq.token_ids),
                    seq.num_prompt_tokens,
                    seq.num_computed,
                    seq.priority,
                    self._params[seq.seq_id],
                    bytes(gen.get_state().numpy().tobytes()) if gen is not None else None,
                    list(self.blocks.block_table(seq.seq_id)),
                    None if seq.ttft_deadline is None or seq.num_generated > 0 else seq.ttft_deadline - now,
                    seq.tpot_s,
                    None if seq.first_token_at is None else now - seq.first_token_at,
                )
            )
        return out

    def adopt(self, req: ExportedRequest, block_table: list[int]) -> None:
        """Continue a request exported by another engine; its KV is (or will be) in ``block_table``.

        An empty table means the request restarts from its tokens (recompute, nothing lost).
        """
        self._params[req.request_id] = req.params
        if req.rng_state is not None:
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(req.rng_state), dtype=torch.uint8))
            self._generators[req.request_id] = gen
        computed = req.num_computed if block_table else 0
        seq = EngineSequence(
            req.request_id, list(req.token_ids), req.num_prompt_tokens, req.priority, computed
        )
        now = time.monotonic()
        if req.ttft_left_s is not None:
            seq.ttft_deadline = now + req.ttft_left_s
        seq.tpot_s, seq.max_tokens = req.tpot_s, req.params.max_tokens
        if req.since_first_s is not None:
            seq.first_token_at = now - req.since_first_s
        self._seqs[req.request_id] = seq
        if computed:
            self.blocks.adopt(req.request_id, block_table)
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)

    def _build_metadata(self, plan: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.blocks.block_size
        device = self.model.device

        def tensor(data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=device)

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[tuple[int, int, torch.Tensor | None, int]] = []
        for item in plan:
            seq, start, n = item.seq, item.start, item.num_new
            table = self.blocks.block_table(seq.seq_id)
            row = len(ids)
            end = start + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if item.samples:
                logits_rows.append(row + n - 1)
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            elif start == 0:
                prefills.append((row, n, None, n))
            else:
                prefills.append((row, n, tensor(table[: -(-end // bs)]), end))
        meta = AttentionMetadata(
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            logits_index=tensor(logits_rows),
            prefills=prefills,
            block_size=bs,
        )
        if decode_rows:
            widest = max(len(t) for t in decode_tables)
            # Built on the host, moved once: per-row writes into a device tensor would be one
            # small copy each. Additive, in the activations' dtype (what SDPA takes).
            mask = torch.zeros(len(decode_rows), 1, 1, widest * bs, dtype=self.model.dtype)
            for i, length in enumerate(decode_lens):
                mask[i, 0, 0, length:] = float("-inf")
            contiguous = decode_rows == list(range(decode_rows[0], decode_rows[0] + len(decode_rows)))
            meta.decode_rows = (
                slice(decode_rows[0], decode_rows[0] + len(decode_rows))
                if contiguous
                else tensor(decode_rows)
            )
            meta.decode_blocks = tensor([t + [0] * (widest - len(t)) for t in decode_tables])
            meta.decode_mask = mask.to(device)
        return tensor(ids), meta

    def step(self) -> list[StepOutput]:
        """Run one engine step; return the new tokens and finished requests."""
        t0 = time.monotonic()
        plan = self.scheduler.schedule(t0)
        if not plan:
            return []
        input_ids, meta = self._build_metadata(plan)
        decodes = [i for i in plan if i.num_new == 1 and i.start > 0]
        prefilled = len(input_ids) - len(decodes)
        self.tokens_prefilled += prefilled
        if self.before_forward is not None:
            self.before_forward(input_ids, meta)
        logits = self.model.forward(input_ids, meta, self.kv)
        # Greedy picks for every row at once: on a GPU this is the step's one sync point, so the
        # clock below reads the step's real duration and not just the kernel launches.
        greedy = logits.argmax(dim=-1).tolist()
        done_at = time.monotonic()
        self.steps += 1
        if self.step_time is not None:
            self.step_time.observe(prefilled, len(decodes), sum(i.start + 1 for i in decodes), done_at - t0)
        if 2 * prefilled >= len(input_ids):
            # The scheduler's TTFT rule needs how fast prompts prefill here, in this engine's
            # chunks; a mostly-prefill step measures it (decode steps cost far more per token).
            per_token = (done_at - t0) / len(input_ids)
            old = self.scheduler.prefill_s_per_token
            self.scheduler.prefill_s_per_token = per_token if old == 0 else 0.8 * old + 0.2 * per_token
        outputs: list[StepOutput] = []
        row = 0
        for item in plan:
            seq = item.seq
            seq.num_computed = item.start + item.num_new
            if not item.samples:
                continue
            params = self._params[seq.seq_id]
            if params.temperature <= 0.0:
                token = greedy[row]
            else:  # the request's generator lives on the host: sample its row there
                gen = self._generators.get(seq.seq_id)
                token = sample_one(logits[row].float().cpu(), params.temperature, params.top_p, gen)
            row += 1
            seq.token_ids.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = done_at
            self.tokens_generated += 1
            reason = None
            if token in self.eos_token_ids and not params.ignore_eos:
                reason = "stop"
            elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                reason = "length"
            outputs.append(StepOutput(seq.seq_id, [token], reason))
            if reason is not None:
                self.abort(seq.seq_id)
        return outputs

    def generate(self, prompts: list[list[int]], params: RequestParams) -> list[list[int]]:
        """Convenience for tests and benchmarks: run ``prompts`` to completion, return output ids."""
        out: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            self.add_request(f"gen-{i}-{time.monotonic_ns()}", p, params)
            out[list(self._params)[-1]] = []
        order = list(out)
        while self.has_work():
            for o in self.step():
                out[o.request_id].extend(o.token_ids)
        return [out[k] for k in order]
