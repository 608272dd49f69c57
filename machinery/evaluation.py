"""
Evaluation: when the loop evaluates, the loss over a split, and what an evaluation means for the run (the
best val loss so far, early stopping). The loss is over sampled windows (an estimate, the same ones at every
evaluation) or over every non-overlapping window once (the split's exact loss). bench.py scores with these too.
"""

from contextlib import nullcontext

import torch
from tqdm import tqdm

from machinery.distributed import all_reduce_sum
from machinery.run_folder import EvalAbandoned


def sampled_starts(n_tokens, block_size, batch_size, eval_iters, seed):
    """eval_iters batches of random window starts, drawn from their own seeded RNG: the same every time."""
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(n_tokens - block_size, (batch_size,), generator=rng) for _ in range(eval_iters)]


def whole_split_starts(n_tokens, block_size, batch_size, rank=0, world_size=1):
    """Every non-overlapping block_size window once, in batches; with several processes each takes a share."""
    n_windows = (n_tokens - 1) // block_size  # the last window needs one more token as its target
    mine = torch.arange(rank, n_windows, world_size) * block_size
    return list(torch.split(mine, batch_size))


def mean_loss(model, batches, dev, autocast=nullcontext(), ddp=False):
    """Mean loss over batches of windows (x, y) (averaged over all processes with ddp: collective)."""
    total, count = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for X, Y in batches:
        with autocast:
            _, loss = model(X, Y)
        total += loss.float() * len(X)  # the loss is a mean over the batch: weight by its size
        count += len(X)
    if ddp:
        all_reduce_sum(total, count)
    return (total / count).item()


def evals_ahead(start, max_iters, eval_interval, eval_first):
    """How many evaluations the loop will make from iteration start on (without early stopping)."""
    multiples = max_iters // eval_interval - (start - 1) // eval_interval  # of eval_interval in [start, max_iters]
    final = max_iters % eval_interval != 0  # the last iteration is always evaluated
    return multiples + final - ((start % eval_interval == 0 or start == max_iters) and not eval_first)


class Evaluations:
    """The loop's evaluations: when one is due, the train and val loss (logged and recorded), the best val
    loss so far, whether the last one improved it, and early stopping after `patience` evaluations without."""

    def __init__(self, model, raw_model, train_data, val_data, windows_at, config, env, stop, metrics, iter_num,
                 best_val_loss, evaluated):
        self.model, self.raw_model, self.env, self.stop, self.metrics = model, raw_model, env, stop, metrics
        self.data = {"train": train_data, "val": val_data}
        self.windows_at = windows_at  # data.py's: the (x, y) windows at given starts
        self.c, self.first_iter = config, iter_num
        # evaluate before the first step unless not asked to, or the checkpoint's state was evaluated already
        self.eval_first = not evaluated if config["init_from"] == "resume" else config["eval_at_start"]
        self.best_val_loss, self.improved, self.without_gain = best_val_loss, False, 0
        self.evaluated_at = iter_num if evaluated and config["init_from"] == "resume" else None
        self.last_val = None

    def due(self, iter_num):
        c = self.c
        due = c["eval_only"] or iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]
        return due and not (iter_num == self.first_iter and not self.eval_first and not c["eval_only"])

    def ahead(self, start):
        """How many evaluations the loop will make from iteration start on (without early stopping)."""
        return evals_ahead(start, self.c["max_iters"], self.c["eval_interval"], self.eval_first)

    def run(self, iter_num):
        """Evaluate (collective under torchrun), log and record it; False when a stop request abandoned it."""
        try:
            losses = self.estimate_loss()
        except EvalAbandoned:
            self.metrics.log(f"eval {iter_num}: abandoned, a stop was requested")
            return False
        self.last_val, self.evaluated_at = losses["val"], iter_num
        self.metrics.log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.metrics.record({"type": "eval", "iter": iter_num, "train_loss": losses["train"],
                             "val_loss": losses["val"]})
        self.improved = losses["val"] < self.best_val_loss
        if self.improved:
            self.best_val_loss, self.without_gain = losses["val"], 0
        else:
            self.without_gain += 1
        return True

    def patience_spent(self):
        patience = self.c["patience"]
        if patience and self.without_gain >= patience:
            self.metrics.log(f"early stop: val loss has not improved for {patience} evals")
            return True
        return False

    def estimate_loss(self):
        """Train loss over eval_iters random batches (the same ones at every eval); val loss exactly, over the
        whole split, when that is no more work than eval_iters batches (else sampled too)."""
        c, env = self.c, self.env
        block_size, batch_size, eval_iters, seed = c["block_size"], c["batch_size"], c["eval_iters"], c["seed"]
        self.model.eval()
        # inference mode skips autograd bookkeeping entirely; FSDP reuses its gather buffers in training,
        # which tensors made in inference mode would forbid, so it gets plain no_grad
        with torch.no_grad() if env.fsdp else torch.inference_mode():
            losses = {}
            for split, data in self.data.items():
                whole = split == "val" and len(data) <= eval_iters * batch_size * block_size
                starts = (whole_split_starts(len(data), block_size, batch_size, env.rank, env.world_size) if whole
                          else sampled_starts(len(data), block_size, batch_size, eval_iters, seed + env.rank))
                batches = (self.windows_at(data, ix, block_size, env.device) for ix in self.progress(starts))
                losses[split] = mean_loss(self.raw_model, batches, env.device, env.autocast, env.ddp)
        self.model.train()
        return losses

    def progress(self, batches):
        """An evaluation's batches, with a progress bar; a stop request may abandon it (run_folder.py)."""
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False,
                          disable=None if self.env.master else True):
            self.stop.check_eval()
            yield batch
