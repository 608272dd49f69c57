"""
Measure speed as ratios taken side by side: the fast path (what train.py does by default on this
device) against the reference path (what nanoGPT does on it), interleaved A B A B ... so that noise
hits both alike, each figure the median of several repeats.

    python bench.py                                    # training, generation and eval at the default shapes
    python bench.py --config config/shakespeare.py     # training at a config's shape
    python bench.py --data                             # dataset preparation speed on a generated 200 MB text
    python bench.py --recipe --nanogpt=../nanoGPT      # time to val 1.88: our CPU recipe vs nanoGPT's own code
    python bench.py --recipe --nanogpt=../nanoGPT --keep_runs=out-recipe  # ... and keep our runs for plot.py
    python bench.py --json                             # also one JSON object per measurement on stdout
    python bench.py --training --record bench_cpu      # only the training rows, also as records/bench_cpu.json

Each row is printed as soon as it is measured, and a line on stderr says what is being measured now; Ctrl-C
keeps the rows printed so far (the one in progress is lost) and exits with status 130.
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from data import load_split, windows_at
from generate import model_from_checkpoint
from machinery import configurator, devices
from machinery.checks import integer
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.devices import fast_path, pick_device, sync
from machinery.evaluation import mean_loss, whole_split_starts
from machinery.health import Guard, update_ratios
from machinery.speed import estimate_mfu, flops_per_token, peak_flops
from model import GPT, GPTConfig

DEFAULTS = configurator.train_defaults()  # train.py's defaults block, read as data

ROOT = os.path.dirname(os.path.abspath(__file__))
# (name, n_layer, n_head, n_embd, block_size, batch_size): the CPU recipe and the GPU recipe's model
DEFAULT_SHAPES = [("4x128x64", 4, 4, 128, 64, 12), ("6x384x256", 6, 6, 384, 256, 12)]
VOCAB = 65
# GPT-2 (124M): 12 x 12 x 768, block 1024, batch 12, its 50257-token vocabulary padded to 50304
MONITOR_INTERVAL = DEFAULTS["monitor_interval"]
GPT2_SHAPE, GPT2_VOCAB = ("gpt2-124M", 12, 12, 768, 1024, 12), 50304


def reference_path(device_type):
    """What nanoGPT does: eager fp32 + AdamW with no flag (fused=True only on CUDA), which PyTorch runs
    as its for-loop implementation on CPU tensors, + a host sync per step on CPU; on CUDA bf16 autocast,
    torch.compile, fused SDPA and fused AdamW, syncing only to log."""
    if device_type == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return {"dtype": dtype, "compile": True, "fused_adamw": True, "sync_every_step": False}
    return {"dtype": "float32", "compile": False, "fused_adamw": False, "sync_every_step": True}


class Trainer:
    """One model + optimizer set up the way a path says, able to run timed training steps."""

    def __init__(self, shape, path, device, monitor=False, vocab=VOCAB):
        name, n_layer, n_head, n_embd, block_size, batch_size = shape
        torch.manual_seed(0)
        self.device, self.path, self.batch_size, self.block_size = device, path, batch_size, block_size
        # train.py's health monitor: the NaN guard decided on the device every step, update ratios every
        # MONITOR_INTERVAL steps (train.py's default monitor_interval)
        self.monitor = monitor
        self.model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                   vocab_size=vocab)).to(device)
        device_type = devices.device_type(device)
        groups = [{"params": list(self.model.parameters()), "name": "all"}]
        # as nanoGPT's configure_optimizers: fused=True where the path fuses, else no flag (PyTorch's default)
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, **({"fused": True} if path["fused_adamw"] else {}))
        self.forward = torch.compile(self.model) if path["compile"] else self.model
        dtype = getattr(torch, path["dtype"])
        self.autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        where = SimpleNamespace(device=device, device_type=device_type, fsdp=False)  # what Guard asks of a run
        self.guard = Guard([self.optimizer], self.scaler, 3, where, self.model, None, None)
        tokens = torch.randint(0, vocab, (batch_size * 64, block_size + 1), device=device)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # 64 batches, reused

    def step(self, i):
        rows = slice((i % 64) * self.batch_size, (i % 64 + 1) * self.batch_size)
        params = list(self.model.parameters())
        monitor_step = self.monitor and i % MONITOR_INTERVAL == 0
        before = [p.detach().clone() for p in params] if monitor_step else None
        with self.autocast:
            _, loss = self.forward(self.x[rows], self.y[rows])
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not self.monitor or self.guard.allows_step(loss, norm):  # train.py's step, guarded or not
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if monitor_step:
            update_ratios([self.optimizer], params, before)
        self.optimizer.zero_grad(set_to_none=True)
        if self.path["sync_every_step"]:
            loss.item()
        return loss

    def timed(self, steps):
        """Seconds per step over `steps` steps."""
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(steps):
            loss = self.step(i)
        loss.item()
        sync(self.device)
        return (time.perf_counter() - t0) / steps


def interleaved(a, b, repeats):
    """Median seconds of a() and b(), called alternately: a b a b ..."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(a())
        times_b.append(b())
    return statistics.median(times_a), statistics.median(times_b)


