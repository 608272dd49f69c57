"""
Is my loss normal? A recipe's reference band: the loss that runs of the recipe as shipped, one per seed, logged
at each step and each evaluation, stored beside its config (config/<name>.band.json, with the command that
measures it again, the commit, the machine and the date). The band is the seeds' lowest to highest loss at each
step, widened by a margin (MARGIN_FRACTION of the seeds' spread, at least MARGIN_FLOOR), because a handful of
seeds does not reach the edges of what a new seed does.

train.py (through metrics.py: MetricsLog) compares each logged loss with the band of its config file: a run
above it for ABOVE_LOGS logs in a row, or at an evaluation, gets one warning line naming the step, how far above
and the usual causes; below it, one note. A config without a band says nothing. plot.py draws the band; the lens
gets it from band_for_run(out_dir).

    python -m machinery.bands measure config/shakespeare_char_cpu.py --seeds 1,2,3,4,5
    python -m machinery.bands check config/shakespeare_char_cpu.py --seed 6 --record  # -> records/bands.json
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

from machinery.checks import fields, read_utf8
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.faults import atomic_write, writing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each side of the band moves out by this share of the seeds' spread at that step, and at least by the floor:
# the highest of 5 seeds is passed by a sixth 1 time in 6, and 5 seeds can agree by chance where a sixth does
# not. Chosen on the recipe's 5 seeds, each against the band of the other 4 (leave_one_out; docs 3.12.1).
MARGIN_FRACTION = 1.0
MARGIN_FLOOR = 0.03
ABOVE_LOGS = 3  # a logged loss is one batch's, noisy: only this many logs in a row above the band count
CAUSES = ("a learning rate too high, other data or tokenizer, a setting changed from the recipe's, "
          "or a bug in an edited file")
LOSSES = ("loss", "train_loss", "val_loss")  # a train log's loss; an evaluation's two
FIX = "measure it again: python -m machinery.bands measure CONFIG (or delete it)"


def band_path(config_path):
    """config/x.py -> config/x.band.json, the band of the recipe in that file."""
    return re.sub(r"\.py$", "", config_path) + ".band.json"


def load_band(path):
    """The band file at path, checked: a dict of its fields, or one UsageError naming the file and the field."""
    what = f"band file '{path}'"
    try:
        record = json.loads(read_utf8(path, "band file"), parse_constant=lambda c: c)  # NaN stays a string: refused
    except ValueError as e:
        raise UsageError(f"{what} is not JSON ({e}); {FIX}")
    fields(record, {"config": (str, 1, None), "dataset": (str, 1, None), "command": (str, 1, None),
                    "steps": (list, 0, None), "eval_steps": (list, 0, None), "seeds": (dict, None, None)}, what, FIX)
    if len(record["seeds"]) < 2:
        raise UsageError(f"{what}: 'seeds' holds {len(record['seeds'])} run(s), a band needs two or more; {FIX}")
    for key in ("steps", "eval_steps"):
        steps = record[key]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps) \
                or steps != sorted(set(steps)):
            raise UsageError(f"{what}: '{key}' must be increasing whole numbers; {FIX}")
    sizes = {"loss": len(record["steps"]), "train_loss": len(record["eval_steps"]),
             "val_loss": len(record["eval_steps"])}
    for seed, losses in record["seeds"].items():
        fields(losses, {k: (list, n, n) for k, n in sizes.items()}, f"{what}, seed {seed}", FIX)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                   for k in LOSSES for x in losses[k]):
            raise UsageError(f"{what}, seed {seed}: every loss must be a finite number; {FIX}")
    return record


def limits(record, fraction=MARGIN_FRACTION, floor=MARGIN_FLOOR, leave_out=None):
    """{kind: {step: (lo, hi)}} for kind in LOSSES: the seeds' min and max widened by the margin (leave_out: a
    seed not counted, to test the band against it)."""
    runs = [losses for seed, losses in record["seeds"].items() if seed != leave_out]
    band = {}
    for kind in LOSSES:
        steps = record["steps"] if kind == "loss" else record["eval_steps"]
        band[kind] = {}
        for i, step in enumerate(steps):
            low, high = min(r[kind][i] for r in runs), max(r[kind][i] for r in runs)
            widen = max(fraction * (high - low), floor)
            band[kind][step] = (low - widen, high + widen)
    return band


def band_dict(path, record):
    """The JSON-able band for a picture (plot.py, the lens): train steps with lo/hi, eval steps with each loss's."""
    band = limits(record)
    loss, evals = band["loss"], band["val_loss"]
    return {"band": path, "config": record["config"], "seeds": sorted(record["seeds"], key=int),
            "margin": {"fraction": MARGIN_FRACTION, "floor": MARGIN_FLOOR},
            "train": {"steps": list(loss), "lo": [lo for lo, _ in loss.values()],
                      "hi": [hi for _, hi in loss.values()]},
            "eval": {"steps": list(evals), **{k: {"lo": [lo for lo, _ in band[k].values()],
                                                  "hi": [hi for _, hi in band[k].values()]}
                                              for k in ("train_loss", "val_loss")}}}


