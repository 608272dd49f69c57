"""
Chapter 5.6.1's measurements: the CPU recipe with and without its training timeline, side by side, and the
story its snapshots tell (what the model predicts at each stage, when its heads form, which heads matter).

    python docs/timeline_story.py                 # 3 runs each way, interleaved; writes records/timeline.json
    python docs/timeline_story.py --quote-only    # rewrite the record's quoted texts from its data (no runs)

The runs go into out-timeline-story/ (git-ignored); the last run with snapshots stays there, for the lens:
    python lens.py --ckpt out-timeline-story/with-3
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/timeline_story.py`: the modules it uses live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)

import torch
from torch.nn import functional as F

from machinery.cli import ArgumentParser, run_cli
from record import RECORDS, write_record

OUT = os.path.join(ROOT, "out-timeline-story")
PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the"
COMMAND = "python docs/timeline_story.py"


def recipe_run(name, snapshots):
    """(seconds of the whole process, its best val loss) of the CPU recipe into OUT/name."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", "config/shakespeare_char_cpu.py", f"--out_dir={OUT}/{name}",
                             f"--snapshots={snapshots}", "--replace_earlier_run=True"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    val = float(re.search(r"best val loss ([0-9.]+)", result.stdout).group(1))
    print(f"{name}: {seconds:.1f} s, val {val:.4f}", flush=True)
    return seconds, val


def ngram_losses(lens, sample):
    """The loss on the heads' fixed val sample of a unigram and a bigram model counted on the train split:
    the yardsticks a character model passes on its way (add-one smoothing)."""
    from data import load_split
    from machinery.checkpoint import load_checkpoint
    config = load_checkpoint(lens.path)[1]["config"]
    train = torch.from_numpy(load_split(config["data_dir"], config["dataset"], "train").astype("int64"))
    V = lens.model.config.vocab_size
    unigram = torch.bincount(train, minlength=V).double() + 1
    bigram = torch.zeros(V, V, dtype=torch.float64).index_put_((train[:-1], train[1:]),
                                                               torch.ones(len(train) - 1, dtype=torch.float64),
                                                               accumulate=True) + 1
    X, Y = sample
    uni = -(unigram / unigram.sum()).log()[Y].mean().item()
    bi = -(bigram / bigram.sum(1, keepdim=True)).log()[X, Y].mean().item()
    return uni, bi


def story(folder):
    """What the snapshots of the run in folder say: per snapshot its sample loss, its greedy continuation of
    PROMPT, its strongest previous-token and induction heads, and the heads that matter most by knock-out."""
    from generate import load_model
    from lens import Lens
    path = os.path.join(folder, "best_model.pt")
    model, tokenizer = load_model(path, "cpu", "float32")
    lens = Lens(model, tokenizer, path, "cpu")
    switch = []
    for step in lens.snapshots:  # the first look at each snapshot loads it: the lens's switch, measured
        start = time.perf_counter()
        lens.analyse({"prompt": PROMPT, "step": step})
        switch.append(time.perf_counter() - start)
    report = lens.heads()
    sample, _ = lens.val_sample()
    unigram, bigram = ngram_losses(lens, sample)
    rows = []
    for snap in report["snapshots"][:-1]:  # the last is the checkpoint itself
        def ranked(score):  # [(score, "L<layer>H<head>")], highest first
            return sorted(((h[score], f"L{l + 1}H{i + 1}") for l, layer in enumerate(snap["heads"])
                           for i, h in enumerate(layer)), reverse=True)
        with torch.no_grad():
            snapshot_model, _ = lens.model_at(snap["step"])
            idx = torch.tensor([tokenizer.encode(PROMPT)])
            out = snapshot_model.generate(idx, 40, temperature=0)  # greedy: the model's own best guess
        greedy = tokenizer.decode(out[0, idx.size(1):].tolist())
        rows.append({"step": snap["step"], "loss": snap["loss"], "greedy": greedy,
                     "previous": ranked("previous")[0], "induction": ranked("induction")[0],
                     "knockout": ranked("knockout")[:3]})
    return {"unigram": round(unigram, 4), "bigram": round(bigram, 4), "snapshots": rows,
            "switch_s_max": round(max(switch), 3), "switch_s_median": round(statistics.median(switch), 3)}