def started(what):
    """Progress: one line on stderr as each measurement starts (a measurement can take minutes)."""
    print(f"measuring {what} ...", file=sys.stderr, flush=True)


def unshown(row):
    pass


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process, in MB


def bench_training(shape, device, repeats, vocab=VOCAB):
    device_type = devices.device_type(device)
    n_embd = shape[3]
    fast, ref = fast_path(device_type, n_embd), reference_path(device_type)
    trainers = {"fast": Trainer(shape, {**fast, "fused_adamw": True, "sync_every_step": False}, device, vocab=vocab),
                "reference": Trainer(shape, ref, device, vocab=vocab)}
    started(f"training tokens/s, {shape[0]}, fast path vs reference")
    tokens_per_step = shape[5] * shape[4]
    steps = max(3, int(3e6 / (flops_per_token(trainers["fast"].model) * tokens_per_step / 1e6)))  # ~3 GFLOP-s
    steps = 20 if device_type == "cuda" else min(steps, 40)  # a GPU step is milliseconds: time a stretch
    for trainer in trainers.values():  # warm up: compile, allocator, caches
        trainer.timed(3)
    t_fast, t_ref = interleaved(lambda: trainers["fast"].timed(steps), lambda: trainers["reference"].timed(steps),
                                repeats)
    row = {"metric": "train_tokens_per_s", "shape": shape[0], "fast": tokens_per_step / t_fast,
           "reference": tokens_per_step / t_ref, "ratio": t_ref / t_fast, "peak_memory_mb": peak_memory_mb(device),
           "fast_settings": fast, "reference_settings": ref}
    for path, seconds in (("fast", t_fast), ("reference", t_ref)):
        peak = peak_flops(device, getattr(torch, trainers[path].path["dtype"]))  # train.py's MFU, the same peak
        row[f"{path}_ms_per_iter"] = seconds * 1000
        row[f"{path}_mfu"] = estimate_mfu(trainers[path].model, tokens_per_step / seconds, peak)
    return [row]


def bench_monitor(shape, device, repeats):
    """The health monitor's cost: fast-path training with it against without it."""
    started(f"the health monitor's cost, {shape[0]}")
    device_type = devices.device_type(device)
    path = {**fast_path(device_type, shape[3]), "fused_adamw": True, "sync_every_step": False}
    plain, watched = Trainer(shape, path, device), Trainer(shape, path, device, monitor=True)
    for trainer in (plain, watched):
        trainer.timed(3)
    # the difference is small against the noise, so three times the repeats
    steps = MONITOR_INTERVAL  # each timed stretch holds exactly one update-ratio measurement
    t_plain, t_watched = interleaved(lambda: plain.timed(steps), lambda: watched.timed(steps), 3 * repeats)
    return [{"metric": "monitor_overhead", "shape": shape[0], "fast": t_plain * 1000, "reference": t_watched * 1000,
             "ratio": t_plain / t_watched,
             "note": f"ms/iter without and with the monitor (update ratios every {MONITOR_INTERVAL} steps)"}]


