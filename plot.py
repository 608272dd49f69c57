"""
Draw a run's training curves from its metrics.jsonl: loss (train and val), learning rate and,
when the run logged it, the gradient norm. Several runs are overlaid, one colour per run; a run of
a recipe with a loss band (machinery/bands.py) has the band shaded behind its loss.

    python plot.py out-shakespeare-char-cpu              # -> out-shakespeare-char-cpu/metrics.png
    python plot.py out-a out-b out-c --out runs.png      # several runs on the same axes
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import json
import math
import os

from machinery.bands import band_for_run
from machinery.checks import pathname, shown, writable_folder
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.faults import atomic_write, writing

PANEL_INCHES = (4.5, 3.5)  # width, height of one panel; panels sit side by side
DPI = 100  # so a panel is 450 x 350 pixels


def read_metrics(out_dir):
    """(train entries, eval entries) from out_dir/metrics.jsonl, or one UsageError saying what is missing."""
    if not os.path.isdir(out_dir):
        raise UsageError(f"'{out_dir}' is not a folder; give the out_dir of a training run")
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; train first (python train.py ... --out_dir={out_dir})")
    with open(path, "rb") as f:
        lines = [line for line in f if line.strip()]
    entries, skipped = [], []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line.decode("utf-8"))
        except ValueError:  # (bytes that are not UTF-8 too)
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("iter"), int) and not isinstance(entry["iter"], bool):
            entries.append({k: v for k, v in entry.items() if k not in PLOTTED or is_number(v)})
        elif number < len(lines):  # (the last line may still be being written by a running train.py)
            skipped.append(str(number))
    if skipped:
        print(f"warning: skipped line(s) {', '.join(skipped)} of {path}: not a metrics entry "
              "(the file is left as it is)")
    train = [e for e in entries if e.get("type") == "train"]
    evals = [e for e in entries if e.get("type") == "eval"]
    if not train and not evals:
        raise UsageError(f"{path} has no metrics yet; wait for the first log line (log_interval) of the run")
    return train, evals


PLOTTED = ("loss", "val_loss", "lr", "grad_norm")  # a value of another type is left out, not plotted


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_names(out_dirs):
    """Legend names: each folder's own name, or the path as given when two names collide."""
    names = [shown(os.path.basename(os.path.normpath(d))) for d in out_dirs]
    if len(set(names)) < len(names):
        return [shown(os.path.normpath(d)) for d in out_dirs]
    return names


def has_grad_norm(runs):
    return any("grad_norm" in e for train, _ in runs.values() for e in train)


def finite(xs, ys):
    """Drop points whose value is missing, NaN or infinite (a diverged run still plots)."""
    kept = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def draw_bands(ax, bands):
    """Each recipe's loss band (machinery/bands.py: band_dict), shaded behind the curves, once per band."""
    for band in {b["band"]: b for b in bands if b}.values():
        label = f"band of {shown(band['config'])} ({len(band['seeds'])} seeds)"
        ax.fill_between(band["train"]["steps"], band["train"]["lo"], band["train"]["hi"], color="0.6", alpha=0.3,
                        linewidth=0, zorder=0, label=label)
        ax.vlines(band["eval"]["steps"], band["eval"]["val_loss"]["lo"], band["eval"]["val_loss"]["hi"], color="0.3",
                  linewidth=4, alpha=0.5, zorder=0, label="its val loss")


def plot_runs(runs, title=None, bands=()):
    """A matplotlib Figure for {name: (train entries, eval entries)}; bands: the runs' bands (None: none)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no window, no display needed
    import matplotlib.pyplot as plt

    panels = ["loss", "lr"] + (["grad_norm"] if has_grad_norm(runs) else [])
    width, height = PANEL_INCHES
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    draw_bands(axes[0], bands)
    for i, (name, (train, evals)) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        ax = axes[0]
        xs, ys = finite([e["iter"] for e in train], [e.get("loss") for e in train])
        ax.plot(xs, ys, color=colour, alpha=0.35, linewidth=0.8, label=f"{name} train (batch)")
        xs, ys = finite([e["iter"] for e in evals], [e.get("val_loss") for e in evals])
        ax.plot(xs, ys, color=colour, marker="o", markersize=3, linewidth=1.5, label=f"{name} val")
        xs, ys = finite([e["iter"] for e in train], [e.get("lr") for e in train])
        axes[1].plot(xs, ys, color=colour, label=name)
        if "grad_norm" in panels:
            xs, ys = finite([e["iter"] for e in train], [e.get("grad_norm") for e in train])
            axes[2].plot(xs, ys, color=colour, linewidth=0.8, label=name)
    labels = {"loss": "loss (cross-entropy)", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}
    for ax, panel in zip(axes, panels):
        ax.set_title(labels[panel], fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if "grad_norm" in panels and axes[2].has_data():
        axes[2].set_yscale("log")
    peaks = [max(e["lr"] for e in train if "lr" in e) for train, _ in runs.values() if any(e.get("lr") for e in train)]
    if len(peaks) > 1 and min(peaks) > 0 and max(peaks) / min(peaks) > 5:
        axes[1].set_yscale("log")  # a sweep over decades: each run's schedule stays visible
    else:
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main():
    parser = ArgumentParser(description="Plot loss, learning rate and gradient norm from metrics.jsonl.")
    parser.add_argument("out_dirs", type=pathname, nargs="+", metavar="out_dir",
                        help="run folders holding metrics.jsonl")
    parser.add_argument("--out", type=pathname, default=None,
                        help="PNG to write (default: <out_dir>/metrics.png for one run, runs.png for several)")
    parser.add_argument("--title", default=None, help="a title above the panels")
    args = parser.parse_args()
    names = run_names(args.out_dirs)
    runs = {name: read_metrics(d) for name, d in zip(names, args.out_dirs)}
    out = args.out or (os.path.join(args.out_dirs[0], "metrics.png") if len(args.out_dirs) == 1 else "runs.png")
    if not out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got '{out}'")
    writable_folder(os.path.dirname(os.path.abspath(out)), "--out's folder")
    fig = plot_runs(runs, args.title, [band_for_run(d, warn=print) for d in args.out_dirs])
    with writing(out, kept="nothing was changed there"):
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic_write(out, "wb") as f:  # a full disk or Ctrl-C leaves the previous picture, not half a new one
            fig.savefig(f, format="png")  # no bbox_inches='tight': the size stays PANEL_INCHES x DPI per panel
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
