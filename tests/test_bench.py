"""bench.py's measurements, on tiny shapes: every row is a side-by-side ratio, and the fast path
trains to the same losses as the reference path within mixed-precision tolerance."""

import pytest
import torch

import bench
from machinery import devices
from machinery.devices import fast_path
from machinery.speed import flops_per_token, peak_flops

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
    flops = flops_per_token(bench.Trainer(TINY_SHAPE, row["fast_settings"] | {"fused_adamw": True,
                                                                              "sync_every_step": False}, "cpu").model)
    assert row["fast_mfu"] == pytest.approx(flops * row["fast"] / peak)


def test_the_reference_adamw_is_nanogpts_on_a_cpu():
    """nanoGPT passes fused=True on CUDA only, so on a CPU PyTorch picks: its for-loop AdamW, not foreach."""
    from torch.optim.optimizer import _default_to_fused_or_foreach
    reference = bench.Trainer(TINY_SHAPE, bench.reference_path("cpu"), "cpu").optimizer
    assert reference.defaults["fused"] is None and reference.defaults["foreach"] is None
    params = reference.param_groups[0]["params"]
    assert _default_to_fused_or_foreach(params, differentiable=False, use_fused=False) == (False, False)
    fast = bench.Trainer(TINY_SHAPE, {**fast_path("cpu", TINY_SHAPE[3]), "fused_adamw": True,
                                      "sync_every_step": False}, "cpu").optimizer
    assert fast.defaults["fused"] is True


@pytest.mark.parametrize("name, bf16_tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                               ("NVIDIA H100 NVL", 835), ("NVIDIA H200 NVL", 835),
                                               ("NVIDIA L40S", None), ("NVIDIA L4", 121), ("NVIDIA RTX A1000", None),
                                               ("NVIDIA A100-SXM4-80GB", 312), ("Tesla T4", None)])
def test_the_published_peak_is_the_variants_own(name, bf16_tflops):
    """Whole words, variants first: an H100 PCIe or NVL is not the SXM, an L40S is not an L4."""
    from machinery.speed import published_peak_flops
    peak = published_peak_flops(name, torch.bfloat16)
    assert (peak and peak / 1e12) == bf16_tflops


def test_generation_and_eval_rows_compare_cache_and_modes():
    rows = bench.bench_generation("cpu", repeats=1, new_tokens=6, shape=TINY_SHAPE)
    assert [r["shape"] for r in rows] == ["tiny batch 1 short prompt", "tiny batch 1 half_block prompt",
                                          "tiny batch 8 short prompt", "tiny batch 8 half_block prompt"]
    assert all(r["fast"] > 0 and r["ratio"] == pytest.approx(r["fast"] / r["reference"]) for r in rows)
    [row] = bench.bench_eval("cpu", repeats=1, eval_iters=2)
    assert row["metric"] == "eval_pass_seconds" and row["ratio"] == pytest.approx(row["reference"] / row["fast"])


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
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    native = "bfloat16" if has_bf16 else "float32"  # Muon orthogonalises in bfloat16 only where it is not emulated
    assert fast_path("cpu", 128) == {"dtype": "float32", "compile": False, "muon_dtype": native}
    assert fast_path("cpu", 384)["dtype"] == native


@pytest.mark.parametrize("has_bf16", [True, False])
def test_fast_path_orthogonalises_muon_in_bfloat16_only_on_a_cpu_that_has_it(monkeypatch, has_bf16):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: has_bf16)
    native = "bfloat16" if has_bf16 else "float32"
    assert fast_path("cpu", 128) == {"dtype": "float32", "compile": False, "muon_dtype": native}
    assert fast_path("cpu", 384) == {"dtype": native, "compile": False, "muon_dtype": native}


@pytest.mark.parametrize("native, emulated, dtype", [(True, True, "bfloat16"), (False, True, "float16"),
                                                     (False, False, "float16")])
