"""Our Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2; GQA) over a paged KV cache.

The forward pass takes a *flat* batch: the new tokens of every scheduled sequence, concatenated.
Linear layers run once over all of them (that is where batching pays); attention runs batched
for decoding sequences and per sequence for prefill chunks, reading K/V from the paged cache.

Device and dtype follow the weights (``load_model(device=..., dtype=...)``): float32 on CPU, the
default and what the serving path runs; bfloat16 on CUDA for ``nitsum profile``. The KV cache and
every per-step tensor are made on the same device in the same dtype.

Weight layout: q/k/v are fused with rows grouped by KV head ([q rows of group g, k_g, v_g] for
each group g), so the slice of any TP degree that divides the KV heads is one contiguous row
block -- a view, never a copy (docs/architecture.md, resident weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nitsum_core.perf.model_spec import ModelSpec


@dataclass
class AttentionMetadata:
    """Per-step indices shared by every layer (built once per step by the engine)."""

    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    logits_index: torch.Tensor  # [S] flat index of the last new token of each sampling sequence
    # Decode group (one new token per sequence): its flat rows, the KV blocks of each
    # sequence (padded with block 0) and an additive key mask hiding padding.
    decode_rows: slice | torch.Tensor | None = None  # [B] (a slice when the rows are contiguous)
    decode_blocks: torch.Tensor | None = None  # [B, max_blocks]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] (0 / -inf)
    # Prefill chunks: (first flat row, number of rows, blocks holding the whole context and its
    # length), or None for the blocks when the chunk is the whole context (fresh K/V used as is).
    prefills: list[tuple[int, int, torch.Tensor | None, int]] | None = None
    block_size: int = 16


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF's LlamaRMSNorm (in float32, whatever the model's dtype) so greedy
    # outputs match token for token.
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    """Weights plus a forward pass; no nn.Module state beyond plain tensors (easy to slice and view)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], hf_config: dict) -> None:
        self.spec = spec
        s = spec
        self.group = s.num_heads // s.num_kv_heads
        # MLP rows are laid out in this many units so every TP degree up to it slices by view.
        # 24 covers TP 1, 2, 3, 4, 6, 8 (e.g. SmolLM2's 1536 at TP 3, with its 3 KV heads).
        self.mlp_units = next(u for u in (24, 8, 4, 2, 1) if s.intermediate_size % u == 0)
        self._shards: dict[tuple[int, int], ModelShard] = {}
        # Which TP slice the layer tensors hold: (1, 0) = the whole model (see ``restrict_to``).
        self.resident_tp, self.resident_rank = 1, 0
        self.embed = weights["model.embed_tokens.weight"]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        lm_head = weights.get("lm_head.weight", self.embed) if not s.tie_word_embeddings else self.embed
        # Kept as [hidden, vocab]: MKL's GEMM is ~1.2-1.6x faster on the vocab projection in this
        # layout than through F.linear's transposed view (it is the single largest matmul).
        self.lm_head_t = lm_head.t().contiguous()
        self.final_norm = weights["model.norm.weight"]
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            q = weights[p + "self_attn.q_proj.weight"].view(s.num_kv_heads, self.group * s.head_dim, -1)
            k = weights[p + "self_attn.k_proj.weight"].view(s.num_kv_heads, s.head_dim, -1)
            v = weights[p + "self_attn.v_proj.weight"].view(s.num_kv_heads, s.head_dim, -1)
            layer = {
                "qkv": torch.cat([q, k, v], dim=1).reshape(-1, s.hidden_size).contiguous(),
                "o": weights[p + "self_attn.o_proj.weight"],
                # [gate_u0; up_u0; gate_u1; up_u1; ...]: a TP rank's gate and up rows are one block.
                "gate_up": torch.stack(
                    [
                        weights[p + "mlp.gate_proj.weight"].view(self.mlp_units, -1, s.hidden_size),
                        weights[p + "mlp.up_proj.weight"].view(self.mlp_units, -1, s.hidden_size),
                    ],
                    dim=1,
                )
                .reshape(-1, s.hidden_size)
                .contiguous(),
                "down": weights[p + "mlp.down_proj.weight"],
                "ln1": weights[p + "input_layernorm.weight"],
                "ln2": weights[p + "post_attention_layernorm.weight"],
            }
            if s.attention_bias:
                qb = weights[p + "self_attn.q_proj.bias"].view(s.num_kv_heads, -1)
                kb = weights[p + "self_attn.k_proj.bias"].view(s.num_kv_heads, -1)
                vb = weights[p + "self_attn.v_proj.bias"].view(s.num_kv_heads, -1)
                layer["qkv_bias"] = torch.cat([qb, kb, vb], dim=1).reshape(-1).contiguous()
            self.layers.append(layer)
        self._init_rope(hf_config)

    def _init_rope(self, hf_config: dict) -> None:
        # Reuse transformers' rotary implementation for the inverse frequencies so every rope
        # scaling variant (llama3, linear, dynamic...) is computed exactly as the reference does.
        from transformers import AutoConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = AutoConfig.for_model(**{**hf_config, "model_type": "llama"})
        rope = LlamaRotaryEmbedding(cfg)
        positions = torch.arange(self.spec.max_position_embeddings)
        freqs = torch.outer(positions.float(), rope.inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        # Computed in float32 and cast once, as HF casts its cos/sin to the activations' dtype.
        self.cos = (emb.cos() * rope.attention_scaling).to(self.device, self.dtype).contiguous()
        self.sin = (emb.sin() * rope.attention_scaling).to(self.device, self.dtype).contiguous()

    def valid_tp(self, tp: int) -> bool:
        return tp >= 1 and self.spec.num_kv_heads % tp == 0 and self.mlp_units % tp == 0

    def holds(self, tp: int, rank: int) -> bool:
        """True when rank ``rank`` of TP ``tp`` lies inside the resident slice (aligned blocks nest)."""
        k0, r0 = self.resident_tp, self.resident_rank
        return tp % k0 == 0 and rank // (tp // k0) == r0

    def shard(self, tp: int = 1, rank: int = 0) -> ModelShard:
        """The weights TP rank ``rank`` of ``tp`` uses: views of the resident tensors, built once."""
        key = (tp, rank)
        if key not in self._shards:
            if not self.valid_tp(tp) or not 0 <= rank < tp:
                raise ValueError(
                    f"TP {tp} does not divide this model ({self.spec.num_kv_heads} KV heads, "
                    f"{self.mlp_units} MLP units); valid degrees divide both"
                )
            if not self.holds(tp, rank):
                raise ValueError(
                    f"rank {rank} of TP {tp} is outside the resident slice (rank {self.resident_rank} of "
                    f"TP {self.resident_tp}); this worker can only run TP degrees that nest inside it"
                )
            self._shards[key] = ModelShard(self, tp, rank)
        return self._shards[key]

    def restrict_to(self, tp: int, rank: int) -> None:
        """Keep only the slice of rank ``rank`` at TP ``tp`` resident and free the rest.

        For models that do not fit whole on a slot: every higher TP degree whose rank nests inside
        this slice is still a view of it (aligned blocks nest), so switching among them moves
        no weight bytes. Lower degrees are no longer possible on this slot.
        """
        if (self.resident_tp, self.resident_rank) != (1, 0):
            raise ValueError("restrict_to can only be applied once, to the full model")
        part = self.shard(tp, rank)
        keep = [{k: t.clone() for k, t in layer.items()} for layer in part.layers]
        self.layers = keep  # the full tensors are dropped with the old list and the shard cache
        self._shards.clear()
        self.resident_tp, self.resident_rank = tp, rank

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes with every head (TP 1), in the model's dtype."""
        s = self.spec
        return s.num_layers * 2 * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    def new_kv_cache(self, num_slots: int) -> torch.Tensor:
        return self.shard().new_kv_cache(num_slots)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor) -> torch.Tensor:
        return self.shard().forward(input_ids, meta, kv)


