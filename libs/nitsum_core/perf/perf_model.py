"""Roofline performance model of one engine step at TP k (docs/simulator.md, performance model).

step time = max(memory time, compute time) + all-reduce time + fixed overhead, where
  memory  = (weight bytes / k) * c_weight + (KV bytes read / k) * c_kv   over HBM bandwidth
  compute = FLOPs / k * c_flops                                           over peak FLOP/s
  comm    = 2 all-reduces per layer * (latency + ring bytes / link bandwidth) * c_comm  (k > 1)
Hardware and model shapes are data; the coefficients are fitted per backend by ``nitsum profile``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nitsum_core.perf.model_spec import ModelSpec


@dataclass(frozen=True)
class HardwareSpec:
    """One device: HBM bandwidth, dense peak FLOP/s at the serving dtype, interconnect, memory."""

    name: str
    mem_bw: float  # bytes/s
    peak_flops: float  # FLOP/s
    link_bw: float  # bytes/s per direction between devices (NVLink)
    link_latency: float  # seconds per collective hop
    mem_bytes: float
    dtype_bytes: int = 2


HARDWARE: dict[str, HardwareSpec] = {
    "h100-sxm": HardwareSpec("h100-sxm", 3.35e12, 989e12, 450e9, 8e-6, 80e9),
    "h200": HardwareSpec("h200", 4.8e12, 989e12, 450e9, 8e-6, 141e9),
    "a100-sxm": HardwareSpec("a100-sxm", 2.039e12, 312e12, 300e9, 10e-6, 80e9),
    # The CPU backend (float32, gloo over loopback): rough figures for a 2-core AVX2 VM; the
    # fitted coefficients absorb the difference from reality.
    "cpu": HardwareSpec("cpu", 10e9, 50e9, 2e9, 100e-6, 24e9, dtype_bytes=4),
}


# HF config.json fields of the models the study uses (public architecture facts).
MODEL_CONFIGS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=32768, tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
}  # fmt: skip


def model_spec(name_or_config: str | dict) -> ModelSpec:
    """A ModelSpec from a known name or an HF config dict / config.json path."""
    if isinstance(name_or_config, dict):
        return ModelSpec.from_config_dict(name_or_config)
    if name_or_config in MODEL_CONFIGS:
        return ModelSpec.from_config_dict(MODEL_CONFIGS[name_or_config])
    path = Path(name_or_config)
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        return ModelSpec.from_config_dict(json.loads(path.read_text()))
    raise ValueError(
        f"unknown model {name_or_config!r}: use one of {sorted(MODEL_CONFIGS)} or an HF config.json"
    )


def layer_params(s: ModelSpec) -> int:
    """Parameters of one decoder layer (attention + MLP; norms are negligible)."""
    q = s.hidden_size * s.num_heads * s.head_dim
    kv = 2 * s.hidden_size * s.num_kv_heads * s.head_dim
    o = s.num_heads * s.head_dim * s.hidden_size
    mlp = 3 * s.hidden_size * s.intermediate_size
    return q + kv + o + mlp


@dataclass(frozen=True)
class Coefficients:
    """Multipliers on each roofline term plus a fixed per-step overhead, fitted per backend."""

    c_weight: float = 1.0
    c_kv: float = 1.0
    c_flops: float = 1.0
    c_comm: float = 1.0
    overhead_s: float = 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Coefficients:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class StepTerms:
    memory_s: float
    compute_s: float
    comm_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return max(self.memory_s, self.compute_s) + self.comm_s + self.overhead_s


class PerfModel:
    def __init__(self, model: ModelSpec, hw: HardwareSpec, coef: Coefficients | None = None) -> None:
        self.model = model
        self.hw = hw
        self.coef = coef or Coefficients()
        s = model
        b = hw.dtype_bytes
        # Every step streams the decoder weights and the LM head once (the embedding is a gather).
        self.weight_bytes = (s.num_layers * layer_params(s) + s.vocab_size * s.hidden_size) * b
        self.kv_bytes_per_token = s.num_layers * 2 * s.num_kv_heads * s.head_dim * b
        self.flops_per_token = 2 * (s.num_layers * layer_params(s) + s.vocab_size * s.hidden_size)

    def _parts(
        self, tp: int, prefill_tokens: int, decode_seqs: int, context_tokens: int
    ) -> tuple[float, float, float]:
        """(memory, compute, comm) seconds of one step; ``tokens`` > 0, ``tp`` >= 1."""
        s, hw, c = self.model, self.hw, self.coef
        tokens = prefill_tokens + decode_seqs
        kv_read = context_tokens * self.kv_bytes_per_token
        memory = (self.weight_bytes * c.c_weight + kv_read * c.c_kv) / tp / hw.mem_bw
        # Attention scores and values: 4 * heads * head_dim FLOPs per (query, key) pair per layer;
        # a prefill chunk attends causally (about half the square).
        attn_pairs = context_tokens + prefill_tokens * prefill_tokens / 2
        attn_flops = 4 * s.num_layers * s.num_heads * s.head_dim * attn_pairs
        compute = (self.flops_per_token * tokens + attn_flops) * c.c_flops / tp / hw.peak_flops
        comm = 0.0
        if tp > 1:
            # Ring all-reduce of the activations: 2 (k-1)/k of the bytes cross each link.
            ring_bytes = 2 * (tp - 1) / tp * tokens * s.hidden_size * hw.dtype_bytes
            comm = 2 * s.num_layers * (hw.link_latency * (tp - 1) + ring_bytes / hw.link_bw) * c.c_comm
        return memory, compute, comm

    def terms(
        self, tp: int, prefill_tokens: int = 0, decode_seqs: int = 0, context_tokens: int = 0
    ) -> StepTerms:
        """Roofline terms of one step: ``prefill_tokens`` new prompt tokens plus ``decode_seqs``
        decoding sequences whose KV totals ``context_tokens`` tokens."""
        if tp < 1:
            raise ValueError("tp must be >= 1")
        if prefill_tokens + decode_seqs == 0:
            return StepTerms(0.0, 0.0, 0.0, 0.0)
        memory, compute, comm = self._parts(tp, prefill_tokens, decode_seqs, context_tokens)
        return StepTerms(memory, compute, comm, self.coef.overhead_s)

    def step_time(
        self, tp: int, prefill_tokens: int = 0, decode_seqs: int = 0, context_tokens: int = 0
    ) -> float:
        """``terms(...).total_s`` without building the dataclass (the simulator calls this every step)."""
        if tp < 1 or prefill_tokens + decode_seqs == 0:
            return self.terms(tp, prefill_tokens, decode_seqs, context_tokens).total_s
        memory, compute, comm = self._parts(tp, prefill_tokens, decode_seqs, context_tokens)
        return (memory if memory > compute else compute) + comm + self.coef.overhead_s

    def kv_capacity_tokens(self, tp: int, memory_fraction: float = 0.9) -> int:
        """KV tokens an instance of TP ``tp`` holds after the weights (0 if the weights don't fit)."""
        free = self.hw.mem_bytes * tp * memory_fraction - self.weight_bytes
        return max(0, int(free // self.kv_bytes_per_token))
