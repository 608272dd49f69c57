"""bench.py's measurements, on tiny shapes: every row is a side-by-side ratio, and the fast path
trains to the same losses as the reference path within mixed-precision tolerance."""

import pytest
import torch

import bench
from train import fast_path, peak_flops

pytestmark = pytest.mark.slow

TINY_SHAPE = ("tiny", 2, 2, 64, 32, 4)
WIDE_SHAPE = ("wide", 2, 4, 256, 32, 4)  # wide enough for bf16 on a CPU that has it


def test_training_row_is_a_side_by_side_ratio():
    [row] = bench.bench_training(TINY_SHAPE, "cpu", repeats=1)
    assert row["metric"] == "train_tokens_per_s" and row["fast"] > 0 and row["reference"] > 0
    assert row["ratio"] == pytest.approx(row["fast"] / row["reference"])
    assert row["reference_settings"] == {"dtype": "float32", "compile": False, "fused_adamw": False,
                                         "sync_every_step": True}
    peak = peak_flops("cpu", torch.float32)  # the one peak train.py divides by too
    flops = bench.Trainer(TINY_SHAPE, row["fast_settings"] | {"fused_adamw": True, "sync_every_step": False},
                          "cpu").model.flops_per_token()
    assert row["fast_mfu"] == pytest.approx(flops * row["fast"] / peak)


def test_generation_and_eval_rows_compare_cache_and_modes():
    rows = bench.bench_generation("cpu", repeats=1, new_tokens=6, shape=TINY_SHAPE)
    assert [r["shape"] for r in rows] == ["tiny batch 1 short prompt", "tiny batch 1 half_block prompt",
                                          "tiny batch 8 short prompt", "tiny batch 8 half_block prompt"]
    assert all(r["fast"] > 0 and r["reference"] > 0 for r in rows)
    [row] = bench.bench_eval("cpu", repeats=1, eval_iters=2)
    assert row["metric"] == "eval_pass_seconds" and row["ratio"] > 0


def test_decode_rows_compare_the_default_dtype_with_float32_per_batch_size():
    rows = bench.bench_decode("cpu", repeats=1, new_tokens=4, shapes=((WIDE_SHAPE, 65),))
    assert [r["shape"] for r in rows] == ["wide batch 1", "wide batch 8"]
    assert all(r["metric"] == "decode_ms_per_token" and r["fast"] > 0 and r["reference"] > 0 for r in rows)
    assert {r["fast_dtype"] for r in rows} == {fast_path("cpu", WIDE_SHAPE[3])["dtype"]}
    assert rows[0]["ratio"] == pytest.approx(rows[0]["reference"] / rows[0]["fast"])


def test_fast_and_reference_paths_agree_in_loss():
    fast = {**fast_path("cpu", WIDE_SHAPE[3]), "fused_adamw": True, "sync_every_step": False}
    trainers = [bench.Trainer(WIDE_SHAPE, fast, "cpu"), bench.Trainer(WIDE_SHAPE, bench.reference_path("cpu"), "cpu")]
    losses = [[trainer.step(i).item() for i in range(8)] for trainer in trainers]
    tolerance = 0.03 if fast["dtype"] == "bfloat16" else 1e-4  # bf16 keeps ~3 significant digits
    for a, b in zip(*losses):
        assert abs(a - b) < tolerance
    assert losses[0][-1] < losses[0][0]


def test_fast_path_is_float32_for_narrow_models_on_cpu():
    assert fast_path("cpu", 128) == {"dtype": "float32", "compile": False}
    wide = fast_path("cpu", 384)["dtype"]
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert wide == ("bfloat16" if has_bf16 else "float32")


def test_data_bench_reports_speed_and_memory_for_both_tokenizers():
    rows = bench.bench_data(megabytes=1)
    assert [r["shape"].split(", ")[1] for r in rows] == ["char", "gpt2"]
    assert all(r["fast"] > 0 and r["fast_peak_rss_mb"] > 0 for r in rows)