class ModelShard:
    """One TP rank's slice of the model: column-parallel QKV / gate-up, row-parallel o / down.

    Every weight is a view of the resident full tensor (row blocks for column-parallel layers,
    column blocks for row-parallel ones), so switching TP moves no weight bytes. ``all_reduce`` is
    called twice per layer on the partial sums (identity at TP 1).
    """

    def __init__(self, model: LlamaModel, tp: int, rank: int) -> None:
        s = model.spec
        self.spec, self.tp, self.rank = s, tp, rank
        self.group = model.group
        self.num_kv_heads = s.num_kv_heads // tp
        self.embed, self.lm_head_t, self.final_norm = model.embed, model.lm_head_t, model.final_norm
        self.cos, self.sin = model.cos, model.sin
        self.device, self.dtype = model.device, model.dtype
        self.all_reduce = None  # set by the TP runtime: callable(tensor) -> None, in place
        qkv_rows = self.num_kv_heads * (self.group + 2) * s.head_dim
        q_cols = self.num_kv_heads * self.group * s.head_dim
        mlp_rows = 2 * s.intermediate_size // tp
        mlp_cols = s.intermediate_size // tp
        # Offsets are relative to the resident slice: with the whole model resident, local == rank.
        rank = rank - model.resident_rank * (tp // model.resident_tp)
        self.layers = []
        for w in model.layers:
            layer = {
                "qkv": w["qkv"][rank * qkv_rows : (rank + 1) * qkv_rows],
                "o": w["o"][:, rank * q_cols : (rank + 1) * q_cols],
                "gate_up": w["gate_up"][rank * mlp_rows : (rank + 1) * mlp_rows],
                "down": w["down"][:, rank * mlp_cols : (rank + 1) * mlp_cols],
                "ln1": w["ln1"],
                "ln2": w["ln2"],
            }
            if "qkv_bias" in w:
                layer["qkv_bias"] = w["qkv_bias"][rank * qkv_rows : (rank + 1) * qkv_rows]
            self.layers.append(layer)
        self.mlp_units = model.mlp_units // tp

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes on this rank (its heads only, in the model's dtype)."""
        s = self.spec
        return s.num_layers * 2 * self.num_kv_heads * s.head_dim * self.dtype.itemsize

    def new_kv_cache(self, num_slots: int) -> torch.Tensor:
        """KV for this rank's heads: [layers, 2, slots, kv_heads / tp, head_dim]."""
        s = self.spec
        shape = (s.num_layers, 2, num_slots, self.num_kv_heads, s.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] for the sampling rows in ``meta.logits_index``."""
        s = self.spec
        hd, nkv, grp = s.head_dim, self.num_kv_heads, self.group
        reduce = self.all_reduce if self.tp > 1 else None
        num_tokens = input_ids.shape[0]
        x = F.embedding(input_ids, self.embed)
        cos = self.cos[meta.positions].unsqueeze(1)  # [T, 1, hd]
        sin = self.sin[meta.positions].unsqueeze(1)
        for li, w in enumerate(self.layers):
            h = _rms_norm(x, w["ln1"], s.rms_norm_eps)
            qkv = F.linear(h, w["qkv"], w.get("qkv_bias")).view(num_tokens, nkv, grp + 2, hd)
            q = qkv[:, :, :grp].reshape(num_tokens, nkv * grp, hd)
            k = qkv[:, :, grp]
            v = qkv[:, :, grp + 1]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache, v_cache = kv[li, 0], kv[li, 1]
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
            # Gather whole blocks (contiguous block_size x heads x head_dim rows): far cheaper
            # than gathering token by token; padding and the tail of the last block are masked.
            k_blocks = k_cache.view(-1, meta.block_size, nkv, hd)
            v_blocks = v_cache.view(-1, meta.block_size, nkv, hd)
            all_decode = isinstance(meta.decode_rows, slice) and meta.decode_rows == slice(0, num_tokens)
            attn = q if all_decode else q.new_empty(num_tokens, nkv * grp, hd)
            if meta.decode_rows is not None:
                nb = meta.decode_blocks.shape[0]
                qd = q[meta.decode_rows].unsqueeze(2)  # [B, H, 1, hd]
                kd = (
                    k_blocks.index_select(0, meta.decode_blocks.view(-1))
                    .view(nb, -1, nkv, hd)
                    .transpose(1, 2)
                )
                vd = (
                    v_blocks.index_select(0, meta.decode_blocks.view(-1))
                    .view(nb, -1, nkv, hd)
                    .transpose(1, 2)
                )
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
                if attn is q:
                    attn = od.squeeze(2)
                else:
                    attn[meta.decode_rows] = od.squeeze(2)
            for start, n, ctx_blocks, ctx in meta.prefills or ():
                qp = q[start : start + n].transpose(0, 1)  # [H, n, hd]
                if ctx_blocks is None:
                    kp = k[start : start + n].transpose(0, 1)
                    vp = v[start : start + n].transpose(0, 1)
                    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
                else:
                    kp = k_blocks.index_select(0, ctx_blocks).view(-1, nkv, hd)[:ctx].transpose(0, 1)
                    vp = v_blocks.index_select(0, ctx_blocks).view(-1, nkv, hd)[:ctx].transpose(0, 1)
                    # The chunk's queries are the last n positions of the context.
                    mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
                    op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
                attn[start : start + n] = op.transpose(0, 1)
            out = F.linear(attn.reshape(num_tokens, -1), w["o"])
            if reduce is not None:
                reduce(out)  # row-parallel: sum the partial products of every rank
            x = x + out
            h = _rms_norm(x, w["ln2"], s.rms_norm_eps)
            gate_up = F.linear(h, w["gate_up"]).view(num_tokens, self.mlp_units, 2, -1)
            act = (F.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]).reshape(num_tokens, -1)
            out = F.linear(act, w["down"])
            if reduce is not None:
                reduce(out)
            x = x + out
        x = x[meta.logits_index]
        x = _rms_norm(x, self.final_norm, s.rms_norm_eps)
        return x @ self.lm_head_t


def load_model(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaModel:
    """Load a safetensors Llama-family checkpoint directory (config.json + *.safetensors) onto
    ``device`` in ``dtype`` (float32 on CPU, as the serving path runs; bfloat16 suits a GPU)."""
    path = Path(checkpoint_dir)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} has no config.json; pass an HF checkpoint directory or a .gguf file")
    hf_config = json.loads(cfg_path.read_text())
    spec = ModelSpec.from_config_dict(hf_config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update({k: t.to(device=device, dtype=dtype) for k, t in load_file(str(f)).items()})
    return LlamaModel(spec, weights, hf_config)
