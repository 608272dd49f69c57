"""
Train a GPT. One script, top to bottom: config -> setup -> data -> model -> optimizer -> loop.

    python train.py config/shakespeare_char_cpu.py               # a config file over the defaults
    python train.py config/shakespeare_char.py --max_iters=2000  # and --key=value over that
    torchrun --standalone --nproc_per_node=4 train.py config/...  # several processes (DDP)

The loop takes the textbook step: micro-batches, backward, unscale, clip, the optimizer step,
zero_grad. What keeps a run safe, fast and observable lives in machinery/, one module per concern,
called here by name: setup (processes, device, precision), checkpoint (resume state), evaluation,
health (the NaN guard, update ratios), metrics (the record and the log line), run_folder (the lock,
earlier runs, stop requests, the end of a run), speed (MFU, how long a CPU run takes), timeline
(snapshots of the weights for the lens's replay).
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import math
import os
import sys

import torch
from tqdm import tqdm

from data import TrainBatches, load_meta, load_split, windows_at
from machinery import distributed
from machinery.checkpoint import Checkpoints, check_resumable, load_checkpoint
from machinery.configurator import load_train_config, train_defaults
from machinery.evaluation import Evaluations
from machinery.health import Guard, UpdateMonitor, print_gradient_table
from machinery.hf import fit_pretrained
from machinery.metrics import MetricsLog
from machinery.preparation import check_long_enough
from machinery.run_folder import StopRequest, end_run, open_run_folder, start_record
from machinery.setup import setup
from machinery.speed import say_how_long
from machinery.timeline import Timeline
from model import GPT, GPTConfig

# -- defaults --
# I/O
out_dir = "out"  # where checkpoints and metrics.jsonl go
replace_earlier_run = False  # a new run moves an earlier run's files to
                             # out_dir/earlier-runs/<time>/; True deletes them
eval_interval = 2000  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 1  # print and record training figures every this many iterations
monitor_interval = 50  # measure the weights' update ratios every this many iterations (a copy of
                       # every weight)
eval_iters = 200  # batches averaged for each train/val loss estimate
eval_only = False  # evaluate once and exit
eval_at_start = True  # also evaluate before the first step (the untrained loss); False saves one
                      # eval
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when val improves
snapshots = "auto"  # the weights at steps 0, 1, 2, 4, 8, ... and each eval, for the lens's replay
                    # (out_dir/timeline); 'auto': for models of up to 2M parameters
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2'..'gpt2-xl', or a local HF
                       # directory
patience = 0  # stop after this many evals without val improvement; 0 = never
max_bad_steps = 3  # stop after this many non-finite losses/gradients in a row (each step is
                   # skipped)
inspect = False  # run one batch, print a per-parameter gradient table, and exit
tensorboard = False  # also log to TensorBoard (out_dir/tensorboard); needs `pip install
                     # tensorboard`
keep_last_n = 0  # also keep ckpt_<iter>.pt from the last n evals; 0 = only ckpt.pt and
                 # best_model.pt
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
optimizer = "adamw"  # 'adamw', or 'muon': Muon (machinery/optimizers.py) for the blocks' matrices,
                     # AdamW for the rest
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # total optimizer steps
weight_decay = 0.1  # decoupled weight decay on matrices (AdamW's and Muon's); none on biases and
                    # gains
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
compile = "auto"  # torch.compile the model: True, False, or 'auto' (see fast_path: on CUDA, not on
                  # CPU)
compile_mode = "default"  # torch.compile's mode; 'reduce-overhead' replays each step as CUDA graphs
                          # (one process)
fsdp = False  # with torchrun: shard weights, gradients and optimizer state across processes (FSDP2)
seed = 1337  # random seed
# -- end of defaults --

DEFAULTS = train_defaults()  # the block above, read as data


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


def run():
    # ---- config and setup ------------------------------------------------------------------------
    config = load_train_config(DEFAULTS, sys.argv[1:])
    globals().update(config)  # the settings become the names below; run() never assigns one
    env = setup(config)  # processes, device, precision: the same names for one process or torchrun

    # ---- data --------------------------------------------------------------------------------
    meta = load_meta(data_dir, dataset)
    train_data = load_split(data_dir, dataset, "train")
    val_data = load_split(data_dir, dataset, "val")
    check_long_enough(dataset, block_size, train=train_data, val=val_data)
    batches = TrainBatches(train_data, batch_size, block_size, env.device, seed, env.accum_steps,
                           env.rank, env.world_size)
    tokens_per_iter = env.accum_steps * env.world_size * batch_size * block_size

    # ---- model -------------------------------------------------------------------------------
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      bias=bias, vocab_size=meta["vocab_size"], dropout=dropout,
                      attention=attention)
    iter_num, best_val_loss, evaluated = 0, float("inf"), False
    ckpt_path = open_run_folder(out_dir, lock=env.master and not inspect)
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    elif init_from == "resume":
        ckpt, ckpt_meta = load_checkpoint(ckpt_path, map_location=env.device)
        check_resumable(ckpt_meta, ckpt_path, config, model_args, meta["tokenizer"], env.master)
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss = ckpt_meta["iter_num"], ckpt_meta["best_val_loss"]
        evaluated = ckpt_meta.get("evaluated", True)  # a stop may have abandoned its evaluation
    else:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout, attention=attention))
        model = fit_pretrained(model, init_from, model_args, meta["vocab_size"], dataset)
    model.to(env.device)
    torch.manual_seed(seed + env.rank)  # the same initial weights everywhere, each its own dropout
    if fsdp:
        distributed.shard(model)

    # ---- optimizer -----------------------------------------------------------------------------
    optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                            env.device_type, optimizer, env.muon_dtype)
    # float16 has a narrow range: scale the loss up so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == torch.float16)
    checkpoints = Checkpoints(out_dir, model, optimizers, scaler, batches, model_args, config, meta,
                              env)
    if init_from == "resume":
        checkpoints.restore(ckpt)  # optimizer, scaler and random states: as if never interrupted
        del ckpt  # free the memory
    raw_model = model
    if env.compile:
        model = torch.compile(model, mode=compile_mode)
    if env.ddp and not fsdp:
        model = distributed.wrap_ddp(model, env.device)

    # ---- training loop -------------------------------------------------------------------------
    start_record(out_dir, config, iter_num, env.master)  # only now, with every check above passed
    if env.master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | device {env.device} | "
              f"{str(env.dtype).removeprefix('torch.')} | {tokens_per_iter:,} tokens per iteration")
    progress = tqdm(total=max_iters, initial=iter_num, disable=None if env.master else True,
                    unit="it", dynamic_ncols=True, leave=False)
    metrics = MetricsLog(out_dir, config, env, raw_model, scaler, progress, tokens_per_iter)
    stop = StopRequest(env.ddp, env.stop_group, saves=not eval_only)  # Ctrl-C, SIGTERM: save, exit
    evals = Evaluations(model, raw_model, train_data, val_data, windows_at, config, env, stop,
                        metrics, iter_num, best_val_loss, evaluated)
    X, Y = next(batches)  # the first batch
    if inspect:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
        print_gradient_table(raw_model, optimizers, X, Y, env.autocast, lr)
        return
    say_how_long(raw_model, X, Y, config, env, iter_num, evals.ahead(iter_num))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    guard = Guard(optimizers, scaler, max_bad_steps, env, raw_model, ckpt_path, progress)
    monitor = UpdateMonitor(optimizers, params, monitor_interval)
    timeline = Timeline(checkpoints, evals)  # snapshots of the weights as the model learns
    metrics.restart_clock(iter_num)
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        timeline.keep(iter_num, lr, X, Y)  # on its schedule: this step's weights, lr and loss

        if evals.due(iter_num):
            if not evals.run(iter_num):  # train and val loss, logged; False: a stop abandoned it
                break
            if iter_num > 0 and not eval_only and (evals.improved or always_save_checkpoint):
                checkpoints.save(iter_num, evals)  # ckpt.pt, and best_model.pt when val improved
            metrics.restart_clock(iter_num)  # keep evaluation time out of ms/iter
            if evals.patience_spent():
                break
        if eval_only or iter_num >= max_iters:
            break

        # one optimizer step = accum_steps micro-batches; the loss is divided, so gradients average
        monitor.before_step(iter_num)  # every monitor_interval steps: a copy of the weights
        for micro_step in range(env.accum_steps):
            last_micro_step = micro_step == env.accum_steps - 1
            with distributed.sync_context(model, env, last_micro_step), env.autocast:
                _, loss = model(X, Y)
                loss = loss / env.accum_steps
            X, Y = next(batches)  # fetch the next batch while the device is busy
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # real gradient sizes for the norm (a no-op without float16)
        # the global gradient norm (logged), the gradients clipped to grad_clip (0: never clipped)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        grad_norm = distributed.full(grad_norm)  # collective with FSDP
        # the NaN guard: a non-finite loss or gradient never reaches the weights
        if guard.allows_step(loss, grad_norm):
            for opt in optimizers:
                scaler.step(opt)  # opt.step(); with float16, skipped when the gradients overflowed
            scaler.update()
        monitor.after_step()  # how much the step changed the weights, when a copy was taken
        if (iter_num + 1) % log_interval == 0:  # the step just taken, as its log line names it
            metrics.log_step(iter_num + 1, lr, loss, grad_norm, guard, monitor)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        iter_num += 1
        progress.update(1)
        if stop.agreed():  # collective under torchrun: every process stops after the same step
            break

    end_run(iter_num, checkpoints, evals, stop, env, progress)  # the final ckpt.pt, what to do next


if __name__ == "__main__":
    from machinery.cli import run_cli
    run_cli(run)
