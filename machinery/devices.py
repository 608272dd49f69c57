"""
Devices and precision: which device a run uses, and what dtype='auto' and compile='auto' mean on it
(the settings measured fastest there). Training, sampling and the benchmarks all ask here.
"""

import torch

from machinery.cli import UsageError

# bf16 autocast on a CPU pays once matmuls dominate the casts: measured with bench.py on a 2-core
# AVX512-BF16 machine, it is slower at 128 wide and over twice as fast at 384 wide
CPU_BF16_MIN_WIDTH = 256


def device_type(dev):
    """'cuda:1' -> 'cuda', 'mps:0' -> 'mps', 'cpu' -> 'cpu': what autocast, GradScaler and the fast path key on."""
    return dev.split(":")[0]


def pick_device(requested):
    """'auto' -> the best available device; an explicit device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device_type(requested)
    if kind == "cuda":
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UsageError(f"device '{requested}' is not available on this machine; use --device=cpu "
                             "(or auto)")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("device 'mps' is not available on this machine; use --device=cpu (or auto)")
    elif requested != "cpu":
        raise UsageError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return requested


def fast_path(device_type, n_embd):
    """What dtype='auto' and compile='auto' mean here, and the dtype Muon orthogonalises in: the settings
    measured fastest on this device. Muon's Newton-Schulz steps take 16 ms per step of the CPU recipe in
    bfloat16 against 40 in float32 on one AVX512-BF16 core, but 34 times float32's time in emulated bfloat16
    on an AVX2 Zen 3 (docs chapter 9.10)."""
    if device_type == "cuda":
        bf16 = cuda_has_bf16()
        return {"dtype": "bfloat16" if bf16 else "float16", "compile": True,
                "muon_dtype": "bfloat16" if bf16 else "float32"}
    muon_dtype = "bfloat16" if device_type == "cpu" and cpu_has_bf16() else "float32"
    if device_type == "cpu" and cpu_has_bf16() and n_embd >= CPU_BF16_MIN_WIDTH:
        return {"dtype": "bfloat16", "compile": False, "muon_dtype": muon_dtype}
    return {"dtype": "float32", "compile": False, "muon_dtype": muon_dtype}


def cuda_has_bf16():
    """Whether this GPU runs bfloat16 natively (Ampere and later). PyTorch's plain check also says yes where
    it only emulates it (V100, T4), whose fast tensor-core dtype is float16."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_bf16():
    """Whether this CPU has bfloat16 matmul instructions; without them bfloat16 runs emulated, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(requested, device_type, n_embd):
    if requested == "auto":
        return fast_path(device_type, n_embd)["dtype"]
    if requested == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bfloat16; use --dtype=float16")
    return requested


def sync(dev):
    """Wait for the device to finish its queued work (a no-op on a CPU), so that a timer reads the truth."""
    if device_type(dev) == "cuda":
        torch.cuda.synchronize()
