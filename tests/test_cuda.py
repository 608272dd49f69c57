"""The CUDA paths: exact cached decoding replayed as a CUDA graph, the NaN guard decided on the device,
and training that never waits for the GPU between logs. Skipped where there is no GPU (CI has none:
a GPU machine runs them with `python -m pytest -q tests/test_cuda.py`)."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY
from machinery.decoding import DecodeStep
from model import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)).cuda().eval()


@pytest.mark.parametrize("compile", [False, True])
def test_graph_replayed_decode_step_equals_the_uncached_forward_in_float32(compile):
    model = gpu_model()
    tokens = torch.randint(0, 65, (2, 256), device="cuda")
    caches = [KVCache(256) for _ in range(6)]
    worst = 0.0
    with torch.no_grad():
        model(tokens[:, :8], caches=caches, pos=torch.arange(8, device="cuda"))
        step = DecodeStep(model, caches, 2, compile=compile)
        for p in range(8, 256):
            logits = step(tokens[:, p:p + 1], p)
            full, _ = model(tokens[:, :p + 1])
            worst = max(worst, (logits - full).abs().max().item())
    assert step.graph is not None  # it really was replayed as a CUDA graph
    assert worst <= 1e-5


def test_cached_greedy_tokens_equal_uncached_on_cuda():
    model = gpu_model()
    prompt = torch.randint(0, 65, (1, 4), device="cuda")
    cached = model.generate(prompt, 300, temperature=0, kv_cache=True)  # past block_size: re-prefills too
    assert torch.equal(cached[:, :256], model.generate(prompt, 252, temperature=0, kv_cache=False))


def test_fused_adamw_skips_a_flagged_step_on_the_device():
    from types import SimpleNamespace
    from machinery.health import Guard
    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    env = SimpleNamespace(device="cuda", device_type="cuda", fsdp=False)
    guard = Guard([opt], scaler, 3, env, None, None, None)
    assert guard.on_device
    p.grad = torch.full_like(p, float("nan"))
    assert guard.allows_step(torch.tensor(1.0, device="cuda"), p.grad.norm())  # the device decides, not the host
    scaler.step(opt)  # as train.py's loop takes it
    assert bool((p == 1).all()) and opt.state[p]["step"].item() == 0
    p.grad = torch.ones_like(p)
    assert guard.allows_step(torch.tensor(1.0, device="cuda"), p.grad.norm())
    scaler.step(opt)
    assert bool((p < 1).all()) and opt.state[p]["step"].item() == 1


def count_syncs(data_dir, out, iters, *extra):
    """Host-device synchronisations of a whole train.py run, as CUDA's sync debug mode reports them."""
    code = ("import runpy, sys, warnings, torch; torch.cuda.set_sync_debug_mode(1); warnings.simplefilter('always');"
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    args = [a for a in TINY if not a.startswith(("--device", "--dtype"))]
    result = subprocess.run([sys.executable, "-c", code, f"{ROOT}/train.py", *args, f"--data_dir={data_dir}",
                             "--dataset=tiny", f"--out_dir={out}", f"--max_iters={iters}", "--eval_interval=100000",
                             "--eval_at_start=False", "--log_interval=50", "--monitor_interval=50",
                             "--replace_earlier_run=True", *extra], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr.count("called a synchronizing CUDA operation")


def test_training_reads_the_device_only_at_logs(char_data, tmp_path):
    # 100 more steps hold 2 more logs and 2 more update-ratio measurements: two reads each, nothing per step
    extra = count_syncs(char_data, tmp_path / "b", 200) - count_syncs(char_data, tmp_path / "a", 100)
    assert extra <= 4


def test_a_muon_run_reads_the_device_only_at_logs(char_data, tmp_path):
    """Muon skips a flagged step on the device too (machinery/optimizers.py: Muon.step with found_inf): per step, ≤ 0.1 reads."""
    extra = count_syncs(char_data, tmp_path / "b", 200, "--optimizer=muon") - \
        count_syncs(char_data, tmp_path / "a", 100, "--optimizer=muon")
    assert extra / 100 <= 0.1
