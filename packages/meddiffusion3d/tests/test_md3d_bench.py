"""Bench registration: the demo cases run and report time and memory; the paper cases exist."""

from meddiffusion3d.bench import cases
from medsynth_core.bench import run_case


def test_demo_cases_run_and_paper_cases_registered():
    import torch

    results = [run_case(c, torch.device("cpu"), warmup=0, repeats=1) for c in cases("demo")]
    assert [r["name"] for r in results] == [
        "ae_stage1_train_step",
        "ae_encode_32",
        "ae_decode_32",
        "biflownet_train_step_8",
        "biflownet_sample_step_8",
    ]
    assert (
        results[3]["params"] == 430_168
        and results[3]["train_step_s"] > 0
        and results[4]["infer_latency_s"] > 0
    )
    assert results[0]["train_step_s"] > 0 and results[0]["params"] == 253_397
    assert all(r["peak_rss_mb"] > 0 for r in results) and results[1]["infer_latency_s"] > 0
    assert [c.name for c in cases("paper")] == [
        "ae_encode_256",
        "ae_decode_256",
        "biflownet_train_step_16",
        "biflownet_forward_16",
        "biflownet_sample_step_16",
        "controlnet_forward_16",
    ]
