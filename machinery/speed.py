"""
Speed: MFU (model FLOPs utilisation: the FLOPs a step needs per token, and the peak FLOP/s it divides by,
a GPU's data sheet where we know it, else this machine's measured matmul peak, kept in a small cache so
that every run divides by the same number), and how long a CPU run will take, said in one line before it
starts (the medians of a few timed training steps and evaluation batches, times the steps ahead).
"""

import json
import os
import platform
import re
import statistics
import time

import torch

from machinery.faults import atomic_write

def flops_per_token(model):
    """Forward + backward FLOPs per token of a GPT: 6 per parameter plus attention (PaLM appendix B)."""
    cfg = model.config
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    return 6 * model.num_params() + 12 * L * H * Q * T


def estimate_mfu(model, tokens_per_second, peak_flops):
    """Model FLOPs utilisation: the share of the device's peak FLOP/s that training uses."""
    return flops_per_token(model) * tokens_per_second / peak_flops


# Peak dense matmul throughput (FLOP/s) of known GPUs, from their vendors' data sheets (dense: half the
# figures "with sparsity"), used for MFU: name -> (bfloat16, float16, float32), None where the data sheet has
# none. A device name matches a row when it holds the row's name as whole words ('NVIDIA L40S' is not an L4,
# 'NVIDIA GH200' not an H200), and the first row that matches wins, so each variant comes before its family:
# 'NVIDIA H100 PCIe' and 'NVIDIA H100 NVL' get their own peaks, the SXM ('NVIDIA H100 80GB HBM3') the family's.
PUBLISHED_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 756e12, 51e12), "H100 NVL": (835e12, 835e12, 60e12), "H100": (989e12, 989e12, 67e12),
    "H200 NVL": (835e12, 835e12, 60e12), "H200": (989e12, 989e12, 67e12),
    "A100": (312e12, 312e12, 19.5e12), "V100": (None, 125e12, 15.7e12), "T4": (None, 65e12, 8.1e12),
    "L4": (121e12, 121e12, 30e12), "4090": (165e12, 165e12, 82.6e12),
}
PEAK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the order of each row's peaks


