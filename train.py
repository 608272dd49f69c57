"""
Train a GPT. One script, top to bottom: config -> setup -> data -> model -> optimizer -> loop.

    python train.py config/shakespeare_char_cpu.py              # a config file on top of the defaults
    python train.py config/shakespeare_char.py --max_iters=2000  # and --key=value on top of that
    torchrun --standalone --nproc_per_node=4 train.py config/...  # several processes (DDP)
"""

import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import configurator
from checkpoint import load_checkpoint, save_checkpoint
from configurator import UsageError
from data import load_meta, load_split, windows_at
from faults import writing
from model import GPT, GPTConfig, measure_matmul_flops, published_peak_flops
from run_folder import lock_run_folder, make_run_folder, remove_leftovers, set_aside_earlier_run

# -- defaults --
# I/O
out_dir = "out"  # where checkpoints and metrics.jsonl go
replace_earlier_run = False  # a new run moves an earlier run's files to out_dir/earlier-runs/<time>/; True deletes them
eval_interval = 2000  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 1  # print and record training figures every this many iterations
monitor_interval = 50  # measure the weights' update ratios every this many iterations (a copy of every weight)
eval_iters = 200  # batches averaged for each train/val loss estimate
eval_only = False  # evaluate once and exit
eval_at_start = True  # also evaluate before the first step (the untrained loss); False saves one eval
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when val improves
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2'..'gpt2-xl', or a local HF directory
patience = 0  # stop after this many evals without val improvement; 0 = never
max_bad_steps = 3  # stop after this many non-finite losses/gradients in a row (each step is skipped)
inspect = False  # run one batch, print a per-parameter gradient table, and exit
tensorboard = False  # also log to TensorBoard (out_dir/tensorboard); needs `pip install tensorboard`
keep_last_n = 0  # also keep ckpt_<iter>.pt from the last n evals; 0 = only ckpt.pt and best_model.pt
wandb_log = False  # also log to Weights & Biases; needs `pip install wandb`
wandb_project = "glassgpt"  # wandb project name
wandb_run_name = "run"  # wandb run name
# data
dataset = "shakespeare_char"  # the folder under data_dir
data_dir = "data"  # datasets live in data_dir/<dataset>/
gradient_accumulation_steps = 1  # micro-batches per optimizer step
batch_size = 12  # sequences per micro-batch
block_size = 1024  # context length in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # width of the residual stream
dropout = 0.0  # dropout probability in training
bias = True  # biases in Linear layers and LayerNorms
attention = "sdpa"  # 'sdpa' (fused) or 'explicit' (the maths the docs teach); same result
# optimizer
optimizer = "adamw"  # 'adamw', or 'muon': Muon (model.py) for the blocks' matrices, AdamW for the rest
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # total optimizer steps
weight_decay = 0.1  # AdamW weight decay on matrices
beta1 = 0.9  # AdamW first-moment decay
beta2 = 0.95  # AdamW second-moment decay
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True  # warmup + cosine schedule; False = constant learning_rate
warmup_iters = 2000  # linear warmup steps
lr_decay_iters = 600000  # where the cosine reaches min_lr (usually = max_iters)
min_lr = 6e-5  # usually learning_rate / 10
# system
backend = "auto"  # DDP backend: 'auto' = nccl on CUDA, gloo on CPU
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (see fast_path), 'float32', 'bfloat16', 'float16'
compile = "auto"  # torch.compile the model: True, False, or 'auto' (see fast_path: on CUDA, not on CPU)
compile_mode = "default"  # torch.compile's mode; 'reduce-overhead' replays each step as CUDA graphs (one process)
fsdp = False  # with torchrun: shard weights, gradients and optimizer state across processes (FSDP2)
seed = 1337  # random seed
# -- end of defaults --

