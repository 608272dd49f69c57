"""
Chapter 4.2.2's question, measured side by side: what Muon's Newton-Schulz steps cost in bfloat16 and in
float32, alone and inside a whole training step of the CPU recipe, on one thread and on two.

    python docs/muon_speed.py                  # prints the table
    python docs/muon_speed.py --record muon-speed   # and writes records/muon-speed.json
    python docs/muon_speed.py --runs MUON ADAMW ADAMW_4E3 --record muon-vs-adamw   # 4.2.3's table from its runs

Every setting is timed in interleaved rounds (so background load hits them alike) and the median taken:
    orthogonalise   machinery/optimizers.py: orthogonalise on the recipe's 16 block matrices, random
                    gradients, once each: the iteration alone, per optimizer step
    step            one whole step of the recipe's model (batch 16 of 64, random ids): forward, backward,
                    clip, the optimizers' steps, zero_grad, as train.py takes it
"""

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/muon_speed.py`: the modules it times live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)

import torch

from machinery import configurator
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.optimizers import orthogonalise
from model import GPT, GPTConfig
import train
from record import write_record

RECIPE = os.path.join(ROOT, "config", "shakespeare_char_cpu.py")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def recipe():
    c = configurator.load_config(train.DEFAULTS, [RECIPE])
    shape = GPTConfig(vocab_size=65, block_size=c["block_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                      n_embd=c["n_embd"], bias=c["bias"], dropout=c["dropout"])
    return c, shape


def time_orthogonalise(matrices, dtype, repeats):
    """Seconds per optimizer step for the iteration alone: every block matrix orthogonalised once."""
    start = time.perf_counter()
    for _ in range(repeats):
        for g in matrices:
            orthogonalise(g, dtype)
    return (time.perf_counter() - start) / repeats


class Step:
    """The recipe's model and optimizers, ready to take train.py's step on random batches."""

    def __init__(self, c, shape, optimizer, muon_dtype):
        torch.manual_seed(c["seed"])
        self.model = GPT(shape)
        self.optimizers = self.model.configure_optimizers(c["weight_decay"], c["learning_rate"],
                                                          (c["beta1"], c["beta2"]), "cpu", optimizer=optimizer,
                                                          muon_dtype=muon_dtype)
        self.x = torch.randint(shape.vocab_size, (c["batch_size"], shape.block_size))  # (B, T)
        self.y = torch.randint(shape.vocab_size, (c["batch_size"], shape.block_size))
        self.clip = c["grad_clip"]

    def seconds(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            _, loss = self.model(self.x, self.y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps


def measure(rounds, steps):
    c, shape = recipe()
    torch.manual_seed(0)
    matrices = [p.detach().clone().normal_() for n, p in GPT(shape).named_parameters()
                if p.dim() == 2 and ".h." in f".{n}"]  # the 16 matrices Muon updates, as random gradients
    settings = {"muon_bfloat16": ("muon", torch.bfloat16), "muon_float32": ("muon", torch.float32),
                "adamw": ("adamw", torch.float32)}
    runs = {name: Step(c, shape, *s) for name, s in settings.items()}
    samples = {}
    for _ in range(rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for dtype in DTYPES:
                key = f"orthogonalise_{dtype}_{threads}t"
                samples.setdefault(key, []).append(time_orthogonalise(matrices, DTYPES[dtype], 5))
            for name, run in runs.items():
                run.seconds(2)  # warm this setting's caches after the others ran
                samples.setdefault(f"step_{name}_{threads}t", []).append(run.seconds(steps))
    ms = {key: round(1000 * statistics.median(values), 1) for key, values in samples.items()}
    for threads in (1, 2):
        t = f"{threads}t"
        ms[f"slowdown_float32_{t}"] = round(ms[f"step_muon_float32_{t}"] - ms[f"step_muon_bfloat16_{t}"], 1)
        ms[f"iteration_gap_{t}"] = round(ms[f"orthogonalise_float32_{t}"] - ms[f"orthogonalise_bfloat16_{t}"], 1)
        ms[f"muon_over_adamw_{t}"] = round(ms[f"step_muon_bfloat16_{t}"] / ms[f"step_adamw_{t}"], 2)
        ms[f"muon_float32_over_adamw_{t}"] = round(ms[f"step_muon_float32_{t}"] / ms[f"step_adamw_{t}"], 2)
    return ms


QUOTED = [
    ("en", "04-experiments.md", "the iteration alone took {orthogonalise_bfloat16_1t} ms per step in bfloat16 and "
     "{orthogonalise_float32_1t} in float32 on one thread ({orthogonalise_bfloat16_2t} and "
     "{orthogonalise_float32_2t} on two), and a whole step of the recipe {step_muon_bfloat16_1t} against "
     "{step_muon_float32_1t} ms on one thread, {step_muon_bfloat16_2t} against {step_muon_float32_2t} on two"),
    ("zh", "04-experiments.md", "单独的迭代每步 bfloat16 {orthogonalise_bfloat16_1t} 毫秒、float32 "
     "{orthogonalise_float32_1t} 毫秒（单线程；双线程为 {orthogonalise_bfloat16_2t} 和 {orthogonalise_float32_2t}），"
     "配方的完整一步单线程 {step_muon_bfloat16_1t} 对 {step_muon_float32_1t} 毫秒，双线程 {step_muon_bfloat16_2t} 对 "
     "{step_muon_float32_2t} 毫秒"),
    ("en", "04-experiments.md", "the {muon_over_adamw_1t} that `docs/muon_speed.py`\nmeasured side by side on one thread"),
    ("zh", "04-experiments.md", "在 Zen 4 的单线程上并排测得的 {muon_over_adamw_1t} 倍"),
    (None, "README.md", "timed side by side on the Zen 4, {step_muon_float32_1t} instead of {step_muon_bfloat16_1t} ms on one "
     "thread"),
]


def run_figures(folder):
    """A finished run's figures from its metrics.jsonl: the train loss logged at step 100, the first 50 steps'
    logged losses, the logged step times and the last evaluation's val loss."""
    import json
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; give the folders of finished runs (4.2.3 lists their commands)")
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    train_lines = [e for e in lines if e["type"] == "train"]
    ms = sorted(e["ms_per_iter"] for e in train_lines if e["iter"] > 10)
    return {"loss100": round(next(e["loss"] for e in train_lines if e["iter"] == 100), 4),
            "first50": [round(e["loss"], 3) for e in train_lines if e["iter"] <= 50],
            "ms_min": round(ms[0]), "ms_max": round(ms[-1]), "ms_median": round(statistics.median(ms)),
            "val": round([e for e in lines if e["type"] == "eval"][-1]["val_loss"], 4)}


RUNS_QUOTED = [
    ("the three runs end at {muon[val]:.3f}, {adamw[val]:.3f} and {adamw_4e3[val]:.3f}, at step 100 their train losses are "
     "{muon[loss100]:.2f}, {adamw[loss100]:.2f} and {adamw_4e3[loss100]:.2f}, AdamW at 1e-2 sits near {plateau:.1f} over its "
     "first 50 steps, and their logs' median steps are {muon[ms_median]} ms for Muon against {adamw[ms_median]} and "
     "{adamw_4e3[ms_median]} for AdamW",
     "三次运行最终为 {muon[val]:.3f}、{adamw[val]:.3f} 和 {adamw_4e3[val]:.3f}，第 100 步的训练损失为 {muon[loss100]:.2f}、"
     "{adamw[loss100]:.2f} 和 {adamw_4e3[loss100]:.2f}，1e-2 的 AdamW 在前 50 步停在 {plateau:.1f} 附近，日志中每步耗时的中位数是 "
     "Muon {muon[ms_median]} 毫秒，AdamW {adamw[ms_median]} 和 {adamw_4e3[ms_median]} 毫秒"),
]


def record_runs(folders, name):
    runs = dict(zip(("muon", "adamw", "adamw_4e3"), map(run_figures, folders)))
    data = dict(runs, plateau=round(statistics.median(runs["adamw"]["first50"]), 3))  # AdamW at 1e-2, steps 10-50
    print(data)
    if name:
        write_record(name, "chapter 4.2.3's three runs at the recipe's budget: Muon, AdamW at 1e-2, AdamW at 4e-3 "
                     "(the Muon run with float32 Newton-Schulz steps, as on the Zen 3 of 4.1; two runs at a time, "
                     "one thread each)", "OMP_NUM_THREADS=1 python docs/ablations.py none --without_bf16; " +
                     "; ".join(f"OMP_NUM_THREADS=1 python train.py config/shakespeare_char_cpu.py --optimizer=adamw{flags} "
                               f"--out_dir=out-muon/{out}" for flags, out in
                               (("", "adamw-1e-2"), (" --learning_rate=4e-3 --min_lr=4e-4", "adamw-4e-3"))) +
                     f"; python docs/muon_speed.py --runs {' '.join(folders)} --record {name}", data,
                     [{"doc": f"docs/{lang}/04-experiments.md", "text": text} for pair in RUNS_QUOTED
                      for lang, text in zip(("en", "zh"), pair)])


def main():
    parser = ArgumentParser(description="Time Muon's Newton-Schulz steps in bfloat16 and float32, alone and in a "
                            "step of the CPU recipe, on one thread and two.")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=5, help="training steps per setting per round")
    parser.add_argument("--record", metavar="name", help="also write records/<name>.json")
    parser.add_argument("--runs", nargs=3, metavar="run_folder", help="instead: 4.2.3's table from its three finished "
                        "runs (Muon, AdamW at 1e-2, AdamW at 4e-3)")
    args = parser.parse_args()
    if args.runs:
        return record_runs(args.runs, args.record)
    if args.rounds < 1 or args.steps < 1:
        raise UsageError(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    ms = measure(args.rounds, args.steps)
    for key, value in ms.items():
        print(f"{key:32s} {value}")
    if args.record:
        command = f"python docs/muon_speed.py --rounds {args.rounds} --steps {args.steps} --record {args.record}"
        write_record(args.record, "Muon's Newton-Schulz steps in bfloat16 and float32, alone and in a recipe "
                     "step, one and two threads (ms, medians of interleaved rounds)", command, ms,
                     [{"doc": f"docs/{lang}/{doc}" if lang else doc, "text": text} for lang, doc, text in QUOTED])


if __name__ == "__main__":
    run_cli(main)