def found(path):
    """A band path as recorded (relative to where train.py ran): as it is, else from the repository's root."""
    return path if os.path.isabs(path) or os.path.isfile(path) else os.path.join(ROOT, path)


def band_for_run(out_dir, warn=None):
    """The band the run in out_dir was compared with (its metrics.jsonl's last 'band' entry), as band_dict
    gives it, or None: no band, or a band file that is gone or broken (then warn(line) says so, if given)."""
    path = recorded_band(out_dir)
    if path is None:
        return None
    try:
        return band_dict(path, load_band(found(path)))
    except UsageError as e:
        if warn:
            warn(f"warning: {e}; the run is drawn without its band")
        return None


def recorded_band(out_dir):
    """The band path of the last 'band' entry in out_dir/metrics.jsonl, or None."""
    path = None
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"band"' in line:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(entry, dict) and entry.get("type") == "band" and isinstance(entry.get("band"), str):
                        path = entry["band"]
    except OSError:
        return None
    return path


def config_files(argv):
    """The config files named on a train.py command line (its arguments that are not flags), in order."""
    from machinery.configurator import arguments, train_defaults
    return [source for source, _ in arguments(argv, train_defaults()) if not source.startswith("--")]


class BandWatch:
    """train.py's comparison with its recipe's band: check(log, entry) for every entry metrics.jsonl gets;
    at most one line above the band and one below, each run."""

    def __init__(self, path, record):
        self.path, self.band = path, limits(record)
        self.streak = {"above": [], "below": []}  # the steps of the logs in a row outside, on each side
        self.said, self.announced = set(), False

    @classmethod
    def for_run(cls, out_dir, config, argv, log):
        """The watch for this run: the band of its last config file that has one (a resumed run named by its
        out_dir alone: the band its record names), if the band is for the run's dataset; else None."""
        try:
            paths = [band_path(f) for f in config_files(argv) if os.path.isfile(band_path(f))]
        except UsageError:
            return None
        if not paths and config["init_from"] == "resume":
            paths = [p for p in [recorded_band(out_dir)] if p and os.path.isfile(found(p))]
        if not paths:
            return None
        try:
            record = load_band(found(paths[-1]))
        except UsageError as e:
            log(f"warning: {e}; this run is not compared with a band")
            return None
        return cls(paths[-1], record) if record["dataset"] == config["dataset"] else None

    def announce(self, iter_num):
        """The entry that names this band in metrics.jsonl, once, before the run's first (for band_for_run)."""
        if self.announced:
            return None
        self.announced = True
        return {"type": "band", "iter": iter_num, "band": self.path}

    def check(self, log, entry):
        kinds = {"train": ("loss",), "eval": ("val_loss",)}.get(entry.get("type"), ())
        for kind in kinds:
            if entry["iter"] in self.band[kind] and isinstance(entry.get(kind), (int, float)):
                self.compare(log, kind, entry["iter"], entry[kind])

    def compare(self, log, kind, step, loss):
        lo, hi = self.band[kind][step]
        side = "above" if not loss <= hi else "below" if loss < lo else None  # (a NaN loss is above)
        for s in self.streak:
            self.streak[s] = self.streak[s] + [step] if s == side else []
        needed = 1 if kind == "val_loss" else ABOVE_LOGS  # an evaluation averages many batches: one is enough
        if side is None or side in self.said or len(self.streak[side]) < needed:
            return
        self.said.add(side)
        what = "val loss" if kind == "val_loss" else "loss"
        since = f"from iter {self.streak[side][0]} on ({needed} logs in a row)" if needed > 1 else f"at iter {step}"
        if side == "above":
            log(f"warning: the {what} is above this recipe's band {since}: {loss:.3f} at iter {step} against at "
                f"most {hi:.3f} (+{loss - hi:.3f}); usual causes: {CAUSES} (band: {self.path})")
        else:
            log(f"note: the {what} is below this recipe's band {since}: {loss:.3f} at iter {step} against at "
                f"least {lo:.3f} ({loss - lo:.3f}); better than every measured seed: a bigger model or batch "
                f"than the recipe's, or val text in the train split? (band: {self.path})")


