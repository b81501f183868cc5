"""The per-rank engine: scheduler + block manager + model runner + sampling + stop conditions.

Synchronous and thread-confined: the gpu_worker service runs ``step()`` in its own thread so the
asyncio loop stays free for NATS. Benchmarks and tests call it in-process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nitsum_core.kv_cache import BlockManager
from nitsum_core.model import AttentionMetadata, LlamaModel, ModelShard
from nitsum_core.sampling import sample_one
from nitsum_core.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, Sequence


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_model_len: int = 4096


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


class StepOutput(NamedTuple):
    """New token(s) of one request after a step; ``finish_reason`` is set when it is done."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None


def kv_num_blocks(model: LlamaModel | ModelShard, config: EngineConfig) -> int:
    """KV blocks that ``config.kv_cache_mb`` holds for this model (or TP shard: its heads only)."""
    heads = getattr(model, "num_kv_heads", model.spec.num_kv_heads)
    per_token = model.spec.kv_bytes_per_token * heads // model.spec.num_kv_heads
    return max(1, (config.kv_cache_mb * 1024 * 1024) // (per_token * config.block_size))


class Engine:
    def __init__(
        self,
        model: LlamaModel | ModelShard,
        config: EngineConfig,
        eos_token_ids: set[int],
        before_forward: Callable[[torch.Tensor, AttentionMetadata], None] | None = None,
    ) -> None:
        self.model = model
        # A TP leader ships each step's inputs to its followers here (nitsum_core.tp.leader_hook).
        self.before_forward = before_forward
        self.config = config
        self.eos_token_ids = eos_token_ids
        spec = model.spec
        num_blocks = kv_num_blocks(model, config)
        self.max_model_len = min(config.max_model_len, spec.max_position_embeddings)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_batched_tokens, self.max_model_len), self.blocks
        )
        self.kv = model.new_kv_cache(num_blocks * config.block_size)
        self._params: dict[str, RequestParams] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.tokens_generated = 0

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: RequestParams, priority: int = 0
    ) -> None:
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
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), priority)
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

    def _build_metadata(self, plan: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.blocks.block_size
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
                prefills.append((row, n, torch.tensor(table[: -(-end // bs)]), end))
        meta = AttentionMetadata(
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots),
            logits_index=torch.tensor(logits_rows, dtype=torch.long),
            prefills=prefills,
            block_size=bs,
        )
        if decode_rows:
            widest = max(len(t) for t in decode_tables)
            mask = torch.zeros(len(decode_rows), 1, 1, widest * bs)
            for i, length in enumerate(decode_lens):
                mask[i, 0, 0, length:] = float("-inf")
            contiguous = decode_rows == list(range(decode_rows[0], decode_rows[0] + len(decode_rows)))
            meta.decode_rows = (
                slice(decode_rows[0], decode_rows[0] + len(decode_rows))
                if contiguous
                else torch.tensor(decode_rows)
            )
            meta.decode_blocks = torch.tensor([t + [0] * (widest - len(t)) for t in decode_tables])
            meta.decode_mask = mask
        return torch.tensor(ids), meta

    def step(self) -> list[StepOutput]:
        """Run one engine step; return the new tokens and finished requests."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        input_ids, meta = self._build_metadata(plan)
        if self.before_forward is not None:
            self.before_forward(input_ids, meta)
        logits = self.model.forward(input_ids, meta, self.kv)
        self.steps += 1
        outputs: list[StepOutput] = []
        row = 0
        for item in plan:
            seq = item.seq
            seq.num_computed = item.start + item.num_new
            if not item.samples:
                continue
            params = self._params[seq.seq_id]
            token = sample_one(
                logits[row], params.temperature, params.top_p, self._generators.get(seq.seq_id)
            )
            row += 1
            seq.token_ids.append(token)
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
