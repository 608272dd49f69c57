"""
How long a CPU run will take, said in one line before it starts: the medians of a few timed training
steps and evaluation batches, times the steps and evaluations ahead.
"""

import statistics
import time

import torch

# a CPU run longer than this, of a recipe that does not ask for a CPU, is likely sized for a GPU
GPU_SIZED_SECONDS = 3600


def evals_ahead(start, max_iters, eval_interval, eval_first):
    """How many evaluations the loop will make from iteration start on (without early stopping)."""
    multiples = max_iters // eval_interval - (start - 1) // eval_interval  # of eval_interval in [start, max_iters]
    final = max_iters % eval_interval != 0  # the last iteration is always evaluated
    return multiples + final - ((start % eval_interval == 0 or start == max_iters) and not eval_first)


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
    model.zero_grad(set_to_none=True)
    total = steps * step_s + evals * eval_batches * batch_s
    line = (f"on this CPU a step takes about {step_s * 1000:,.0f} ms (measured): {steps:,} steps and {evals} "
            f"evaluation{'s' * (evals != 1)} of up to {eval_batches} batches will take about {duration(total)}")
    if total > GPU_SIZED_SECONDS and any_device:
        line += ("; this looks like a recipe sized for a GPU: on a CPU, config/shakespeare_char_cpu.py trains "
                 "a smaller model in minutes")
    return line


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
