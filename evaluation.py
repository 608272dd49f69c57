"""
Loss over a split: sampled windows (an estimate, the same ones at every evaluation) or every
non-overlapping window once (the split's exact loss). train.py's estimate_loss and bench.py score with these.
"""

from contextlib import nullcontext

import torch

from data import windows_at
from distributed import all_reduce_sum


def sampled_starts(n_tokens, block_size, batch_size, eval_iters, seed):
    """eval_iters batches of random window starts, drawn from their own seeded RNG: the same every time."""
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(n_tokens - block_size, (batch_size,), generator=rng) for _ in range(eval_iters)]


def whole_split_starts(n_tokens, block_size, batch_size, rank=0, world_size=1):
    """Every non-overlapping block_size window once, in batches; with several processes each takes a share."""
    n_windows = (n_tokens - 1) // block_size  # the last window needs one more token as its target
    mine = torch.arange(rank, n_windows, world_size) * block_size
    return list(torch.split(mine, batch_size))


def mean_loss(model, data, batches_of_starts, block_size, dev, autocast=nullcontext(), ddp=False):
    """Mean loss of the windows starting at each batch's positions (averaged over all processes with ddp:
    collective)."""
    total, count = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for starts in batches_of_starts:
        X, Y = windows_at(data, starts, block_size, dev)
        with autocast:
            _, loss = model(X, Y)
        total += loss.float() * len(starts)  # the loss is a mean over the batch: weight by its size
        count += len(starts)
    if ddp:
        all_reduce_sum(total, count)
    return (total / count).item()
