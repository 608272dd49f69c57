"""
The training timeline: light snapshots of the weights during a run, so that the lens can replay how the
model got where it is (docs chapter 5.6.1).

A snapshot is a model-only checkpoint, out_dir/timeline/step_<step>.pt (the same safe format as ckpt.pt, so
`generate.py --ckpt` and `lens.py --ckpt` open one directly), and out_dir/timeline/timeline.json lists them:
each one's step, learning rate, train loss and size. Most of what a model learns changes in its first
steps, so the schedule doubles: steps 0, 1, 2, 4, 8, ..., and every evaluation (the last step included).
Both files are written atomically; a resumed run drops what its interrupted run kept after the checkpoint
and continues the schedule.
"""

import json
import math
import os
import re

import torch

from machinery.checkpoint import save_checkpoint
from machinery.cli import UsageError
from machinery.faults import atomic_write, remove_leftovers, writing

FOLDER, INDEX = "timeline", "timeline.json"
AUTO_LIMIT = 2_000_000  # parameters: snapshots='auto' keeps them up to 8 MB each (float32), about 12 a run
FORMAT = 1
LEFTOVER = re.compile(r"(?:step_\d+\.pt|timeline\.json)\.tmp(\d+)")  # a write cut short by kill -9


def on_schedule(step):
    """Steps 0, 1, 2, 4, 8, 16, ...: dense where the weights change fastest."""
    return step == 0 or step & (step - 1) == 0


def scheduled_steps(start, max_iters, eval_due):
    """The steps from start to max_iters (both included) that get a snapshot."""
    return [s for s in range(start, max_iters + 1) if on_schedule(s) or eval_due(s)]


def wanted(setting, n_params, fsdp):
    """Whether a run keeps snapshots: True, False, or 'auto' (small models; never sharded ones)."""
    if setting == "auto":
        return n_params <= AUTO_LIMIT and not fsdp
    return setting


class Timeline:
    """Kept by train.py: keep(step, ...) at the top of each step writes a snapshot when the step is on the
    schedule (every process calls it: with FSDP the weights are gathered; the first process writes)."""

    def __init__(self, checkpoints, evals):
        self.checkpoints, self.evals, self.env = checkpoints, evals, checkpoints.env
        config = checkpoints.config
        self.folder = os.path.join(checkpoints.out_dir, FOLDER)
        n_params = sum(p.numel() for p in checkpoints.model.parameters())
        self.on = (wanted(config["snapshots"], n_params, config["fsdp"]) and not config["eval_only"]
                   and self.evals.first_iter < config["max_iters"])
        if not self.on:
            return
        self.entries = self.earlier_entries(config["init_from"] == "resume", evals.first_iter)
        if self.env.master:
            os.makedirs(self.folder, exist_ok=True)
            remove_leftovers(self.folder, LEFTOVER)
            ahead = len(scheduled_steps(evals.first_iter, config["max_iters"], evals.due))
            size = sum(p.numel() * p.element_size() for p in checkpoints.model.state_dict().values())
            print(f"snapshots: {ahead} of {size / 1e6:.1f} MB ({ahead * size / 1e6:.0f} MB) into {self.folder} "
                  "for the lens's training view (snapshots=False: none)")

    def earlier_entries(self, resumed, start):
        """A resumed run keeps the snapshots up to its checkpoint's step (those after it belong to a path the
        interrupted run took, not this one); a new run starts an empty timeline."""
        path = os.path.join(self.folder, INDEX)
        entries = read_index(path) if os.path.exists(path) else []
        kept = [e for e in entries if resumed and e["step"] <= start]
        for entry in entries:
            if entry not in kept and self.env.master:
                remove_quietly(os.path.join(self.folder, entry["file"]))
        return kept

    def keep(self, step, lr, X, Y):
        """A snapshot of the weights at this step (before its update) with its lr and its train loss on the
        step's own batch X, Y (B, T), when the step is on the schedule and not kept yet."""
        if not self.on or not (on_schedule(step) or self.evals.due(step)) \
                or any(e["step"] == step for e in self.entries):
            return
        from machinery import distributed  # (training code: the lens, which reads snapshots, never loads it)
        model = self.checkpoints.model
        model.eval()  # the loss without dropout: the weights' own
        with torch.no_grad(), self.env.autocast:
            _, loss = model(X, Y)
        model.train()
        state, _ = distributed.full_states(model, [], self.env.fsdp)
        if not self.env.master:
            return
        name, c = f"step_{step:07d}.pt", self.checkpoints
        meta = {"model_args": c.model_args, "config": c.config, "iter_num": step, "fsdp": self.env.fsdp,
                "best_val_loss": self.evals.best_val_loss, "tokenizer": c.meta["tokenizer"],
                "dataset": c.config["dataset"], "evaluated": False,
                "snapshot": {"step": step, "lr": lr, "loss": loss.item()}}
        save_checkpoint(os.path.join(self.folder, name), {"model": state}, meta)
        self.entries.append({"step": step, "lr": lr, "loss": round(loss.item(), 6), "file": name,
                             "bytes": os.path.getsize(os.path.join(self.folder, name))})
        path = os.path.join(self.folder, INDEX)
        with writing(path), atomic_write(path) as f:
            json.dump({"format": FORMAT, "snapshots": self.entries}, f, indent=1)


def remove_quietly(path):
    if os.path.exists(path):
        os.remove(path)


ENTRY_FIELDS = {"step": int, "lr": (int, float), "loss": (int, float), "file": str, "bytes": int}


def read_index(path):
    """The entries of a timeline.json, in step order, each checked; a hostile file is one UsageError."""
    fix = "delete the timeline folder (the run's checkpoints do not need it) or train again"
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UsageError(f"{path} is not a readable timeline ({type(e).__name__}); {fix}")
    entries = index.get("snapshots") if isinstance(index, dict) else None
    if not isinstance(entries, list) or index.get("format") != FORMAT:
        raise UsageError(f"{path} is not a timeline of format {FORMAT} (no 'snapshots' list); {fix}")
    for entry in entries:
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), kind) or isinstance(entry.get(k), bool)
                                              for k, kind in ENTRY_FIELDS.items()):
            raise UsageError(f"{path} has a snapshot entry without {', '.join(ENTRY_FIELDS)} of the right types; "
                             f"{fix}")
        if os.path.basename(entry["file"]) != entry["file"] or not entry["file"].endswith(".pt") \
                or entry["step"] < 0 or not math.isfinite(entry["loss"]):
            raise UsageError(f"{path} names a snapshot {entry['file'][:60]!r} that is not a file of its folder; {fix}")
    return sorted(entries, key=lambda e: e["step"])


def run_folder_of(ckpt_path):
    """The run folder a checkpoint sits in (a snapshot's: the folder above its timeline)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == FOLDER else folder


def snapshots_of(run_folder):
    """[(entry, path)] of the run folder's timeline, or [] when it has none."""
    path = os.path.join(run_folder, FOLDER, INDEX)
    if not os.path.isfile(path):
        return []
    return [(e, os.path.join(run_folder, FOLDER, e["file"])) for e in read_index(path)]
