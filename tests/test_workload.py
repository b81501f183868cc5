"""Trace readers, synthetic workload, scaling, tiers and goodput accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import traces_dir
from nitsum_core import workload as wl
from nitsum_core.config import Tier, check_tier, load_tiers
from nitsum_core.errors import UnknownTier
from nitsum_core.policy.goodput import RequestRecord, format_report, meets_slo, percentile, summarize


def test_read_azure_traces() -> None:
    conv = wl.read_trace(traces_dir() / "AzureLLMInferenceTrace_conv.csv")
    code = wl.read_azure(traces_dir() / "AzureLLMInferenceTrace_code.csv")
    assert len(conv) == 19366 and len(code) == 8819
    assert conv[0].arrival_s == 0.0 and (conv[0].prompt_tokens, conv[0].output_tokens) == (374, 44)
    assert conv[-1].arrival_s == pytest.approx(3501.7, abs=0.1)
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(conv, conv[1:], strict=False))
    assert np.mean([r.output_tokens for r in conv]) == pytest.approx(211.1, abs=0.1)


def test_read_burstgpt_both_versions_skip_failures() -> None:
    v1 = wl.read_trace(traces_dir() / "burstgpt_slice.csv")
    v3 = wl.read_burstgpt(traces_dir() / "burstgpt3_slice.csv")
    assert len(v1) == 400 - 17 and len(v3) == 400 - 1
    assert {r.log_type for r in v1} == {"Conversation log", "API log"}
    assert len(wl.read_burstgpt(traces_dir() / "burstgpt_slice.csv", keep_failed=True)) == 400


def test_malformed_trace_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,5\n2023-11-16 18:17:04,abc,5\n"
    )
    with pytest.raises(wl.TraceError, match=r"bad\.csv: line 3"):
        wl.read_trace(bad)
    trunc = tmp_path / "trunc.csv"
    trunc.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,472\n")
    with pytest.raises(wl.TraceError, match=r"trunc\.csv: line 2"):
        wl.read_trace(trunc)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(wl.TraceError, match="unknown trace format"):
        wl.read_trace(other)
    with pytest.raises(wl.TraceError, match="cannot open"):
        wl.read_trace(tmp_path / "missing.csv", "azure")


def test_synthetic_workload_matches_the_trace_it_was_fitted_to() -> None:
    conv = wl.read_azure(traces_dir() / "AzureLLMInferenceTrace_conv.csv")
    fit = wl.AZURE_CONV_FIT
    logs_in = np.log([r.prompt_tokens for r in conv])
    logs_out = np.log([r.output_tokens for r in conv])
    assert fit["prompt_log_mu"] == pytest.approx(logs_in.mean(), abs=0.01)
    assert fit["prompt_log_sigma"] == pytest.approx(logs_in.std(), abs=0.01)
    assert fit["output_log_mu"] == pytest.approx(logs_out.mean(), abs=0.01)
    assert fit["output_log_sigma"] == pytest.approx(logs_out.std(), abs=0.01)
    assert fit["rate_per_s"] == pytest.approx((len(conv) - 1) / conv[-1].arrival_s, rel=0.01)
    syn = wl.synthetic_azure_conv(20000, seed=1)
    assert np.median([r.output_tokens for r in syn]) == pytest.approx(np.exp(fit["output_log_mu"]), rel=0.05)
    rate = (len(syn) - 1) / syn[-1].arrival_s
    assert rate == pytest.approx(fit["rate_per_s"], rel=0.05)
    assert wl.synthetic_azure_conv(50, seed=3) == wl.synthetic_azure_conv(50, seed=3)


def test_scaling_windows_merging_and_tiers() -> None:
    reqs = [wl.TraceRequest(float(t), 100 * (t + 1), 10) for t in range(11)]
    fast = wl.scale_rate(reqs, 5.0)
    assert (len(fast) - 1) / fast[-1].arrival_s == pytest.approx(5.0)
    small = wl.scale_tokens(reqs, 0.1, max_prompt=50, max_output=4)
    assert [r.prompt_tokens for r in small][:6] == [10, 20, 30, 40, 50, 50] and {
        r.output_tokens for r in small
    } == {1}
    win = wl.window(reqs, 3.0, 4.0)
    assert [r.arrival_s for r in win] == [0.0, 1.0, 2.0, 3.0]
    merged = wl.merge(wl.assign_tiers(reqs[:3], {"agent": 1}), wl.assign_tiers(win, {"background": 1}))
    assert [r.arrival_s for r in merged] == sorted(r.arrival_s for r in merged)
    mixed = wl.assign_tiers(
        wl.synthetic_azure_conv(3000), wl.parse_tier_mix("interactive=0.5,agent=0.3,background=0.2")
    )
    share = sum(r.tier == "agent" for r in mixed) / len(mixed)
    assert share == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError, match="bad tier mix"):
        wl.parse_tier_mix("interactive:0.5")


def test_tiers_toml(tmp_path: Path) -> None:
    tiers = load_tiers()
    assert list(tiers) == ["interactive", "agent", "background"]
    assert tiers["interactive"].ttft_s < tiers["background"].ttft_s
    with pytest.raises(UnknownTier, match="known tiers"):
        check_tier(tiers, "gold")
    f = tmp_path / "t.toml"
    f.write_text("[tiers.chat]\nttft_s = 0.5\ntpot_s = 0.05\n")
    assert load_tiers(f)["chat"] == Tier("chat", 0.5, 0.05, 0)
    f.write_text("[tiers.chat]\nttft_s = 0.5\n")
    with pytest.raises(ValueError, match="missing 'tpot_s'"):
        load_tiers(f)
    f.write_text("[tiers.chat]\nttft_s = 0.5\ntpot_s = 1\nspeed = 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_tiers(f)
    f.write_text("tiers = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_tiers(f)
    f.write_text('[tiers."chat+bulk"]\nttft_s = 0.5\ntpot_s = 1\n')  # plans hold typed tier sets: any name
    assert list(load_tiers(f)) == ["chat+bulk"]


def test_goodput_counts_requests_meeting_both_targets() -> None:
    tiers = {"fast": Tier("fast", 1.0, 0.1, 0), "slow": Tier("slow", 10.0, 1.0, 1)}
    recs = [
        RequestRecord("fast", 0.0, 10, 20, 0.5, 0.05),  # meets both
        RequestRecord("fast", 0.1, 10, 20, 1.5, 0.05),  # TTFT miss
        RequestRecord("fast", 0.2, 10, 20, 0.5, 0.2),  # TPOT miss
        RequestRecord("fast", 0.3, 10, 1, 0.5, 0.0),  # one token: no TPOT, meets
        RequestRecord("slow", 0.4, 10, 0, None, None, error="worker_lost"),
        RequestRecord("slow", 0.5, 10, 50, 9.0, 0.9),
    ]
    assert [meets_slo(r, tiers[r.tier]) for r in recs] == [True, False, False, True, False, True]
    rep = summarize(recs, tiers, duration_s=10.0, num_gpus=2)
    assert (
        rep.met_slo == 3
        and rep.goodput_rps == pytest.approx(0.3)
        and rep.goodput_per_gpu_rps == pytest.approx(0.15)
    )
    fast, slow = rep.tiers
    assert (fast.tier, fast.attainment, fast.failed) == ("fast", 0.5, 0)
    assert (slow.attainment, slow.failed, slow.completed) == (0.5, 1, 1)
    assert fast.ttft_p50_s == pytest.approx(0.5) and fast.tpot_p90_s == pytest.approx(
        percentile([0.05, 0.05, 0.2], 90)
    )
    assert "goodput 0.300 req/s" in format_report(rep)
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(np.percentile([1, 2, 3, 4], 50))
    assert math.isnan(percentile([], 50))