def bench_generation(device, repeats, new_tokens, shape=DEFAULT_SHAPES[1], show=unshown):
    """New tokens per second with the KV cache against without it (the GPU recipe's model by default); show:
    called with each row as it is measured."""
    name, n_layer, n_head, n_embd, block_size, _ = shape
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=VOCAB)).to(device).eval()
    results = []
    for batch in (1, 8):
        for prompt_name, prompt_len in (("short", 8), ("half_block", block_size // 2)):
            idx = torch.randint(0, VOCAB, (batch, prompt_len), device=device)
            started(f"generation tokens/s, {name} batch {batch} {prompt_name} prompt, KV cache vs none")

            def run(kv_cache):
                sync(device)
                t0 = time.perf_counter()
                model.generate(idx, new_tokens, temperature=1.0, top_k=50, kv_cache=kv_cache)
                sync(device)
                return new_tokens * batch / (time.perf_counter() - t0)
            cached, uncached = interleaved(lambda: run(True), lambda: run(False), repeats)
            results.append({"metric": "generate_tokens_per_s", "shape": f"{name} batch {batch} {prompt_name} prompt",
                            "fast": cached, "reference": uncached, "ratio": cached / uncached,
                            "new_tokens": new_tokens, "kv_cache": "fast"})
            show(results[-1])
    return results


def bench_decode(device, repeats, new_tokens=200, shapes=((DEFAULT_SHAPES[1], VOCAB), (GPT2_SHAPE, GPT2_VOCAB)),
                 show=unshown):
    """Milliseconds per new token with the KV cache, as generate.py samples: batch 1 and 8, float32
    against the device's default dtype, for the GPU recipe's model and for GPT-2 (124M); show: called with
    each row as it is measured."""
    device_type = devices.device_type(device)
    rows = []
    for shape, vocab in shapes:
        name, n_layer, n_head, n_embd, block_size, _ = shape
        default = fast_path(device_type, n_embd)["dtype"]
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                              vocab_size=vocab)).to(device).eval()
        models = {"float32": model, default: copy.deepcopy(model).to(getattr(torch, default))}
        for batch in (1, 8):
            idx = torch.randint(0, vocab, (batch, 8), device=device)
            started(f"decoding ms/token, {name} batch {batch}, {default} vs float32")

            def ms_per_token(dtype):
                sync(device)
                t0 = time.perf_counter()
                for token in models[dtype].generate_stream(idx, new_tokens, temperature=0.8, top_k=200):
                    token.tolist()  # generate.py reads each token back to print it
                return (time.perf_counter() - t0) / new_tokens * 1000
            ms_per_token(default)  # warm up: kernel choices, allocator
            ms_default, ms_float32 = interleaved(lambda: ms_per_token(default), lambda: ms_per_token("float32"),
                                                 repeats)
            rows.append({"metric": "decode_ms_per_token", "shape": f"{name} batch {batch}", "fast": ms_default,
                         "reference": ms_float32, "ratio": ms_float32 / ms_default, "fast_dtype": default,
                         "reference_dtype": "float32", "new_tokens": new_tokens})
            show(rows[-1])
    return rows


def bench_eval(device, repeats, eval_iters=200):
    """One eval pass (eval_iters batches of the CPU recipe's shape, train and val) in inference mode
    against the reference's no_grad."""
    started("one eval pass, inference_mode vs no_grad")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=VOCAB)).to(device).eval()
    xs = torch.randint(0, VOCAB, (eval_iters, 12, 64), device=device)
    ys = torch.randint(0, VOCAB, (eval_iters, 12, 64), device=device)

    def run(mode):
        sync(device)
        t0 = time.perf_counter()
        with mode():
            for _ in range(2):
                total = torch.zeros((), device=device)
                for x, y in zip(xs, ys):
                    total += model(x, y)[1]
                total.item()
        return time.perf_counter() - t0
    fast, ref = interleaved(lambda: run(torch.inference_mode), lambda: run(torch.no_grad), repeats)
    return [{"metric": "eval_pass_seconds", "shape": "4x128x64", "fast": fast, "reference": ref, "ratio": ref / fast}]


# ---------------------------------------------------------------------------------------------
# Data preparation and whole-recipe timing run real processes


def make_text(path, megabytes):
    """A `megabytes` MB text of Shakespeare-like lines (varied, so BPE has real work)."""
    rng = np.random.default_rng(0)
    words = ("the king lord love death night thou art my sweet heart speak noble blood crown fair "
             "sword honour grace heaven earth queen duke hath doth shall upon mine eyes tongue").split()
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 2 ** 20:
            picks = rng.integers(0, len(words), size=(2000, 8))
            lines = "\n".join(" ".join(words[i] for i in row).capitalize() + rng.choice([",", ".", "!", "?"])
                              for row in picks) + "\n\n"
            f.write(lines)
            written += len(lines)


# Run by each measured child before its own code: at exit it reports the child's own peak RSS
# (VmHWM starts afresh at exec; ru_maxrss would include the parent's memory at fork time).
PEAK_PROBE = """import atexit, sys
def _report_peak():
    try:
        with open('/proc/self/status') as f:
            print('peak_rss_kb', *[l.split()[1] for l in f if l.startswith('VmHWM')], file=sys.stderr)
    except OSError:
        pass
atexit.register(_report_peak)
"""


