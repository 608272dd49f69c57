"""
The run's record: metrics.jsonl (one JSON line per log and eval), its optional copies in TensorBoard or
Weights & Biases, and the one-line log format. On resume the record is cut back to the checkpoint.
"""

import json
import os

from configurator import UsageError
from faults import atomic_write, writing
from health import SpikeWatch
from mfu import peak_warning


class MetricsLog:
    """Appends entries to out_dir/metrics.jsonl and to every extra sink; only the first process writes."""

    def __init__(self, out_dir, config, master):
        self.path, self.master = os.path.join(out_dir, "metrics.jsonl"), master
        self.sinks = open_loggers(out_dir, config) if master else []
        self.spikes, self.warned_peak = SpikeWatch(), False

    def record(self, entry):
        if not self.master:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:  # a full disk: one line
            f.write(json.dumps(entry) + "\n")
        for sink in self.sinks:
            sink(entry)

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