# ---- measuring a band, and checking it with a new seed and a 10x learning rate -----------------------------

def train(config_path, out_dir, *flags):
    """python train.py CONFIG --out_dir=OUT FLAGS..., from the repository's root: (its output, its entries)."""
    command = [sys.executable, "train.py", config_path, f"--out_dir={out_dir}", "--replace_earlier_run=True",
               *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 3):  # (3: the NaN guard stopped a diverged run, which is a result)
        raise UsageError(f"`{' '.join(command[1:])}` failed (exit {result.returncode}): "
                         f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return result.stdout, entries


def records():
    """docs/record.py, the one writer of records/ (and of the commit and machine they name), loaded by path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("record", os.path.join(ROOT, "docs", "record.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def provenance():
    """The commit, machine and date of a measurement, as the records give them."""
    tools = records()
    return {"commit": tools.commit(), "machine": tools.machine(), "date": time.strftime("%Y-%m-%d")}


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds must be whole numbers separated by commas, like 1,2,3,4,5; got {text!r}")
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds needs at least two different seeds (5 or more make a band); got {text!r}")
    return seeds


def measure(config_path, seeds):
    """Train the recipe once per seed (one run at a time) and write its band file."""
    from machinery.configurator import read_config_file
    dataset = read_config_file(config_path).get("dataset", "")
    runs, steps, eval_steps = {}, None, None
    with tempfile.TemporaryDirectory(prefix="band-") as work:
        for seed in seeds:
            _, entries = train(config_path, os.path.join(work, str(seed)), f"--seed={seed}")
            logs = [e for e in entries if e["type"] == "train"]
            evals = [e for e in entries if e["type"] == "eval"]
            steps, eval_steps = steps or [e["iter"] for e in logs], eval_steps or [e["iter"] for e in evals]
            runs[str(seed)] = {"loss": [e["loss"] for e in logs], "train_loss": [e["train_loss"] for e in evals],
                               "val_loss": [e["val_loss"] for e in evals]}
            print(f"seed {seed}: final val loss {runs[str(seed)]['val_loss'][-1]:.4f}", flush=True)
    record = {"what": f"the loss band of {config_path}: each logged loss of one run per seed, as train.py logs "
                      "it (loss: one batch's, at each log; train_loss, val_loss: at each evaluation)",
              "config": config_path, "dataset": dataset,
              "command": f"python -m machinery.bands measure {config_path} --seeds {','.join(map(str, seeds))}",
              **provenance(), "steps": steps, "eval_steps": eval_steps, "seeds": runs}
    path = band_path(config_path)
    write_json(path, record)
    print(json.dumps(summary(load_band(path))))


def leave_one_out(record, fraction=MARGIN_FRACTION, floor=MARGIN_FLOOR):
    """Each seed against the band of the others (widened by this margin): the margin's check, as
    {"points": losses compared, "outside": how many fell outside, "farthest": the largest distance past an edge,
    "said": of how many seeds train.py would have said a line}."""
    points, outside, farthest, said = 0, 0, -math.inf, 0
    for seed, losses in record["seeds"].items():
        band = limits(record, fraction, floor, leave_out=seed)
        watch, lines = BandWatch("", record), []
        watch.band = band
        for step, x in zip(record["steps"], losses["loss"]):
            watch.check(lines.append, {"type": "train", "iter": step, "loss": x})
        for step, x in zip(record["eval_steps"], losses["val_loss"]):
            watch.check(lines.append, {"type": "eval", "iter": step, "val_loss": x})
        said += bool(lines)
        for kind in LOSSES:
            for step, x in zip(record["steps"] if kind == "loss" else record["eval_steps"], losses[kind]):
                past = max(x - band[kind][step][1], band[kind][step][0] - x)
                points, outside, farthest = points + 1, outside + (past > 0), max(farthest, past)
    return {"points": points, "outside": outside, "farthest": round(farthest, 4), "said": said}


def summary(record):
    """The band's figures the docs quote: the seeds' raw range at the first and last log and at the last eval,
    and the leave-one-out check without and with the margin."""
    seeds, last = record["seeds"].values(), len(record["eval_steps"]) - 1
    span = lambda kind, i: [round(min(r[kind][i] for r in seeds), 4), round(max(r[kind][i] for r in seeds), 4)]
    return {"first_step": record["steps"][0], "last_step": record["steps"][-1], "loss_first": span("loss", 0),
            "loss_last": span("loss", -1), "val_last": span("val_loss", last),
            "leave_one_out_raw": leave_one_out(record, 0, 0), "leave_one_out": leave_one_out(record)}


def write_json(path, record):
    with writing(path), atomic_write(path) as f:
        f.write(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def said(output):
    """The band's lines in a train.py output."""
    return [line for line in output.splitlines() if "(band: " in line]


def check(config_path, seed, write_record):
    """The recipe with a seed the band has not seen, and at 10x its learning rate: what the band says of each
    (and, with write_record, records/bands.json of it for the docs)."""
    path = band_path(config_path)
    if not os.path.isfile(path):
        raise UsageError(f"{config_path} has no band ({path} not found); measure it first: "
                         f"python -m machinery.bands measure {config_path}")
    record = load_band(path)
    if str(seed) in record["seeds"]:
        raise UsageError(f"--seed={seed} is one of the band's seeds ({', '.join(record['seeds'])}); choose another")
    band = limits(record)
    from machinery.configurator import load_train_config, train_defaults
    rate = load_train_config(train_defaults(), [config_path])["learning_rate"] * 10
    with tempfile.TemporaryDirectory(prefix="band-check-") as work:
        output, entries = train(config_path, os.path.join(work, "seed"), f"--seed={seed}")
        fast_output, fast_entries = train(config_path, os.path.join(work, "lr"), f"--seed={seed}",
                                          f"--learning_rate={rate:g}")
    gaps = [(hi - e[k], e[k] - lo) for e in entries for k in LOSSES
            if k in e and e["iter"] in band[k] for lo, hi in [band[k][e["iter"]]]]
    final = lambda es: ([None] + [round(e["val_loss"], 4) for e in es if e["type"] == "eval"])[-1]
    lines = said(fast_output)
    data = {"band_seeds": sorted(record["seeds"], key=int), "band": summary(record), "margin_fraction": MARGIN_FRACTION,
            "margin_floor": MARGIN_FLOOR, "above_logs": ABOVE_LOGS,
            "val_band": [round(x, 4) for x in band["val_loss"][record["eval_steps"][-1]]],
            "held_out": {"seed": seed, "lines": said(output), "compared": len(gaps),
                         "outside": sum(min(g) < 0 for g in gaps), "closest_to_top": round(min(g[0] for g in gaps), 4),
                         "closest_to_bottom": round(min(g[1] for g in gaps), 4), "val_loss": final(entries)},
            "lr10": {"learning_rate": rate, "lines": lines, "val_loss": final(fast_entries),
                     "step": int(re.search(r"iter (\d+)", lines[0]).group(1)) if lines else None}}
    print(json.dumps(data, indent=1))
    if write_record:
        records().write_record("bands", f"{path} checked with a new seed and with 10x the learning rate",
                               f"python -m machinery.bands check {config_path} --seed {seed} --record", data, QUOTED)


EN, ZH = "docs/en/03-training-loop.md", "docs/zh/03-training-loop.md"
QUOTED = [{"doc": doc, "text": text} for doc, text in [  # the docs' sentences on the record (tests/test_records.py)
    (EN, "At step {band[first_step]} the five seeds' batch loss ran from {band[loss_first][0]:.2f} to "
         "{band[loss_first][1]:.2f}, at step {band[last_step]} from {band[loss_last][0]:.2f} to "
         "{band[loss_last][1]:.2f}, and their val loss at step {band[last_step]} from {band[val_last][0]:.3f} to "
         "{band[val_last][1]:.3f}"),
    (EN, "each seed against the band of the other four fell outside it at {band[leave_one_out_raw][outside]} of "
         "the {band[leave_one_out_raw][points]} losses, by up to {band[leave_one_out_raw][farthest]:.2f}"),
    (EN, "{band[leave_one_out][outside]} of the {band[leave_one_out][points]} fall outside, by up to "
         "{band[leave_one_out][farthest]:.2f}, and train.py would have warned of {band[leave_one_out][said]} of "
         "the five seeds"),
    (EN, "Seed {held_out[seed]}, which the band was not measured with: {held_out[outside]} of its "
         "{held_out[compared]} losses outside, no line, and a val loss of {held_out[val_loss]:.4f} within "
         "{val_band[0]:.3f} to {val_band[1]:.3f}"),
    (EN, "At {lr10[learning_rate]:g}, ten times the recipe's learning rate, the same seed leaves the band from "
         "iter {lr10[step]} on, and its val loss ends at {lr10[val_loss]:.4f}"),
    (EN, "{lr10[lines][0]}"),
    (ZH, "第 {band[first_step]} 步时五个种子的批次损失在 {band[loss_first][0]:.2f} 到 {band[loss_first][1]:.2f} 之间，"
         "第 {band[last_step]} 步时在 {band[loss_last][0]:.2f} 到 {band[loss_last][1]:.2f} 之间；它们第 {band[last_step]} "
         "步的验证损失在 {band[val_last][0]:.3f} 到 {band[val_last][1]:.3f} 之间"),
    (ZH, "每个种子对照其余四个种子的区间，{band[leave_one_out_raw][points]} 个损失中有 "
         "{band[leave_one_out_raw][outside]} 个落在区间外，最远超出 {band[leave_one_out_raw][farthest]:.2f}"),
    (ZH, "{band[leave_one_out][points]} 个损失中只有 {band[leave_one_out][outside]} 个落在区间外，最远超出 "
         "{band[leave_one_out][farthest]:.2f}，五个种子中 train.py 会提示的有 {band[leave_one_out][said]} 个"),
    (ZH, "种子 {held_out[seed]} 不在测量区间所用的种子之中：它的 {held_out[compared]} 个损失中有 {held_out[outside]} "
         "个落在区间外，没有提示，验证损失 {held_out[val_loss]:.4f} 落在 {val_band[0]:.3f} 到 {val_band[1]:.3f} 之内"),
    (ZH, "学习率取 {lr10[learning_rate]:g}，即配方的十倍，同一个种子从第 {lr10[step]} 步起离开区间，验证损失最终为 "
         "{lr10[val_loss]:.4f}"),
    (ZH, "{lr10[lines][0]}")]]


def main():
    parser = ArgumentParser(description="Measure a recipe's loss band, or check it with a new seed.")
    parser.add_argument("action", choices=("measure", "check"))
    parser.add_argument("config", help="a recipe's config file, such as config/shakespeare_char_cpu.py")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="measure: one run per seed")
    parser.add_argument("--seed", type=int, default=6, help="check: a seed the band was not measured with")
    parser.add_argument("--record", action="store_true", help="check: write what it found to records/bands.json")
    args = parser.parse_args()
    if args.action == "measure":
        measure(args.config, seed_list(args.seeds))
    else:
        check(args.config, args.seed, args.record)


if __name__ == "__main__":
    run_cli(main)
