"""The CUDA path of the engine and `nitsum profile`, run only where torch sees a GPU.

CI machines have none (these tests skip there); on a GPU machine with a CUDA build of torch,
`pytest tests/test_cuda.py` is the check to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PAGED_PROMPT, load_hf, paged_logits
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bfloat16_on_the_gpu_is_within_rounding_of_the_fp32_reference(smollm2_dir: Path) -> None:
    model = load_model(smollm2_dir, device="cuda", dtype=torch.bfloat16)
    ref = load_hf(smollm2_dir)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_mb=8), eos_token_ids=set())
    assert engine.kv.is_cuda
    for ours, (exact,) in paged_logits(model, engine, [ref]):
        assert ours.is_cuda
        assert float((ours.float().cpu() - exact).abs().max()) < 0.04 * float(exact.abs().max())
    # A whole generation (greedy and seeded sampling) runs through the GPU path.
    engine = Engine(model, EngineConfig(), eos_token_ids=set())
    out = engine.generate([PAGED_PROMPT, [1, 2, 3]], RequestParams(max_tokens=8, temperature=0.8, seed=1))
    assert [len(o) for o in out] == [8, 8]


def test_nitsum_profile_on_the_gpu_fits_its_steps(smollm2_dir: Path, tmp_path: Path) -> None:
    from nitsum_cli.main import main

    out = tmp_path / "coef.json"
    from nitsum_cli.profile import gpu_hardware

    if gpu_hardware(torch.cuda.get_device_name()) is None:
        pytest.skip(f"no hardware spec for {torch.cuda.get_device_name()}")
    argv = ["profile", "--model", str(smollm2_dir), "--device", "cuda"]  # the spec from the GPU's name
    with pytest.raises(SystemExit) as done:
        main([*argv, "--repeats", "3", "--out", str(out)])
    assert done.value.code == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["device"] == torch.cuda.get_device_name()
    assert report["hardware"] == gpu_hardware(torch.cuda.get_device_name())
    assert report["mean_sq_log_error"] <= report["mean_sq_log_error_unfitted"]