def published_peak_flops(device_name, dtype):
    """The data-sheet peak for a known GPU name (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
    for gpu, peaks in PUBLISHED_PEAK_FLOPS.items():
        if re.search(rf"\b{re.escape(gpu)}\b", device_name):
            return peaks[PEAK_DTYPES.index(dtype)] if dtype in PEAK_DTYPES else None
    return None


def measure_matmul_flops(device, dtype, seconds=2.0):
    """The best FLOP/s of square matmuls repeated for `seconds` on this device: the peak for MFU where
    no data sheet applies. The best, not the mean, because other programs can only slow a matmul down."""
    n = 4096 if device.startswith("cuda") else 1024  # large enough to keep the device busy
    rng = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=rng)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=rng)
    a @ b  # the first call pays for thread start-up and kernel selection
    best, spent, repeats = float("inf"), 0.0, 0
    while spent < seconds or repeats < 3:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return 2 * n ** 3 / best


# measured peaks, one per machine, device, dtype, thread count and PyTorch version; delete it to measure again
PEAK_FLOPS_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                "glassgpt", "peak_flops.json")


def peak_flops(dev, ptdtype):
    """The device's peak FLOP/s, which MFU divides by (train.py and bench.py alike): a GPU's data sheet
    if we know it, else this machine's matmul peak, measured once and kept in PEAK_FLOPS_CACHE so that
    every run divides by the same number."""
    if dev.startswith("cuda"):
        published = published_peak_flops(torch.cuda.get_device_name(dev), ptdtype)
        if published:
            return published
    key = peak_cache_key(dev, ptdtype)
    cache = read_peak_cache()
    if key not in cache:
        print(f"measuring this machine's matmul peak for MFU, once ({PEAK_FLOPS_CACHE})")
        cache = {**read_peak_cache(), key: measure_matmul_flops(dev, ptdtype)}
        try:
            os.makedirs(os.path.dirname(PEAK_FLOPS_CACHE), exist_ok=True)
            with atomic_write(PEAK_FLOPS_CACHE) as f:
                json.dump(cache, f, indent=1)
        except OSError:
            pass  # no writable cache folder: the next run measures again
    return cache[key]


def peak_cache_key(dev, ptdtype):
    """What a measured peak depends on: machine, device, dtype, threads and PyTorch version."""
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else torch.backends.cpu.get_cpu_capability()
    return (f"{platform.node()} | {dev.split(':')[0]} {name} | {ptdtype} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}")


def read_peak_cache():
    try:
        with open(PEAK_FLOPS_CACHE, encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: measure again
        return {}


def peak_warning():
    """What an MFU above 100% means: the cached peak, not the step, is wrong."""
    return (f"warning: MFU above 100%: the cached matmul peak was measured while the machine was busy; "
            f"delete {PEAK_FLOPS_CACHE} to measure it again")


# a CPU run longer than this, of a recipe that does not ask for a CPU, is likely sized for a GPU
GPU_SIZED_SECONDS = 3600


def say_how_long(model, X, Y, config, env, iter_num, evals):
    """Before a CPU run of one process trains: one line saying roughly how long it will take (how_long)."""
    if env.device_type != "cpu" or not env.master or env.ddp or config["eval_only"] or iter_num >= config["max_iters"]:
        return
    print(how_long(model, X, Y, env.autocast, env.accum_steps, config["max_iters"] - iter_num, evals,
                   2 * config["eval_iters"], any_device=config["device"] == "auto"))


def how_long(model, X, Y, autocast, accum_steps, steps, evals, eval_batches, any_device):
    """One line: roughly how long the run will take here, from the medians of a few timed training steps
    and evaluation batches on the first batch (one step alone can be several times off on a busy CPU).
    Weights, gradients and random state are left as they were.
    any_device: the recipe did not ask for a CPU (device='auto'), so it may well be sized for a GPU."""
    def train_step():
        with autocast:
            _, loss = model(X, Y)
        loss.backward()

    def eval_batch():
        with torch.inference_mode(), autocast:
            model(X, Y)

    with torch.random.fork_rng(devices=[]):  # dropout draws random numbers: training must not see them
        eval_batch()  # untimed: the first call pays for allocations and kernel selection
        step_s = median_seconds(train_step) * accum_steps
        batch_s = median_seconds(eval_batch)
        threads = torch.get_num_threads()
        one_thread_s = on_one_thread(train_step) * accum_steps if asks_threads(threads) else None
    model.zero_grad(set_to_none=True)
    total = steps * step_s + evals * eval_batches * batch_s
    line = (f"on this CPU a step takes about {step_s * 1000:,.0f} ms (measured): {steps:,} steps and {evals} "
            f"evaluation{'s' * (evals != 1)} of up to {eval_batches} batches will take about {duration(total)}")
    if total > GPU_SIZED_SECONDS and any_device:
        line += ("; this looks like a recipe sized for a GPU: on a CPU, config/shakespeare_char_cpu.py trains "
                 "a smaller model in minutes")
    advice = thread_advice(step_s, one_thread_s, threads, cpu_load(), cpu_cores())
    return f"{line}\n{advice}" if advice else line


# One thread or all of them? On a CPU that other programs keep busy, PyTorch's threads wait for each other
# at every operation, and a step can take many times longer than on one thread. Measured on a 2-core
# AMD EPYC (Zen 4: lscpu family 25 model 17, AVX-512 with bfloat16), PyTorch 2.13, the CPU recipe's step
# (4 x 4 x 128, 16 x 64 tokens, Muon: forward, backward, optimizer step), medians of 30-40 steps,
# one thread and two interleaved (2026-12-06; load: the load average over the last minute):
#   shared with other jobs, load 2.7-3.4, 6 runs:  1 thread 124-138 ms, 2 threads   160-510 ms (1.2x-4.1x)
#   shared with other jobs, load 4.1:              1 thread     183 ms, 2 threads       854 ms (4.7x; worst 10 s)
#   and one busy loop besides (load 5.9):          1 thread     427 ms, 2 threads     2,456 ms (5.7x)
#   and two busy loops besides (load 6.7):         1 thread     416 ms, 2 threads     4,202 ms (10x)
#   the machine to itself (no other job; later that day), 80-step runs, the last 6 logged steps:
#                                                  1 thread 108-115 ms, 2 threads     69-73 ms (0.63x)
# Two threads are ahead whenever they get both cores, as on chapter 4's nearly idle Zen 5 (46.5 ms a step on
# two threads); one thread wins by 1.2x to 10x once other programs take the cores.
# So before a CPU run on several threads (and OMP_NUM_THREADS unset), how_long also times the step on one
# thread; one line suggests OMP_NUM_THREADS=1 when one thread is ONE_THREAD_GAIN times faster, or when the
# other processes alone keep every core busy (the load average, less our own process, at least the cores).
ONE_THREAD_GAIN = 1.25


def asks_threads(threads):
    """Whether to time one thread too: the run uses several and nobody has chosen how many."""
    return threads > 1 and "OMP_NUM_THREADS" not in os.environ


def on_one_thread(work):
    """median_seconds(work) with PyTorch on one thread, then its threads as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return median_seconds(work)
    finally:
        torch.set_num_threads(threads)


def cpu_load():
    """The load average over the last minute (runnable processes, ours included), or 0 where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_advice(step_s, one_thread_s, threads, load, cores):
    """The line suggesting OMP_NUM_THREADS=1 (see the measurements above), or '' when threads are no trouble.
    one_thread_s: a step measured on one thread (None: not measured)."""
    if one_thread_s is None or threads <= 1:
        return ""
    faster = step_s >= ONE_THREAD_GAIN * one_thread_s
    busy = load - 1 >= cores
    if not (faster or busy):
        return ""
    state = f"the CPU is busy (load average {load:.1f} on {cores} cores)"
    if faster:
        return (f"note: a step takes {step_s * 1000:,.0f} ms on {threads} threads but {one_thread_s * 1000:,.0f} ms "
                f"on one here{f'; {state}' if busy else ''}: OMP_NUM_THREADS=1 python train.py ... is likely faster")
    return (f"note: {state}: {threads} threads that wait for each other can make steps several times slower as the "
            "run goes on; OMP_NUM_THREADS=1 python train.py ... is steadier")


TIMED_RUNS, TIMING_BUDGET_S = 5, 2.0  # a model whose step takes seconds is timed fewer times (at least once)


def median_seconds(work):
    """The median duration of up to TIMED_RUNS calls of work(), stopping early once TIMING_BUDGET_S is spent."""
    times = []
    while len(times) < TIMED_RUNS and sum(times) < TIMING_BUDGET_S:
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def duration(seconds):
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
