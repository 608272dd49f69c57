"""
The run's health: the NaN guard (a non-finite loss or gradient never reaches the weights), the update
ratios (how much a step changes the weights), a loss-spike warning and the --inspect gradient table.
The guard decides on the device, so between logs the host never waits for a step.
"""

import math
import os
import sys

import torch

from distributed import full
from optim import Muon

SPIKE_FACTOR = 1.5  # warn when a logged loss exceeds this multiple of its running average
DIVERGENCE_ADVICE = (
    "likely causes and fixes:\n"
    "  - learning rate too high: lower learning_rate, or raise warmup_iters\n"
    "  - float16 overflow: use dtype='bfloat16', or float16 with its GradScaler (dtype='float16' does this)\n"
    "  - bad data: check the dataset for garbage (python data.py ... to prepare it again)")


class Guard:
    """Skips every step whose loss or gradient is not finite, counts the skips on the device, reports them
    at the next log and stops the run after max_bad_steps of them in a row."""

    def __init__(self, optimizers, scaler, max_bad_steps, device, fsdp):
        self.optimizers, self.scaler, self.max_bad_steps = optimizers, scaler, max_bad_steps
        # fused AdamW and, on a GPU, Muon skip their own update on the device; FSDP makes the host look first
        # (on a CPU a host read costs nothing, and Muon's plain step keeps its results bit for bit)
        muon_on_device = str(device).startswith("cuda")
        self.on_device = not fsdp and not scaler.is_enabled() and all(
            o.defaults.get("fused") or (muon_on_device and isinstance(o, Muon)) for o in optimizers)
        # the current and longest run of non-finite steps in a row, and all skipped steps: () on the device
        self.bad_run, self.longest_bad_run, self.skipped = (torch.zeros((), device=device) for _ in range(3))
        self.reported, self.advised = 0, False

    def step(self, loss, grad_norm):
        """The optimizer step, unless the loss or the gradient norm is not finite."""
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))  # () bool
        step_unless_bad(self.optimizers, self.scaler, bad, self.on_device)
        if not self.scaler.is_enabled():  # with fp16 the scaler owns skipping, and overflows are routine
            self.bad_run = (self.bad_run + 1) * bad  # non-finite steps in a row, 0 after a good one
            self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)
        self.skipped += bad

    def counts(self):
        """The device-side counts, to read with the log line's other figures in one transfer."""
        return [self.bad_run, self.longest_bad_run, self.skipped]

    def report(self, log, iter_num, loss_value, model, run_now, longest, skipped_now, ckpt_path, progress):
        """At a log step: say which steps were skipped since the last log; stop the run (exit 3) after
        max_bad_steps non-finite steps in a row, keeping the last good checkpoint."""
        if skipped_now > self.reported and not self.scaler.is_enabled():
            if run_now:  # this very step was bad: its gradients are still here to name the culprit
                what = "loss" if not math.isfinite(loss_value) else "gradient"
                log(f"iter {iter_num}: non-finite {what} (first in {first_nonfinite_grad(model)}); step skipped, "
                    f"weights untouched ({int(run_now)}/{self.max_bad_steps})")
            else:
                log(f"iter {iter_num}: {int(skipped_now - self.reported)} non-finite step(s) since the last log "
                    "were skipped, weights untouched")
            if not self.advised:
                log(DIVERGENCE_ADVICE)
                self.advised = True
        self.reported = max(self.reported, skipped_now)
        if longest >= self.max_bad_steps:
            progress.close()
            kept = f"{ckpt_path} holds the last good state" if os.path.exists(ckpt_path) else \
                "no checkpoint had been written yet"
            print(f"error: training stopped after {int(longest)} non-finite steps in a row at iteration "
                  f"{iter_num}; {kept}. Lower learning_rate and start again", file=sys.stderr)
            sys.exit(3)


def step_unless_bad(optimizers, scaler, bad, on_device):
    """Update the weights unless `bad` (a () bool tensor on the device) says the step is non-finite.

    Fused AdamW takes a `found_inf` tensor and skips its own update when it is 1, the way it does for
    GradScaler, so the host never waits for the device; optim.py's Muon does the same. Otherwise (FSDP, or
    Muon on a CPU) the host reads `bad` first: one sync per step. With float16 the GradScaler itself skips
    steps whose gradients overflowed."""
    if scaler.is_enabled():
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    elif on_device:
        for opt in optimizers:
            opt.found_inf = bad.float()
            opt.step()
            del opt.found_inf
    elif not bool(bad):
        for opt in optimizers:
            opt.step()


def first_nonfinite_grad(model):
    """The module path of the first parameter whose gradient holds a NaN or Inf."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(full(torch.isfinite(p.grad).all())):
            return name
    return "no gradient (the loss itself)"


class SpikeWatch:
    """A warning when a logged loss jumps well above its running average."""

    def __init__(self):
        self.average = None

    def check(self, log, iter_num, loss):
        if self.average is not None and math.isfinite(loss) and loss > SPIKE_FACTOR * self.average:
            log(f"warning: loss spike at iter {iter_num}: {loss:.3f} vs a recent average of "
                f"{self.average:.3f} (learning rate too high? a bad batch?)")
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss


def update_ratios(optimizers, params, weights_before):
    """log10(||w_after - w_before|| / ||w_before||) per optimizer parameter group and overall.

    A healthy step changes weights by roughly 1e-3 of their size (about -3). The sums stay on the device
    and are read back once."""
    before = {id(p): w for p, w in zip(params, weights_before)}
    names, sums = [], []
    for opt in optimizers:
        for group in opt.param_groups:
            if not group["params"]:
                continue
            dw = sum(full((p.detach().float() - before[id(p)].float()).pow(2).sum()) for p in group["params"])
            w = sum(full(before[id(p)].float().pow(2).sum()) for p in group["params"])
            names.append(group["name"])
            sums.append(torch.stack([dw, w]))
    values = torch.stack(sums).tolist()  # [[dw, w] per group]: the one read of the device
    ratios = {name: log10_ratio(dw, w) for name, (dw, w) in zip(names, values)}
    ratios["all"] = log10_ratio(sum(dw for dw, _ in values), sum(w for _, w in values))
    return ratios


def log10_ratio(dw, w):
    return math.log10(math.sqrt(dw / w)) if dw > 0 and w > 0 else None


def print_gradient_table(model, optimizers, X, Y, autocast, lr):
    """--inspect=True: one batch, one step, and per parameter: shape, weight norm, gradient statistics
    and the update ratio. Nothing is saved."""
    model.train()
    with autocast:
        _, loss = model(X, Y)
    loss.backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    print(f"loss {loss.item():.4f} on one batch, lr {lr:.2e}")
    print(f"{'parameter':<34} {'shape':>14} {'|w|':>9} {'grad mean':>10} {'grad std':>9} {'grad max':>9} "
          f"{'log10 upd':>9}")
    for name, p in model.named_parameters():
        g, w = p.grad.float(), before[name].float()
        change = (p.detach().float() - w).norm()
        ratio = f"{math.log10(change / w.norm()):9.2f}" if change > 0 and w.norm() > 0 else f"{'n/a':>9}"
        shape = "x".join(map(str, p.shape))
        print(f"{name:<34} {shape:>14} {w.norm():9.4f} {g.mean():10.2e} {g.std():9.2e} {g.abs().max():9.2e} {ratio}")