def main():
    p = ArgumentParser(description="Chapter 5.6.1's measurements: the recipe with and without its timeline.")
    p.add_argument("--runs", type=int, default=3, help="runs each way, interleaved")
    p.add_argument("--quote-only", action="store_true", help="rewrite the record's quoted texts from its data")
    args = p.parse_args()
    os.chdir(ROOT)  # the recipe's data_dir is relative to the repository
    path = os.path.join(RECORDS, "timeline.json")
    if args.quote_only:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    else:
        timings = {"with": [], "without": []}
        for i in range(1, args.runs + 1):
            for way, setting in (("without", False), ("with", True)):
                timings[way].append(recipe_run(f"{way}-{i}", setting))
        folder = os.path.join(OUT, f"with-{args.runs}")
        files = os.listdir(os.path.join(folder, "timeline"))
        data = {way: {"seconds": [round(s, 1) for s, _ in runs], "val": [v for _, v in runs],
                      "median_s": round(statistics.median(s for s, _ in runs), 1)} for way, runs in timings.items()}
        data["ratio"] = round(data["with"]["median_s"] / data["without"]["median_s"], 3)
        data["snapshot_count"] = len(files) - 1
        data["timeline_mb"] = round(sum(os.path.getsize(os.path.join(folder, "timeline", f)) for f in files) / 1e6, 1)
        data["story"] = story(folder)
    write_record("timeline", "the CPU recipe with and without its timeline (whole processes, interleaved), the "
                 "timeline's size, and what its snapshots show", COMMAND, derived(data), quoted())
    print(json.dumps(data, indent=1))


def derived(data):
    """The figures the chapter quotes that follow from the measured ones: the highest induction score of any head
    at any snapshot, and what a head that spreads its weight evenly scores on the induction test (the queries
    of the second copy, t = half .. 2 * half - 1, each see t + 1 positions)."""
    half = 32  # lens.py: block_size // 2 for the recipe's block of 64
    story = data["story"]
    story["induction_max"] = max(row["induction"][0] for row in story["snapshots"])
    story["induction_chance"] = round(statistics.mean(1 / (t + 1) for t in range(half, 2 * half)), 4)
    return data


def quoted():
    """Where chapter 5.6.1 quotes the record (EN and ZH): the same figures, in each language's sentence."""
    s = "story[snapshots]"
    rows = [f"| {{{s}[{i}][step]}} | {{{s}[{i}][loss]:.4f}} |" for i in (0, 3, 5, 7, 8, 10)]
    greedy = [f"`{{{s}[{i}][greedy]:.20}}`" for i in (0, 5, 7, 8, 10)]
    en = ["The CPU recipe keeps {snapshot_count} snapshots, {timeline_mb} MB in all",
          "the medians of 3 whole runs each, interleaved, are {with[median_s]} s with them and {without[median_s]} s",
          "runs without them ({without[seconds][0]} to {without[seconds][1]} s)", "the same val\nloss, {with[val][0]}",
          "the commonest character, the space, everywhere, and its loss ({" + s + "[3][loss]:.4f}) is already",
          "({story[unigram]} on the same sample)", "Between step 32 ({" + s + "[6][loss]:.4f}) and step 64",
          "passes a bigram model ({story[bigram]})", "is\n  {" + s + "[7][previous][0]} at step 64, {" + s +
          "[8][previous][0]} at step 128 and {" + s + "[10][previous][0]} at step 450",
          "at any snapshot is {story[induction_max]}", "scores {story[induction_chance]} on this test",
          "sample by {" + s + "[10][knockout][0][0]:.4f} at step 450; the next, layer 1's head 4, by {" + s +
          "[10][knockout][1][0]:.4f}; layer 1's head 2 by {" + s + "[10][knockout][2][0]:.4f}",
          "at most {story[switch_s_max]} s here"]
    zh = ["CPU 配方会留下 {snapshot_count} 个快照，共 {timeline_mb} MB",
          "中位数分别是 {with[median_s]} s（留快照）和 {without[median_s]} s（不留）",
          "（{without[seconds][0]} 到 {without[seconds][1]} s）", "验证损失都是 {with[val][0]}",
          "（{" + s + "[3][loss]:.4f}）已经低于", "（同一样本上为 {story[unigram]}）", "在第 32 步\n（{" + s + "[6][loss]:.4f}）",
          "超过了二元模型（{story[bigram]}）", "第 64 步是 {" + s + "[7][previous][0]}，\n  第 128 步是 {" + s +
          "[8][previous][0]}，第 450 步是 {" + s + "[10][previous][0]}", "最高归纳分数是 {story[induction_max]}",
          "在这个测试上得\n  {story[induction_chance]}", "样本上的损失上升 {" + s + "[10][knockout][0][0]:.4f}",
          "上升 {" + s + "[10][knockout][1][0]:.4f}；第 1 层第 2 个头上升 {" + s + "[10][knockout][2][0]:.4f}",
          "这里最多 {story[switch_s_max]} s"]
    return ([{"doc": "docs/en/05-model.md", "text": t} for t in en + rows + greedy]
            + [{"doc": "docs/zh/05-model.md", "text": t} for t in zh + rows + greedy])

if __name__ == "__main__":
    run_cli(main)