DEFAULTS = configurator.train_defaults()  # the block above, read as data
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INIT_CHOICES = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def check_config(c):
    """Values that have the right type but cannot work, reported before anything is built."""
    positive = ("eval_interval", "log_interval", "monitor_interval", "eval_iters", "gradient_accumulation_steps",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_bad_steps")
    for key in positive:
        if c[key] < 1:
            raise UsageError(f"'{key}' must be at least 1, got {c[key]}")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "patience", "weight_decay", "grad_clip", "min_lr",
                "keep_last_n"):
        if c[key] < 0:
            raise UsageError(f"'{key}' must not be negative, got {c[key]}")
    if c["n_embd"] % c["n_head"]:
        raise UsageError(f"n_embd ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")
    if not 0.0 <= c["dropout"] < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {c['dropout']}")
    if c["learning_rate"] <= 0:
        raise UsageError(f"learning_rate must be positive, got {c['learning_rate']}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= c[key] < 1.0:
            raise UsageError(f"{key} must be in [0, 1), got {c[key]}")
    if c["optimizer"] not in ("adamw", "muon"):
        raise UsageError(f"optimizer must be 'adamw' or 'muon', got {c['optimizer']!r}"
                         f"{configurator.closest(c['optimizer'], ['adamw', 'muon'])}")
    if c["attention"] not in ("sdpa", "explicit"):
        raise UsageError(f"attention must be 'sdpa' or 'explicit', got {c['attention']!r}")
    if c["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
    if c["compile_mode"] not in COMPILE_MODES:
        raise UsageError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {c['compile_mode']!r}"
                         f"{configurator.closest(c['compile_mode'], COMPILE_MODES)}")
    if c["compile"] not in (True, False, "auto"):
        raise UsageError(f"compile must be True, False or 'auto', got {c['compile']!r}")
    if c["backend"] not in ("auto", "nccl", "gloo"):
        raise UsageError(f"backend must be 'auto', 'nccl' or 'gloo', got {c['backend']!r}")
    init = c["init_from"]
    if init not in INIT_CHOICES and not os.path.isdir(init):
        raise UsageError(f"init_from must be one of {', '.join(INIT_CHOICES)} or a Hugging Face model "
                         f"directory, got {init!r}{configurator.closest(init, INIT_CHOICES)}")


def check_same_data(ckpt_meta, ckpt_path, dataset, meta, master):
    """Resuming needs the checkpoint's tokenizer: the same ids must mean the same tokens."""
    trained_on = ckpt_meta.get("dataset", dataset)
    if ckpt_meta.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
        raise UsageError(f"cannot resume: {ckpt_path} was trained on dataset '{trained_on}', whose tokenizer "
                         f"differs from that of '{dataset}'; resume with --dataset={trained_on}, or start a new "
                         "run in another out_dir")
    if trained_on != dataset and master:
        print(f"resume: dataset changed from {trained_on} to {dataset} (the same tokenizer)")


def pick_device(requested):
    """'auto' -> the best available device; an explicit device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda":
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UsageError(f"device '{requested}' is not available on this machine; use --device=cpu "
                             "(or auto)")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("device 'mps' is not available on this machine; use --device=cpu (or auto)")
    elif requested != "cpu":
        raise UsageError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return requested


# bf16 autocast on a CPU pays once matmuls dominate the casts: measured with bench.py on a 2-core
# AVX512-BF16 machine, it is slower at 128 wide and over twice as fast at 384 wide
CPU_BF16_MIN_WIDTH = 256


def fast_path(device_type, n_embd):
    """What dtype='auto' and compile='auto' mean here, and the dtype Muon orthogonalises in: the settings
    measured fastest on this device. Muon's Newton-Schulz steps take 16 ms per step of the CPU recipe in
    bfloat16 against 40 in float32 on one AVX512-BF16 core, but ten times longer in emulated bfloat16."""
    if device_type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return {"dtype": "bfloat16" if bf16 else "float16", "compile": True,
                "muon_dtype": "bfloat16" if bf16 else "float32"}
    muon_dtype = "bfloat16" if device_type == "cpu" and cpu_has_bf16() else "float32"
    if device_type == "cpu" and cpu_has_bf16() and n_embd >= CPU_BF16_MIN_WIDTH:
        return {"dtype": "bfloat16", "compile": False, "muon_dtype": muon_dtype}
    return {"dtype": "float32", "compile": False, "muon_dtype": muon_dtype}


def cpu_has_bf16():
    """Whether this CPU has bfloat16 matmul instructions; without them bfloat16 runs emulated, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(requested, device_type, n_embd):
    if requested == "auto":
        return fast_path(device_type, n_embd)["dtype"]
    if requested == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bfloat16; use --dtype=float16")
    return requested


def run():
    # ---- config ------------------------------------------------------------------------------
    config = configurator.load_config(DEFAULTS, sys.argv[1:])
    check_config(config)
    globals().update(config)  # the settings become the module-level names used below

    # ---- setup: processes, device, precision -------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    dev = pick_device(device)
    if ddp:
        import torch.distributed as dist
        local_rank = int(os.environ["LOCAL_RANK"])
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=("nccl" if dev.startswith("cuda") else "gloo")
                                if backend == "auto" else backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        stop_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None  # for stop_agreed
        if gradient_accumulation_steps % world_size:
            raise UsageError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be "
                             f"divisible by the number of processes ({world_size})")
        accum_steps = gradient_accumulation_steps // world_size  # the global batch stays the same
    else:
        rank, world_size, accum_steps, stop_group = 0, 1, gradient_accumulation_steps, None
    master = rank == 0  # only this process logs, evaluates-and-saves and writes files
    if fsdp and not ddp:
        raise UsageError("fsdp=True shards the model across processes: launch it with "
                         "torchrun --standalone --nproc_per_node=N train.py ...")
    if fsdp and inspect:
        raise UsageError("inspect=True runs in one process; drop fsdp=True (and torchrun) for it")
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":")[0]
    dtype_name = pick_dtype(dtype, device_type, n_embd)
    use_compile = fast_path(device_type, n_embd)["compile"] if compile == "auto" else compile
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    torch.manual_seed(seed)  # the same initial weights in every process (FSDP does not broadcast them)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    autocast = (nullcontext() if ptdtype == torch.float32
                else torch.autocast(device_type=device_type, dtype=ptdtype))
    # fp16 has a narrow range: scale the loss up so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype_name == "float16"))

    # ---- data --------------------------------------------------------------------------------
    meta = load_meta(data_dir, dataset)
    train_data = load_split(data_dir, dataset, "train")
    val_data = load_split(data_dir, dataset, "val")
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) < block_size + 1:
            raise UsageError(f"the {split} split of '{dataset}' has {len(data)} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}; use a longer text or a smaller block_size")
    # Training batches have their own RNG, the same in every process, so that resume can restore it and
    # the global batch does not depend on how many processes share it.
    batch_rng = torch.Generator().manual_seed(seed)
    tokens_per_iter = accum_steps * world_size * batch_size * block_size

    # ---- model -------------------------------------------------------------------------------
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=meta["vocab_size"], dropout=dropout, attention=attention)
    iter_num, best_val_loss, resumed, ckpt = 0, float("inf"), False, None
    evaluated_at = None  # the iteration of the last finished evaluation
    make_run_folder(out_dir)
    if master and not inspect:  # torchrun's processes are one run: its first process speaks for all
        lock_run_folder(out_dir)
        remove_leftovers(out_dir)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    elif init_from == "resume":
        ckpt, ckpt_meta = load_checkpoint(ckpt_path, map_location=dev)
        check_same_data(ckpt_meta, ckpt_path, dataset, meta, master)
        saved_args = ckpt_meta["model_args"]
        changed = [k for k in MODEL_KEYS if saved_args[k] != model_args[k]]
        if changed:
            k = changed[0]
            raise UsageError(f"cannot resume: {k} is {model_args[k]} in this config but {saved_args[k]} "
                             f"in {ckpt_path}; use the original model settings or a new out_dir")
        for key in ("learning_rate", "max_iters", "lr_decay_iters", "min_lr", "warmup_iters"):
            if ckpt_meta["config"][key] != config[key] and master:
                print(f"resume: {key} changed from {ckpt_meta['config'][key]} to {config[key]}")
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss, resumed = ckpt_meta["iter_num"], ckpt_meta["best_val_loss"], True
        evaluated_at = iter_num if ckpt_meta.get("evaluated", True) else None  # a stop may have abandoned it
    else:
        model = load_pretrained(init_from, dict(dropout=dropout, attention=attention))
        if model.config.vocab_size != meta["vocab_size"]:
            raise UsageError(f"{init_from} has a vocabulary of {model.config.vocab_size}, the dataset "
                             f"'{dataset}' one of {meta['vocab_size']}; use a GPT-2 BPE dataset such as shakespeare")
        if block_size > model.config.block_size:
            raise UsageError(f"{init_from} was trained with {model.config.block_size} positions, fewer than "
                             f"block_size={block_size}; use --block_size={model.config.block_size} or less")
        if block_size < model.config.block_size:
            model.crop_block_size(block_size)
        for key in ("n_layer", "n_head", "n_embd", "bias"):
            model_args[key] = getattr(model.config, key)
    model.to(dev)
    torch.manual_seed(seed + rank)  # but different dropout masks in each process
    if fsdp:
        # FSDP2: each process keeps 1/world_size of every block's weights, gathering a block's full
        # weights only while it runs; the optimizer then sees (and steps) only the local shards
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)

    # ---- optimizer -----------------------------------------------------------------------------
    muon_dtype = getattr(torch, fast_path(device_type, n_embd)["muon_dtype"])
    optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                            muon_dtype)
    if ckpt is not None:
        if ckpt_meta.get("fsdp", False) != fsdp:
            raise UsageError(f"cannot resume: {ckpt_path} was written with fsdp={ckpt_meta.get('fsdp', False)}; "
                             "resume with the same fsdp setting")
        load_optimizer_states(model, optimizers, ckpt["optimizers"], fsdp)
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, batch_rng)
    ckpt = None  # free the memory
    raw_model = model
    if use_compile:
        model = torch.compile(model, mode=compile_mode)
    if ddp and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dev] if device_type == "cuda" else None)

    def estimate_loss():
        """Train loss over eval_iters random batches (the same ones at every eval); val loss exactly,
        over the whole split, when that is no more work than eval_iters batches (else sampled too)."""
        model.eval()
        # inference mode skips autograd bookkeeping entirely; FSDP reuses its gather buffers in training,
        # which tensors made in inference mode would forbid, so it gets plain no_grad
        with torch.no_grad() if fsdp else torch.inference_mode():
            losses = {"train": sampled_loss(train_data)}
            whole = len(val_data) <= eval_iters * batch_size * block_size
            losses["val"] = whole_split_loss(val_data) if whole else sampled_loss(val_data)
        model.train()
        return losses

    def sampled_loss(data):
        eval_rng = torch.Generator().manual_seed(seed + rank)  # the same batches at every eval
        starts = [torch.randint(len(data) - block_size, (batch_size,), generator=eval_rng)
                  for _ in range(eval_iters)]
        return mean_loss(data, starts)

    def whole_split_loss(data):
        """Every non-overlapping block_size window once: the split's exact loss, not an estimate."""
        n_windows = (len(data) - 1) // block_size  # the last window needs one more token as its target
        mine = torch.arange(rank, n_windows, world_size) * block_size  # with DDP each process scores a share
        return mean_loss(data, list(torch.split(mine, batch_size)))

    def mean_loss(data, batches_of_starts):
        """Mean loss of the windows starting at each batch's positions, averaged over all processes."""
        total, count = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for starts in eval_batches(batches_of_starts):
            X, Y = windows_at(data, starts, block_size, dev)
            with autocast:
                _, loss = raw_model(X, Y)
            total += loss.float() * len(starts)  # the loss is a mean over the batch: weight by its size
            count += len(starts)
        if ddp:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        return (total / count).item()

    def checkpoint_state():
        """(tensors, meta) to save. Every process must call it (with FSDP it gathers the shards)."""
        model_state, optimizer_states = full_states(raw_model, optimizers, fsdp)
        tensors = {"model": model_state, "optimizers": optimizer_states,
                   "scaler": scaler.state_dict(), **rng_state(batch_state["next_step"])}
        ckpt_meta = {"model_args": model_args, "config": config, "iter_num": iter_num, "fsdp": fsdp,
                     "best_val_loss": best_val_loss, "tokenizer": meta["tokenizer"], "dataset": dataset,
                     "evaluated": evaluated_at == iter_num}
        return tensors, ckpt_meta

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master and not (eval_only or inspect):
        if resumed:
            trim_metrics(metrics_path, iter_num)  # a resumed run continues its record
        else:
            set_aside_earlier_run(out_dir, replace_earlier_run)  # only now, when every check above has passed
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | device {dev} | {dtype_name} | "
              f"{tokens_per_iter:,} tokens per iteration")
    peak = peak_flops(dev, ptdtype) if master else None

    sinks = open_loggers(out_dir, config) if master else []

    def record(entry):
        if not master:
            return
        with writing(metrics_path), open(metrics_path, "a", encoding="utf-8") as f:  # a full disk: one line
            f.write(json.dumps(entry) + "\n")
        for sink in sinks:
            sink(entry)

    # Ctrl-C / SIGTERM: stop at the next safe point (after this step, or abandoning an evaluation), save
    # ckpt.pt, then exit; a second one exits at once
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            os.write(sys.stderr.fileno(), b"\nsecond interrupt: exiting now, without saving\n")
            sys.exit(128 + signum)
        stop["signal"] = signum
        # os.write, not print: a handler may run in the middle of a print, and print is not re-entrant
        os.write(sys.stderr.fileno(), b"\nstopping at the next safe point to save ckpt.pt "
                                      b"(interrupt again to exit at once, without saving)\n")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # ---- training loop -------------------------------------------------------------------------
    from tqdm import tqdm
    progress = tqdm(total=max_iters, initial=iter_num, disable=None if master else True, unit="it",
                    dynamic_ncols=True, leave=False)
    log = progress.write if master else (lambda *a, **k: None)
    batch_state = {}

    def eval_batches(batches):
        """An evaluation's batches, with a progress bar. A stop request abandons the evaluation, except
        under torchrun, whose processes must all make the same collective calls: they finish it first."""
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False, disable=None if master else True):
            if stop["signal"] is not None and not ddp:
                raise EvalAbandoned
            yield batch

    def train_batches():
        """Each optimizer step draws the start positions of the whole global batch (all processes, all
        micro-steps); this process takes its own accum_steps slices of batch_size rows."""
        while True:
            batch_state["next_step"] = batch_rng.get_state()  # what resume needs to redraw this step
            ix = torch.randint(len(train_data) - block_size, (gradient_accumulation_steps * batch_size,),
                               generator=batch_rng)
            for micro_step in range(accum_steps):
                first = (rank * accum_steps + micro_step) * batch_size
                yield windows_at(train_data, ix[first:first + batch_size], block_size, dev)

    batches = train_batches()
    X, Y = next(batches)  # the first batch
    if inspect:
        print_gradient_table(raw_model, optimizers, X, Y, autocast, get_lr(iter_num, learning_rate, warmup_iters,
                                                                           lr_decay_iters, min_lr, decay_lr))
        return
    # evaluate before the first step unless not asked to, or the checkpoint's state was evaluated already
    eval_first = evaluated_at != iter_num if resumed else eval_at_start
    if device_type == "cpu" and master and not ddp and not eval_only and iter_num < max_iters:
        evals = evals_ahead(iter_num, max_iters, eval_interval, eval_first)
        print(how_long(raw_model, X, Y, autocast, accum_steps, max_iters - iter_num, evals, 2 * eval_iters,
                       any_device=device == "auto"))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    evals_without_gain, last_val, loss_avg, ratios, skipped_reported, warned_peak = 0, None, None, None, 0, False
    # the NaN guard's counts live on the device (see step_unless_bad): the current and longest run of
    # non-finite steps in a row, and all skipped steps
    bad_run, longest_bad_run, skipped = (torch.zeros((), device=dev) for _ in range(3))
    skip_on_device = not fsdp and not scaler.is_enabled() and all(o.defaults.get("fused") for o in optimizers)
    start_iter = saved_at = last_log_iter = iter_num
    t0 = time.perf_counter()
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

        due = eval_only or iter_num % eval_interval == 0 or iter_num == max_iters
        skip = iter_num == start_iter and not eval_first and not eval_only
        if due and not skip:
            try:
                losses = estimate_loss()
            except EvalAbandoned:
                log(f"eval {iter_num}: abandoned, a stop was requested")
                break
            last_val, evaluated_at = losses["val"], iter_num
            log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            record({"type": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            improved = losses["val"] < best_val_loss
            if improved:
                best_val_loss, evals_without_gain = losses["val"], 0
            else:
                evals_without_gain += 1
            if iter_num > 0 and not eval_only and (improved or always_save_checkpoint):
                tensors, ckpt_meta = checkpoint_state()
                saved_at = iter_num
                if master:
                    if improved:
                        save_checkpoint(os.path.join(out_dir, "best_model.pt"), tensors, ckpt_meta)
                    save_checkpoint(ckpt_path, tensors, ckpt_meta)
                    if keep_last_n:
                        keep_periodic_checkpoint(out_dir, iter_num, tensors, ckpt_meta, keep_last_n)
            t0, last_log_iter = time.perf_counter(), iter_num  # keep eval time out of ms/iter
            if patience and evals_without_gain >= patience:
                log(f"early stop: val loss has not improved for {patience} evals")
                break
        if eval_only or iter_num >= max_iters:
            break

        log_step = (iter_num + 1) % log_interval == 0  # every process: with FSDP the figures are collective
        monitor_step = (iter_num + 1) % monitor_interval == 0
        weights_before = [p.detach().clone() for p in params] if monitor_step else None  # for the update ratio
        # one optimizer step = accum_steps micro-batches; the loss is divided so grads average
        for micro_step in range(accum_steps):
            sync = micro_step == accum_steps - 1
            if fsdp:
                model.set_requires_gradient_sync(sync)  # reduce-scatter once, at the end
            ctx = model.no_sync() if ddp and not fsdp and not sync else nullcontext()  # all-reduce once, at the end
            with ctx, autocast:
                _, loss = model(X, Y)
                loss = loss / accum_steps
            X, Y = next(batches)  # fetch the next batch while the device is busy
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # real gradient sizes for the norm (nothing to undo without a scaler)
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = full(grad_norm)
        # the NaN guard: a non-finite loss or gradient must never reach the weights. It is decided on the
        # device, so the host never waits for the step; the host reads the counts at the next log.
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))  # () bool
        step_unless_bad(optimizers, scaler, bad, skip_on_device)
        if not scaler.is_enabled():  # with fp16 the scaler owns skipping, and overflows are routine
            bad_run = (bad_run + 1) * bad  # non-finite steps in a row, 0 after a good one
            longest_bad_run = torch.maximum(longest_bad_run, bad_run)
        skipped += bad
        if monitor_step:
            ratios = update_ratios(optimizers, params, weights_before)
        if log_step:
            # the one read of the device between logs
            loss_value, norm_value, run_now, longest, skipped_now = torch.stack(
                [loss.detach().float() * accum_steps, grad_norm.float(), bad_run, longest_bad_run, skipped]).tolist()
            if skipped_now > skipped_reported:
                report_skipped_steps(log, iter_num, loss_value, raw_model, int(run_now),
                                     int(skipped_now - skipped_reported), first=skipped_reported == 0, scaler=scaler)
                skipped_reported = skipped_now
            if longest >= max_bad_steps:
                progress.close()
                kept = (f"{ckpt_path} holds the last good state" if os.path.exists(ckpt_path)
                        else "no checkpoint had been written yet")
                print(f"error: training stopped after {int(longest)} non-finite steps in a row at iteration "
                      f"{iter_num}; {kept}. Lower learning_rate and start again", file=sys.stderr)
                sys.exit(3)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        iter_num += 1
        progress.update(1)

        if log_step and master:
            t1 = time.perf_counter()
            dt = (t1 - t0) / (iter_num - last_log_iter)
            t0, last_log_iter = t1, iter_num
            tokens_per_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_s, peak) if peak else None
            entry = {"type": "train", "iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tokens_per_s, "mfu": mfu, "grad_norm": norm_value,
                     "clipped": bool(grad_clip > 0 and norm_value > grad_clip),
                     "update_ratio_log10": ratios, "skipped_steps": int(skipped_now),
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None}
            ratios = None  # each measurement is logged once
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            log(format_log(entry))
            if mfu and mfu > 1 and not warned_peak:  # more than the peak: the peak is wrong, not the step
                log(f"warning: MFU above 100%: the cached matmul peak was measured while the machine was busy; "
                    f"delete {PEAK_FLOPS_CACHE} to measure it again")
                warned_peak = True
            record(entry)
            if loss_avg is not None and math.isfinite(loss_value) and loss_value > SPIKE_FACTOR * loss_avg:
                log(f"warning: loss spike at iter {iter_num}: {loss_value:.3f} vs a recent average of "
                    f"{loss_avg:.3f} (learning rate too high? a bad batch?)")
            loss_avg = loss_value if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_value
        if stop_agreed(stop, ddp, stop_group):
            break

    progress.close()
    if not eval_only and saved_at != iter_num:  # ckpt.pt always ends as the final state
        tensors, ckpt_meta = checkpoint_state()
        if master:
            save_checkpoint(ckpt_path, tensors, ckpt_meta)
    if ddp:
        # no process exits before the first one has saved: torchrun stops all of them when one exits non-zero
        torch.distributed.barrier(group=stop_group)
        torch.distributed.destroy_process_group()
    if stop["signal"] is not None:
        if master:
            print(f"stopped at iteration {iter_num}; {ckpt_path} saved. Resume with: "
                  f"python train.py {' '.join(sys.argv[1:])} --init_from=resume")
        sys.exit(128 + stop["signal"])
    if master:
        best = os.path.join(out_dir, "best_model.pt")
        print(f"done: best val loss {best_val_loss:.4f}" + (f", last {last_val:.4f}" if last_val else ""))
        if os.path.exists(best):
            print(f"sample from it: python generate.py --ckpt {best}")