def test_fast_path_on_a_gpu_takes_bfloat16_only_where_it_is_not_emulated(monkeypatch, native, emulated, dtype):
    """A V100 or T4 answers yes to PyTorch's plain bfloat16 check (it emulates it); its tensor cores run float16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (emulated and including_emulation))
    path = fast_path("cuda", 768)
    assert path == {"dtype": dtype, "compile": True, "muon_dtype": "bfloat16" if native else "float32"}


def test_data_bench_reports_speed_and_memory_for_both_tokenizers():
    rows = bench.bench_data(megabytes=1)
    assert [r["shape"].split(", ")[1] for r in rows] == ["char", "gpt2"]
    assert all(r["fast"] > 0 and r["fast_peak_rss_mb"] > 0 for r in rows)


def test_whole_split_loss_scores_each_non_overlapping_window_once_for_both_checkpoint_kinds(tmp_path):
    from machinery.checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True, vocab_size=11, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    save_checkpoint(str(tmp_path / "ours.pt"), {"model": model.state_dict()},
                    {"model_args": args, "tokenizer": {"kind": "char", "chars": list("abcdefghijk")}})
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 5}, tmp_path / "nanogpt.pt")  # nanoGPT's layout
    val = torch.randint(0, 11, (8 * 5 + 3,)).numpy().astype("uint16")  # 5 whole windows, 3 tokens left over
    with torch.no_grad():
        by_hand = [model(torch.from_numpy(val[i:i + 8].astype("int64"))[None],
                         torch.from_numpy(val[i + 1:i + 9].astype("int64"))[None])[1].item() for i in range(0, 40, 8)]
    for name in ("ours.pt", "nanogpt.pt"):
        assert bench.whole_split_loss(tmp_path / name, val, block_size=8) == pytest.approx(sum(by_hand) / 5, rel=1e-6)


def test_recipe_needs_a_nanogpt_checkout_and_says_so_in_one_line(tmp_path):
    from conftest import run_script
    result = run_script("bench.py", "--recipe", f"--nanogpt={tmp_path}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not a nanoGPT checkout" in result.stderr and "git clone https://github.com/karpathy/nanoGPT" in result.stderr


# bench.py with tiny training shapes, stopped as by Ctrl-C when it reaches the monitor measurement
INTERRUPTED_BENCH = """
import os, signal, sys
import bench
from machinery.cli import run_cli
bench.DEFAULT_SHAPES = [("tiny", 2, 2, 64, 32, 4), ("tiny2", 1, 2, 32, 16, 2)]
def ctrl_c(*args):
    os.kill(os.getpid(), signal.SIGINT)
bench.bench_monitor = ctrl_c
sys.argv = ["bench.py", *sys.argv[1:]]
run_cli(bench.main, bench.INTERRUPTED)
"""


def test_bench_prints_each_row_as_it_is_measured_and_an_interrupt_keeps_them(tmp_path):
    from conftest import run_script
    wrapper = tmp_path / "interrupted_bench.py"
    wrapper.write_text(INTERRUPTED_BENCH, encoding="utf-8")
    result = run_script(wrapper, "--repeats=1", "--device=cpu", "--json")
    assert result.returncode == 130 and "Traceback" not in result.stderr
    header, tiny, tiny_json, tiny2, tiny2_json = result.stdout.splitlines()
    assert header.startswith("device cpu | torch ") and "mfu_peak_gflops" in header
    assert tiny.startswith("train_tokens_per_s") and " tiny " in tiny and '"shape": "tiny"' in tiny_json
    assert " tiny2 " in tiny2 and '"shape": "tiny2"' in tiny2_json
    *progress, last = result.stderr.strip().splitlines()
    assert progress == ["measuring training tokens/s, tiny, fast path vs reference ...",
                        "measuring training tokens/s, tiny2, fast path vs reference ..."]
    assert last == f"interrupted by SIGINT; {bench.INTERRUPTED}"


def test_rows_of_a_multi_row_measurement_are_shown_as_each_finishes(capsys):
    shown = []
    rows = bench.bench_generation("cpu", repeats=1, new_tokens=2, shape=TINY_SHAPE,
                                  show=lambda row: shown.append((row["shape"], capsys.readouterr().err)))
    assert [row["shape"] for row in rows] == [shape for shape, _ in shown]
    assert all(err.strip() == f"measuring generation tokens/s, {shape}, KV cache vs none ..." for shape, err in shown)
