"""Shared fixtures: a real nats-server, real checkpoints, real stacks of service processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import RequestParams
from nitsum_core.perf.model_spec import ModelSpec
from nitsum_core.perf.perf_model import layer_params
from nitsum_core.wire.bus import EmbeddedNats

REPO = Path(__file__).resolve().parent.parent
TRACES = Path(os.environ.get("NITSUM_TRACES", REPO.parent / "shared" / "traces"))


def traces_dir() -> Path:
    if not TRACES.is_dir():
        pytest.skip(f"trace directory {TRACES} not present (set NITSUM_TRACES)")
    return TRACES


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted to safetensors (cached under ~/.cache/nitsum)."""
    return resolve_checkpoint("smollm2")


def write_tiny_llama(path: Path, tokenizer_from: Path, seed: int = 0, **overrides: int) -> Path:
    """A small random-initialised Llama checkpoint saved as a real HF safetensors directory.

    It shares SmolLM2's vocabulary so the router can tokenise for it. Weights are drawn with a
    large std so logits are peaked: greedy comparisons then test the maths, not float ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        src = tokenizer_from / name
        if src.exists():
            shutil.copy(src, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a free port, stopped after the test."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def load_hf(path: Path):  # noqa: ANN201 - transformers model
    """HF transformers' own model on the same checkpoint: the correctness reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    """HF ``generate`` greedy continuation of ``prompt`` (n new tokens at most, stops at EOS)."""
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


# Crosses 4-token KV block boundaries as it prefills and decodes.
PAGED_PROMPT = [5, 17, 923, 4000, 12, 7, 300, 31, 8, 44, 2001]


def paged_logits(model, engine, references: list, steps: int = 6):  # noqa: ANN001, ANN201
    """Prefill ``PAGED_PROMPT`` through ``engine``'s paged cache, then decode ``steps - 1`` tokens
    (the first reference's greedy picks); yield each step's last-token logits: ours as the model
    returns them, and every reference's on the whole sequence so far (CPU, float32)."""
    engine.add_request("paged", PAGED_PROMPT, RequestParams(max_tokens=steps))
    tokens = list(PAGED_PROMPT)
    for _ in range(steps):
        plan = engine.scheduler.schedule()
        ids, meta = engine._build_metadata(plan)
        ours = model.forward(ids, meta, engine.kv)[0]
        with torch.inference_mode():
            refs = [ref(torch.tensor([tokens])).logits[0, -1].float() for ref in references]
        yield ours, refs
        nxt = int(refs[0].argmax())
        plan[0].seq.num_computed = len(tokens)
        plan[0].seq.token_ids.append(nxt)
        tokens.append(nxt)


def shares_storage(view: torch.Tensor, resident: torch.Tensor) -> bool:
    """True when ``view`` is a view into ``resident``'s memory (no weight bytes were copied)."""
    return view.untyped_storage().data_ptr() == resident.untyped_storage().data_ptr()


def total_params(s: ModelSpec) -> int:
    """Every parameter of the model (the LM head counted once when tied to the embedding)."""
    head = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
    return s.num_layers * layer_params(s) + s.vocab_size * s.hidden_size + head
