"""
The run's health: the NaN guard (a non-finite loss or gradient never reaches the weights), the update
ratios (how much a step changes the weights), a loss-spike warning and the --inspect gradient table.
The guard decides on the device whether a step counts (train.py's loop takes the step itself), so between
logs the host never waits for it.
"""

import math
import os
import sys

import torch

from machinery.distributed import full
from machinery.optimizers import Muon

SPIKE_FACTOR = 1.5  # warn when a logged loss exceeds this multiple of its running average
DIVERGENCE_ADVICE = (
    "likely causes and fixes:\n"
    "  - learning rate too high: lower learning_rate, or raise warmup_iters\n"
    "  - float16 overflow: use dtype='bfloat16', or float16 with its GradScaler (dtype='float16' does this)\n"
    "  - bad data: check the dataset for garbage (python data.py ... to prepare it again)")


class Guard:
    """Skips every step whose loss or gradient is not finite, counts the skips on the device, reports them
    at the next log and stops the run after max_bad_steps of them in a row."""

    def __init__(self, optimizers, scaler, max_bad_steps, env, model, ckpt_path, progress):
        self.optimizers, self.scaler, self.max_bad_steps = optimizers, scaler, max_bad_steps
        self.model, self.ckpt_path, self.progress = model, ckpt_path, progress
        # decided on the device when every optimizer skips its own update given found_inf: fused AdamW on any
        # device (AdamW alone on a CPU too), Muon on a GPU only (on a CPU a host read costs nothing, and
        # Muon's plain step keeps its results bit for bit); under FSDP the host decides, with float16 the scaler
        muon_on_device = env.device_type == "cuda"
        self.on_device = not env.fsdp and not scaler.is_enabled() and all(
            o.defaults.get("fused") or (muon_on_device and isinstance(o, Muon)) for o in optimizers)
        # the current and longest run of non-finite steps in a row, and all skipped steps: () on the device
        self.bad_run, self.longest_bad_run, self.skipped = (torch.zeros((), device=env.device) for _ in range(3))
        self.reported, self.advised = 0, False

    def allows_step(self, loss, grad_norm):
        """Whether the loop takes the optimizer step: not when the loss or the gradient norm is not finite.

        The decision is made on the device. Fused AdamW takes it as a `found_inf` tensor and skips its own
        update when it is 1, as it does for GradScaler, and optimizers.py's Muon does the same: then the answer is
        True and the host never waits for the device. Otherwise (FSDP, or Muon on a CPU) the host reads it:
        one sync per step. With float16 the GradScaler itself skips steps whose gradients overflowed."""
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))  # () bool
        if not self.scaler.is_enabled():  # with fp16 the scaler owns skipping, and overflows are routine
            self.bad_run = (self.bad_run + 1) * bad  # non-finite steps in a row, 0 after a good one
            self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_run)
        self.skipped += bad
        if self.scaler.is_enabled():
            return True
        if self.on_device:
            for opt in self.optimizers:
                opt.found_inf = bad.float()  # read by opt.step(), which the loop calls next
            return True
        return not bool(bad)

    def counts(self):
        """The device-side counts, to read with the log line's other figures in one transfer."""
        return [self.bad_run, self.longest_bad_run, self.skipped]

    def report(self, log, iter_num, loss_value, run_now, longest, skipped_now):
        """At a log step: say how many steps were skipped since the last log (naming the culprit when the
        logged step itself was bad); stop the run (exit 3) after max_bad_steps non-finite steps in a row,
        keeping the last good checkpoint."""
        if skipped_now > self.reported and not self.scaler.is_enabled():
            if run_now:  # this very step was bad: its gradients are still here to name the culprit
                what = "loss" if not math.isfinite(loss_value) else "gradient"
                log(f"iter {iter_num}: non-finite {what} (first in {first_nonfinite_grad(self.model)}); step "
                    f"skipped, weights untouched ({int(run_now)}/{self.max_bad_steps})")
            else:
                log(f"iter {iter_num}: {int(skipped_now - self.reported)} non-finite step(s) since the last log "
                    "were skipped, weights untouched")
            if not self.advised:
                log(DIVERGENCE_ADVICE)
                self.advised = True
        self.reported = max(self.reported, skipped_now)
        if longest >= self.max_bad_steps:
            self.progress.close()
            kept = f"{self.ckpt_path} holds the last good state" if os.path.exists(self.ckpt_path) else \
                "no checkpoint had been written yet"
            print(f"error: training stopped after {int(longest)} non-finite steps in a row at iteration "
                  f"{iter_num}; {kept}. Lower learning_rate and start again", file=sys.stderr)
            sys.exit(3)


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


class UpdateMonitor:
    """Every `interval` steps, how much the step changed the weights (update_ratios): a copy of the weights
    is taken before the step and compared after it; the ratios wait for the next log line."""

    def __init__(self, optimizers, params, interval):
        self.optimizers, self.params, self.interval = optimizers, params, interval
        self.weights_before, self.ratios = None, None

    def before_step(self, iter_num):
        if (iter_num + 1) % self.interval == 0:
            self.weights_before = [p.detach().clone() for p in self.params]

    def after_step(self):
        if self.weights_before is not None:
            self.ratios = update_ratios(self.optimizers, self.params, self.weights_before)
            self.weights_before = None

    def take(self):
        """The ratios measured since the last log (each measurement is logged once), or None."""
        ratios, self.ratios = self.ratios, None
        return ratios


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