def script_code(name):
    """Python code that runs script `name` as __main__ with the command line's arguments."""
    return f"import runpy, sys; sys.argv[0] = {name!r}; runpy.run_path({name!r}, run_name='__main__')"


def run_process(code, args=(), env=None):
    """(seconds, peak RSS in MB, stdout) of `python -c code args...` in a fresh process."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE + code, *args], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise UsageError(f"{' '.join(map(str, args[:3]))} failed: {result.stderr.strip().splitlines()[-1:]}")
    peaks = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("peak_rss_kb ")]
    return seconds, peaks[-1] / 1024 if peaks else float("nan"), result.stdout


def reference_prepare(path, tokenizer, out):
    """nanoGPT's way: the whole text in memory, tokenized in one go on one core."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if tokenizer == "char":
        stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
        ids = [stoi[ch] for ch in text]
    else:
        from machinery.gpt2_bpe import gpt2_encoding
        ids = gpt2_encoding().encode_ordinary(text)
    np.array(ids, dtype=np.uint16).tofile(out)


def bench_data(megabytes, show=unshown):
    """data.py (streamed, vectorised, all cores) against the whole-text reference, as processes; show: called
    with each row as it is measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "big.txt")
        make_text(text, megabytes)
        size_mb = os.path.getsize(text) / 2 ** 20
        for tokenizer in ("char", "gpt2"):
            started(f"preparing {size_mb:.0f} MB, {tokenizer} tokenizer, data.py vs the whole-text reference")
            fast_s, fast_peak, _ = run_process(script_code("data.py"), ["--input", text, "--name", tokenizer,
                                                                        "--tokenizer", tokenizer, "--data_dir", tmp])
            code = f"import bench; bench.reference_prepare({text!r}, {tokenizer!r}, {tmp + '/ref.bin'!r})"
            ref_s, ref_peak, _ = run_process(code)
            rows.append({"metric": "prepare_mb_per_s", "shape": f"{size_mb:.0f} MB text, {tokenizer}",
                         "fast": size_mb / fast_s, "reference": size_mb / ref_s, "ratio": ref_s / fast_s,
                         "fast_peak_rss_mb": fast_peak, "reference_peak_rss_mb": ref_peak})
            show(rows[-1])
    return rows


# nanoGPT's README command for training on a CPU, run with nanoGPT's own code in its own checkout
NANOGPT_PREPARE = ["data/shakespeare_char/prepare.py"]
NANOGPT_CPU_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                       "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
                       "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
OUR_CPU_COMMAND = ["train.py", "config/shakespeare_char_cpu.py"]


def timed(argv, cwd, env=None):
    """(seconds, stdout) of the whole process `python argv...`, run in cwd."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise UsageError(f"`python {' '.join(argv)}` in {cwd} failed: {result.stderr.strip().splitlines()[-1:]}")
    return seconds, result.stdout


def whole_split_loss(ckpt_path, val_data, block_size=64):
    """A checkpoint's mean loss over every non-overlapping block_size window of val_data: the split's exact
    loss, not an estimate, scored as train.py scores it (machinery/evaluation.py). Reads GlassGPT's
    checkpoints (generate.py: model_from_checkpoint) and nanoGPT's (the same module names, model_args beside the
    weights); both load as tensors and plain containers only."""
    payload = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "meta" in payload:
        model = model_from_checkpoint(ckpt_path)[0]
    else:  # nanoGPT's format
        args = payload["model_args"]
        model = GPT(GPTConfig(**{k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                                       "vocab_size")}))
        model.load_state_dict(payload["model"])
    with torch.inference_mode():
        starts = whole_split_starts(len(val_data), block_size, 64)
        batches = (windows_at(val_data, ix, block_size, "cpu") for ix in starts)
        return mean_loss(model.eval(), batches, "cpu")


