"""
The run's record: metrics.jsonl (one JSON line per log and eval), its optional copies in TensorBoard or
Weights & Biases, and the one-line log format. On resume the record is cut back to the checkpoint.
"""

import json
import os
import sys
import time

import torch

from machinery.bands import BandWatch
from machinery.cli import UsageError
from machinery.faults import atomic_write, writing
from machinery.health import SpikeWatch
from machinery.speed import estimate_mfu, peak_flops, peak_warning


class MetricsLog:
    """The log lines (above the progress bar) and the record: entries appended to out_dir/metrics.jsonl and
    to every extra sink; only the first process writes."""

    def __init__(self, out_dir, config, env, model, scaler, progress, tokens_per_iter):
        self.path, self.master = os.path.join(out_dir, "metrics.jsonl"), env.master
        self.sinks = open_loggers(out_dir, config) if env.master else []
        self.spikes, self.warned_peak = SpikeWatch(), False
        self.model, self.scaler, self.progress, self.tokens_per_iter = model, scaler, progress, tokens_per_iter
        self.accum_steps, self.grad_clip = env.accum_steps, config["grad_clip"]
        self.peak = peak_flops(env.device, env.dtype) if env.master else None
        self.clock, self.clock_iter = time.perf_counter(), None  # since when, and since which iteration
        # the recipe's loss band, when the config file has one (bands.py): a line when the run leaves it
        self.band = BandWatch.for_run(out_dir, config, sys.argv[1:], self.log) if env.master else None

    def log(self, line):
        if self.master:
            self.progress.write(line)

    def restart_clock(self, iter_num):
        """Time ms/iter from now on (an evaluation's time is not a step's)."""
        self.clock, self.clock_iter = time.perf_counter(), iter_num

    def log_step(self, iter_num, lr, loss, grad_norm, guard, monitor):
        """At a log step: the one read of the device since the last log, the guard's report, then (first
        process) the log line and the record. Every process calls it: with FSDP the figures are collective."""
        loss_value, norm_value, run_now, longest, skipped_now = torch.stack(
            [loss.detach().float() * self.accum_steps, grad_norm.float(), *guard.counts()]).tolist()
        guard.report(self.log, iter_num, loss_value, run_now, longest, skipped_now)
        if not self.master:
            return
        now = time.perf_counter()
        dt = (now - self.clock) / (iter_num - self.clock_iter)
        self.restart_clock(iter_num)
        entry = {"type": "train", "iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                 "tokens_per_s": self.tokens_per_iter / dt,
                 "mfu": estimate_mfu(self.model, self.tokens_per_iter / dt, self.peak) if self.peak else None,
                 "grad_norm": norm_value, "clipped": bool(self.grad_clip > 0 and norm_value > self.grad_clip),
                 "update_ratio_log10": monitor.take(), "skipped_steps": int(skipped_now),
                 "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None}
        self.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        self.log_train(entry, self.log)  # the line, its warnings (a loss spike, MFU > 100%), metrics.jsonl

    def record(self, entry):
        if not self.master:
            return
        named = self.band.announce(entry["iter"]) if self.band else None  # which band, for plot.py and the lens
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:  # a full disk: one line
            f.write("".join(json.dumps(e) + "\n" for e in (named, entry) if e))
        for sink in self.sinks:
            sink(entry)
        if self.band:
            self.band.check(self.log, entry)

    def log_train(self, entry, log):
        """A training entry: its log line, a warning if the loss spiked or MFU passed 100%, then the record."""
        log(format_log(entry))
        if entry["mfu"] and entry["mfu"] > 1 and not self.warned_peak:  # the peak is wrong, not the step
            log(peak_warning())
            self.warned_peak = True
        self.record(entry)
        self.spikes.check(log, entry["iter"], entry["loss"])


def format_log(e):
    """One compact line per log: loss, lr, speed, then the health figures."""
    ratio = e["update_ratio_log10"]["all"] if e["update_ratio_log10"] else None
    line = (f"iter {e['iter']}: loss {e['loss']:.4f}, lr {e['lr']:.2e}, {e['ms_per_iter']:.1f} ms/iter, "
            f"{e['tokens_per_s']:,.0f} tok/s" + (f", mfu {e['mfu'] * 100:.1f}%" if e["mfu"] else "")
            + f" | grad norm {e['grad_norm']:.3f}" + (" (clipped)" if e["clipped"] else "")
            + (f", update {ratio:.2f}" if ratio is not None else ""))
    if e["loss_scale"] is not None:
        line += f", loss scale {e['loss_scale']:.0f}, skipped {e['skipped_steps']}"
    return line


def open_loggers(out_dir, config):
    """Optional extra destinations for each metrics entry; each is a soft dependency."""
    sinks = []
    if config["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                             "(or leave tensorboard=False)")
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        sinks.append(lambda e: [writer.add_scalar(f"{e['type']}/{k}", v, e["iter"]) for k, v in e.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iter"])
    if config["wandb_log"]:
        try:
            import wandb
        except ImportError:
            raise UsageError("wandb_log=True needs the wandb package: pip install wandb (or leave wandb_log=False)")
        wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=config)
        sinks.append(lambda e: wandb.log({f"{e['type']}/{k}": v for k, v in e.items()
                                          if isinstance(v, (int, float)) and k != "iter"}, step=e["iter"]))
    return sinks


def trim_metrics(path, upto):
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    lines, torn = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            entry = metrics_entry(line)
            if entry is None and line.strip():
                torn.append(str(number))  # e.g. the last line of a run killed while writing it
            elif entry is not None and entry["iter"] <= upto:
                lines.append(line if line.endswith("\n") else line + "\n")
    if torn:
        print(f"note: dropped line(s) {', '.join(torn)} of {path}: not a complete metrics entry")
    with writing(path), atomic_write(path) as f:
        f.writelines(lines)


def metrics_entry(line):
    """One metrics.jsonl line as a dict with an 'iter', or None for a line that is not one."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("iter"), int) else None