def stop_agreed(stop, ddp, group):
    """Whether to stop after this step. Under torchrun the processes agree after every step, whichever of
    them got the signal, so that all stop after the same one; the flag is a CPU tensor all-reduced over
    gloo (`group`), which never waits for the GPU. A signal that comes after this process sent its flag is
    kept for the next step, never overwritten by the agreement."""
    if not ddp:
        return stop["signal"] is not None
    flag = torch.tensor([stop["signal"] or 0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if int(flag):
        stop["signal"] = stop["signal"] or int(flag)  # the processes that got no signal stop for it too
    return bool(int(flag))


class EvalAbandoned(Exception):
    """A stop request during an evaluation: its batches so far are dropped and the run stops."""


# a CPU run longer than this, of a recipe that does not ask for a CPU, is likely sized for a GPU
GPU_SIZED_SECONDS = 3600


def evals_ahead(start, max_iters, eval_interval, eval_first):
    """How many evaluations the loop will make from iteration start on (without early stopping)."""
    multiples = max_iters // eval_interval - (start - 1) // eval_interval  # of eval_interval in [start, max_iters]
    final = max_iters % eval_interval != 0  # the last iteration is always evaluated
    return multiples + final - ((start % eval_interval == 0 or start == max_iters) and not eval_first)


def how_long(model, X, Y, autocast, accum_steps, steps, evals, eval_batches, any_device):
    """One line: roughly how long the run will take here, from the medians of a few timed training steps
    and evaluation batches on the first batch (one step alone can be several times off on a busy CPU).
    Weights, gradients and random state are left as they were.
    any_device: the recipe did not ask for a CPU (device='auto'), so it may well be sized for a GPU."""
    def train_step():
        with autocast:
            _, loss = model(X, Y)
        loss.backward()

    def eval_batch():
        with torch.inference_mode(), autocast:
            model(X, Y)

    with torch.random.fork_rng(devices=[]):  # dropout draws random numbers: training must not see them
        eval_batch()  # untimed: the first call pays for allocations and kernel selection
        step_s = median_seconds(train_step) * accum_steps
        batch_s = median_seconds(eval_batch)
    model.zero_grad(set_to_none=True)
    total = steps * step_s + evals * eval_batches * batch_s
    line = (f"on this CPU a step takes about {step_s * 1000:,.0f} ms (measured): {steps:,} steps and {evals} "
            f"evaluation{'s' * (evals != 1)} of up to {eval_batches} batches will take about {duration(total)}")
    if total > GPU_SIZED_SECONDS and any_device:
        line += ("; this looks like a recipe sized for a GPU: on a CPU, config/shakespeare_char_cpu.py trains "
                 "a smaller model in minutes")
    return line


TIMED_RUNS, TIMING_BUDGET_S = 5, 2.0  # a model whose step takes seconds is timed fewer times (at least once)


def median_seconds(work):
    """The median duration of up to TIMED_RUNS calls of work(), stopping early once TIMING_BUDGET_S is spent."""
    times = []
    while len(times) < TIMED_RUNS and sum(times) < TIMING_BUDGET_S:
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def duration(seconds):
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


SPIKE_FACTOR = 1.5  # warn when a logged loss exceeds this multiple of its running average
DIVERGENCE_ADVICE = (
    "likely causes and fixes:\n"
    "  - learning rate too high: lower learning_rate, or raise warmup_iters\n"
    "  - float16 overflow: use dtype='bfloat16', or float16 with its GradScaler (dtype='float16' does this)\n"
    "  - bad data: check the dataset for garbage (python data.py ... to prepare it again)")


def keep_periodic_checkpoint(out_dir, iter_num, tensors, ckpt_meta, keep):
    """Write ckpt_<iter>.pt and delete the oldest ones beyond the newest `keep`."""
    save_checkpoint(os.path.join(out_dir, f"ckpt_{iter_num:07d}.pt"), tensors, ckpt_meta)
    periodic = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for old in periodic[:-keep]:
        os.remove(os.path.join(out_dir, old))


def full(tensor):
    """A plain tensor from an FSDP-sharded one (a collective: every process must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_states(model, optimizers, fsdp):
    """The unsharded model and optimizer state dicts (with FSDP: gathered onto every process's CPU)."""
    if not fsdp:
        return model.state_dict(), [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            [get_optimizer_state_dict(model, o, options=options) for o in optimizers])


def load_optimizer_states(model, optimizers, states, fsdp):
    if not fsdp:
        for opt, state in zip(optimizers, states):
            opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    for opt, state in zip(optimizers, states):
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def first_nonfinite_grad(model):
    """The module path of the first parameter whose gradient holds a NaN or Inf."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(full(torch.isfinite(p.grad).all())):
            return name
    return "no gradient (the loss itself)"


def step_unless_bad(optimizers, scaler, bad, on_device):
    """Update the weights unless `bad` (a () bool tensor on the device) says the step is non-finite.

    Fused AdamW takes a `found_inf` tensor and skips its own update when it is 1, the way it does for
    GradScaler, so the host never waits for the device. Other optimizers (Muon, or any under FSDP) make
    the host read `bad` first: one sync per step. With float16 the GradScaler itself skips steps whose
    gradients overflowed."""
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


def report_skipped_steps(log, iter_num, loss_value, model, in_a_row, new_skips, first, scaler):
    """Say which steps the NaN guard skipped since the last log; the first time, why it happens."""
    if scaler.is_enabled():
        return  # float16 overflows are routine: the log line shows the loss scale and the skips
    if in_a_row:  # this very step was bad: its gradients are still here to name the culprit
        what = "loss" if not math.isfinite(loss_value) else "gradient"
        log(f"iter {iter_num}: non-finite {what} (first in {first_nonfinite_grad(model)}); step skipped, "
            f"weights untouched ({in_a_row}/{max_bad_steps})")
    else:
        log(f"iter {iter_num}: {new_skips} non-finite step(s) since the last log were skipped, weights untouched")
    if first:
        log(DIVERGENCE_ADVICE)


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


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters, then flat."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


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


def load_pretrained(name_or_path, overrides):
    """GPT-2 weights via transformers; a hub name with no network is one clear error."""
    try:
        return GPT.from_pretrained(name_or_path, overrides)
    except OSError as e:
        raise UsageError(f"could not load '{name_or_path}': the Hugging Face hub is unreachable or the "
                         f"name is wrong ({str(e).splitlines()[0][:100]}); a local directory made by "
                         "save_pretrained works offline") from e


# measured peaks, one per machine, device, dtype, thread count and PyTorch version; delete it to measure again
PEAK_FLOPS_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                "glassgpt", "peak_flops.json")


def peak_flops(dev, ptdtype):
    """The device's peak FLOP/s, which MFU divides by (train.py and bench.py alike): a GPU's data sheet
    if we know it, else this machine's matmul peak, measured once and kept in PEAK_FLOPS_CACHE so that
    every run divides by the same number."""
    if dev.startswith("cuda"):
        published = published_peak_flops(torch.cuda.get_device_name(dev), ptdtype)
        if published:
            return published
    key = peak_cache_key(dev, ptdtype)
    cache = read_peak_cache()
    if key not in cache:
        print(f"measuring this machine's matmul peak for MFU, once ({PEAK_FLOPS_CACHE})")
        cache = {**read_peak_cache(), key: measure_matmul_flops(dev, ptdtype)}
        try:
            os.makedirs(os.path.dirname(PEAK_FLOPS_CACHE), exist_ok=True)
            tmp = f"{PEAK_FLOPS_CACHE}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, PEAK_FLOPS_CACHE)
        except OSError:
            pass  # no writable cache folder: the next run measures again
    return cache[key]


def peak_cache_key(dev, ptdtype):
    """What a measured peak depends on: machine, device, dtype, threads and PyTorch version."""
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else torch.backends.cpu.get_cpu_capability()
    return (f"{platform.node()} | {dev.split(':')[0]} {name} | {ptdtype} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}")


def read_peak_cache():
    try:
        with open(PEAK_FLOPS_CACHE, encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: measure again
        return {}


def rng_state(batch_state):
    """Every random state training draws from, as tensors (restored exactly on resume)."""
    import random
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"rng_torch": torch.get_rng_state(), "rng_batches": batch_state,
             "rng_python": torch.tensor(py_state, dtype=torch.int64),
             "rng_numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "rng_numpy_pos": torch.tensor(np_state[2])}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(ckpt, batch_rng):
    import random
    torch.set_rng_state(ckpt["rng_torch"].cpu())
    batch_rng.set_state(ckpt["rng_batches"].cpu())
    random.setstate((3, tuple(ckpt["rng_python"].tolist()), None))
    np.random.set_state(("MT19937", ckpt["rng_numpy"].numpy().astype(np.uint32), int(ckpt["rng_numpy_pos"]), 0, 0.0))
    if "rng_cuda" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])


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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def metrics_entry(line):
    """One metrics.jsonl line as a dict with an 'iter', or None for a line that is not one."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("iter"), int) else None


if __name__ == "__main__":
    configurator.run_cli(run)