def bench_recipe(nanogpt, rounds, keep_runs=None, show=unshown):
    """From text to a trained model, as whole processes: our CPU recipe (which prepares the data on its first
    run) against nanoGPT's README CPU command with nanoGPT's own code, after nanoGPT's own prepare.py. The
    two alternate (ours first in even rounds, nanoGPT first in odd ones), each from a fresh copy of the same
    text. Both best checkpoints are scored on the whole val split. Our runs' folders go to keep_runs/ when
    it is given (for plot.py). show: called with each row as it is measured."""
    text = os.path.join(nanogpt, "data", "shakespeare_char", "input.txt")
    if not os.path.isfile(os.path.join(nanogpt, "train.py")) or not os.path.isfile(text):
        raise UsageError(f"--nanogpt={nanogpt} is not a nanoGPT checkout with data/shakespeare_char/input.txt: "
                         "git clone https://github.com/karpathy/nanoGPT and put tiny Shakespeare's input.txt there")
    peak_flops("cpu", torch.float32)  # train.py measures it once per machine and caches it: not part of a round
    env = dict(os.environ, GLASSGPT_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            data_dir, out_dir = os.path.join(tmp, f"data{r}"), os.path.join(keep_runs or tmp, f"ours{r}")
            os.makedirs(os.path.join(data_dir, "shakespeare_char"))
            shutil.copy(text, os.path.join(data_dir, "shakespeare_char"))
            row = {"metric": "recipe_seconds", "shape": f"4x128x64 shakespeare_char round {r + 1}"}
            for side in ("fast", "reference") if r % 2 == 0 else ("reference", "fast"):
                who = "our CPU recipe" if side == "fast" else "nanoGPT's CPU command"
                started(f"round {r + 1} of {rounds}: {who}, from text to a trained model")
                if side == "fast":
                    row["fast"], _ = timed([*OUR_CPU_COMMAND, f"--data_dir={data_dir}", f"--out_dir={out_dir}"],
                                           ROOT, env)
                else:
                    # what nanoGPT's command leaves, so that it prepares afresh as we do and its checkpoint is new
                    for path in ("data/shakespeare_char/train.bin", "data/shakespeare_char/val.bin",
                                 "data/shakespeare_char/meta.pkl", "out-shakespeare-char/ckpt.pt"):
                        if os.path.exists(os.path.join(nanogpt, path)):
                            os.remove(os.path.join(nanogpt, path))
                    prepare_s, _ = timed(NANOGPT_PREPARE, nanogpt)
                    train_s, _ = timed(NANOGPT_CPU_COMMAND, nanogpt)
                    row["reference"] = prepare_s + train_s
            val = load_split(data_dir, "shakespeare_char", "val")
            row["fast_val_loss"] = whole_split_loss(os.path.join(out_dir, "best_model.pt"), val)
            row["reference_val_loss"] = whole_split_loss(os.path.join(nanogpt, "out-shakespeare-char", "ckpt.pt"), val)
            row["ratio"] = row["reference"] / row["fast"]
            rows.append(row)
            show(row)
    rows.append({"metric": "recipe_seconds", "shape": f"4x128x64 median of {rounds} rounds",
                 **{k: statistics.median(row[k] for row in rows)
                    for k in ("fast", "reference", "ratio", "fast_val_loss", "reference_val_loss")}})
    show(rows[-1])
    return rows


def print_row(r):
    """One line per measurement: the fast figure, the reference figure, and how many times better."""
    print(f"{r['metric']:<22} {r['shape']:<36} fast {r['fast']:>11,.1f}  reference {r['reference']:>11,.1f}"
          f"  ratio {r['ratio']:5.2f}x" + (f"  whole-val loss fast {r['fast_val_loss']:.4f} reference "
                                           f"{r['reference_val_loss']:.4f}" if "fast_val_loss" in r else ""),
          flush=True)


class Table:
    """The rows measured so far, each printed the moment it is measured (with --json, its JSON object on the
    next line): an interrupted bench has printed every finished row."""

    def __init__(self, json_too, device_name):
        self.rows, self.json_too, self.device_name = [], json_too, device_name

    def show(self, row):
        self.rows.append(row)
        print_row(row)
        if self.json_too:
            print(json.dumps({**row, "device": self.device_name}), flush=True)


INTERRUPTED = "the rows printed above are complete; the measurement in progress is lost"


def main():
    p = ArgumentParser(description="GlassGPT speed, measured as side-by-side ratios.")
    p.add_argument("--config", help="measure training at this config file's model shape")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=integer(1), default=5, help="interleaved repeats; figures are medians")
    p.add_argument("--new_tokens", type=integer(1), default=500, help="tokens generated per generation run")
    p.add_argument("--data", action="store_true", help="only: dataset preparation speed on a generated text")
    p.add_argument("--data_mb", type=integer(1, 100_000), default=200)
    p.add_argument("--recipe", action="store_true", help="only: time to val 1.88, ours vs nanoGPT's recipe")
    p.add_argument("--decode", action="store_true", help="only: decoding ms/token, default dtype vs float32")
    p.add_argument("--gpt2", action="store_true", help="only: training at the GPT-2 (124M) shape")
    p.add_argument("--nanogpt", help="for --recipe: a checkout of github.com/karpathy/nanoGPT, run unmodified")
    p.add_argument("--rounds", type=integer(1), default=2,
                   help="for --recipe: interleaved rounds; the last row is their median")
    p.add_argument("--keep_runs", help="for --recipe: keep our runs in this folder (ours0/, ours1/, ...)")
    p.add_argument("--training", action="store_true", help="only: the training rows (default shapes or --config)")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    p.add_argument("--record", help="also write the rows as records/RECORD.json (docs/record.py), keeping the "
                                    "texts the docs quote of an earlier record of that name")
    args = p.parse_args()
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.recipe and not args.nanogpt:
        raise UsageError("--recipe compares with nanoGPT's own code: give its checkout, --nanogpt=PATH "
                         "(git clone https://github.com/karpathy/nanoGPT)")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    device = pick_device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    info["device_name"] = (torch.cuda.get_device_name(device) if device.startswith("cuda")
                           else platform.processor() or "cpu")
    on_gpu = device.startswith("cuda")
    shapes = DEFAULT_SHAPES
    if args.config:
        c = configurator.load_config(configurator.train_defaults(), [args.config])
        shapes = [(os.path.basename(args.config), c["n_layer"], c["n_head"], c["n_embd"], c["block_size"],
                   c["batch_size"])]
    default_run = not (args.data or args.recipe or args.decode or args.gpt2 or args.training)
    if default_run or args.training:  # the peaks train.py's MFU divides by (measured once per machine, then cached)
        device_type = devices.device_type(device)
        dtypes = {fast_path(device_type, shape[3])["dtype"] for shape in shapes}
        dtypes.add(reference_path(device_type)["dtype"])
        info["mfu_peak_gflops"] = {d: round(peak_flops(device, getattr(torch, d)) / 1e9) for d in sorted(dtypes)}
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    table = Table(args.json, info.get("device_name", device))
    show = table.show
    if args.data:
        bench_data(args.data_mb, show)
    elif args.recipe:
        bench_recipe(args.nanogpt, args.rounds, args.keep_runs, show)
    elif args.decode:
        bench_decode(device, args.repeats, show=show)
    elif args.gpt2:
        for row in bench_training(GPT2_SHAPE, device, args.repeats, vocab=GPT2_VOCAB):
            show(row)
    elif args.training:
        for shape in shapes:
            for row in bench_training(shape, device, args.repeats):
                show(row)
    else:
        for shape in shapes:
            for row in bench_training(shape, device, args.repeats):
                show(row)
        for row in bench_monitor(shapes[0], device, args.repeats):
            show(row)
        bench_generation(device, max(1, args.repeats // 2), args.new_tokens, show=show)
        for row in bench_eval(device, args.repeats):
            show(row)
        if on_gpu and not args.config:  # at GPT-2 size a CPU takes minutes; there, ask with --gpt2 / --decode
            for row in bench_training(GPT2_SHAPE, device, args.repeats, vocab=GPT2_VOCAB):
                show(row)
            bench_decode(device, args.repeats, show=show)
    if args.record:
        write_bench_record(args.record, info, table.rows)
    return table.rows


def write_bench_record(name, info, rows):
    """records/<name>.json from this run's rows (docs/record.py: write_record), one entry per row named
    <metric>_<shape>, keeping the quoted texts of an earlier record of that name (the docs' quotes of it)."""
    import importlib.util
    import re
    spec = importlib.util.spec_from_file_location("record", os.path.join(ROOT, "docs", "record.py"))
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    path = os.path.join(record.RECORDS, f"{name}.json")
    quoted = record.load(path)["quoted"] if os.path.exists(path) else []
    data = {**info, **{re.sub(r"\W", "_", f"{r['metric']}_{r['shape']}"): r for r in rows}}
    record.write_record(name, "bench.py rows: " + ", ".join(f"{r['metric']} {r['shape']}" for r in rows),
                        "python bench.py " + " ".join(sys.argv[1:]), data, quoted)

if __name__ == "__main__":
    run_cli(main, INTERRUPTED)
