"""
Train a GPT. One script, top to bottom: config -> setup -> data -> model -> optimizer -> loop.

    python train.py config/shakespeare_char_cpu.py              # a config file on top of the defaults
    python train.py config/shakespeare_char.py --max_iters=2000  # and --key=value on top of that
    torchrun --standalone --nproc_per_node=4 train.py config/...  # several processes (DDP)

What keeps a run safe, fast and observable lives beside this file, each piece called here in one line:
devices.py, distributed.py, run_folder.py (lock, earlier runs, stop requests), checkpoint.py (resume
state), health.py (the NaN guard, update ratios), metrics.py (the record), mfu.py, estimate.py, evaluation.py.
"""

import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import configurator
import devices
import distributed
from checkpoint import check_resumable, load_checkpoint, restore_rng, rng_state, save_checkpoint, save_checkpoints
from configurator import UsageError
from data import load_meta, load_split, windows_at
from devices import fast_path, pick_device, pick_dtype
from estimate import evals_ahead, how_long
from evaluation import mean_loss, sampled_starts, whole_split_starts
from health import Guard, print_gradient_table, update_ratios
from hf import gpt2_from_hf
from metrics import MetricsLog, trim_metrics
from mfu import peak_flops
from model import GPT, GPTConfig
from faults import remove_leftovers
from run_folder import LEFTOVER, EvalAbandoned, StopRequest, lock_run_folder, make_run_folder, set_aside_earlier_run

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
optimizer = "adamw"  # 'adamw', or 'muon': Muon (optim.py) for the blocks' matrices, AdamW for the rest
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # total optimizer steps
weight_decay = 0.1  # decoupled weight decay on matrices (AdamW's and Muon's); none on biases and gains
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
    # ---- config ------------------------------------------------------------------------------
    config = configurator.load_config(DEFAULTS, sys.argv[1:])
    configurator.check_train_config(config)
    globals().update(config)  # the settings become the module-level names below; run() never assigns one

    # ---- setup: processes, device, precision -------------------------------------------------
    ddp = distributed.launched_by_torchrun()
    dev, rank, world_size, accum_steps, stop_group = pick_device(device), 0, 1, gradient_accumulation_steps, None
    if ddp:
        dev, rank, world_size, accum_steps, stop_group = distributed.init_processes(dev, backend, accum_steps)
    elif fsdp:
        raise UsageError("fsdp=True shards the model across processes: launch it with "
                         "torchrun --standalone --nproc_per_node=N train.py ...")
    if fsdp and inspect:
        raise UsageError("inspect=True runs in one process; drop fsdp=True (and torchrun) for it")
    master = rank == 0  # only this process logs, evaluates-and-saves and writes files
    device_type = devices.device_type(dev)
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
    batch_state = {}  # the batch RNG's state before the current step's draw: what a checkpoint saves

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

    # ---- model -------------------------------------------------------------------------------
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=meta["vocab_size"], dropout=dropout, attention=attention)
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    evaluated_at = None  # the iteration of the last finished evaluation
    make_run_folder(out_dir)
    if master and not inspect:  # torchrun's processes are one run: its first process speaks for all
        lock_run_folder(out_dir)
        remove_leftovers(out_dir, LEFTOVER)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    elif init_from == "resume":
        ckpt, ckpt_meta = load_checkpoint(ckpt_path, map_location=dev)
        check_resumable(ckpt_meta, ckpt_path, model_args, dataset, meta["tokenizer"], master)
        for key in ("learning_rate", "max_iters", "lr_decay_iters", "min_lr", "warmup_iters"):
            if ckpt_meta["config"][key] != config[key] and master:
                print(f"resume: {key} changed from {ckpt_meta['config'][key]} to {config[key]}")
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss = ckpt_meta["iter_num"], ckpt_meta["best_val_loss"]
        evaluated_at = iter_num if ckpt_meta.get("evaluated", True) else None  # a stop may have abandoned it
    else:
        model = pretrained_model(init_from, model_args, meta, dataset)
    model.to(dev)
    torch.manual_seed(seed + rank)  # but different dropout masks in each process
    if fsdp:
        distributed.shard(model)

    # ---- optimizer -----------------------------------------------------------------------------
    muon_dtype = getattr(torch, fast_path(device_type, n_embd)["muon_dtype"])
    optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                            muon_dtype)
    if ckpt is not None:
        if ckpt_meta.get("fsdp", False) != fsdp:
            raise UsageError(f"cannot resume: {ckpt_path} was written with fsdp={ckpt_meta.get('fsdp', False)}; "
                             "resume with the same fsdp setting")
        distributed.load_optimizer_states(model, optimizers, ckpt["optimizers"], fsdp)
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, batch_rng)
    ckpt = None  # free the memory
    raw_model = model
    if use_compile:
        model = torch.compile(model, mode=compile_mode)
    if ddp and not fsdp:
        model = distributed.wrap_ddp(model, dev)

    if master and not (eval_only or inspect):
        if init_from == "resume":
            trim_metrics(os.path.join(out_dir, "metrics.jsonl"), iter_num)  # a resumed run continues its record
        else:
            set_aside_earlier_run(out_dir, replace_earlier_run)  # only now, when every check above has passed
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | device {dev} | {dtype_name} | "
              f"{tokens_per_iter:,} tokens per iteration")
    peak = peak_flops(dev, ptdtype) if master else None
    metrics = MetricsLog(out_dir, config, master)
    stop = StopRequest(ddp, stop_group, saves=not eval_only)  # Ctrl-C / SIGTERM: save ckpt.pt at a safe point, exit

    def eval_batches(batches):
        """An evaluation's batches, with a progress bar; a stop request may abandon it (run_folder.py)."""
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False, disable=None if master else True):
            stop.check_eval()
            yield batch

    def estimate_loss():
        """Train loss over eval_iters random batches (the same ones at every eval); val loss exactly,
        over the whole split, when that is no more work than eval_iters batches (else sampled too)."""
        model.eval()
        # inference mode skips autograd bookkeeping entirely; FSDP reuses its gather buffers in training,
        # which tensors made in inference mode would forbid, so it gets plain no_grad
        with torch.no_grad() if fsdp else torch.inference_mode():
            sampled = sampled_starts(len(train_data), block_size, batch_size, eval_iters, seed + rank)
            losses = {"train": mean_loss(raw_model, train_data, eval_batches(sampled), block_size, dev, autocast, ddp)}
            whole = len(val_data) <= eval_iters * batch_size * block_size
            starts = (whole_split_starts(len(val_data), block_size, batch_size, rank, world_size) if whole
                      else sampled_starts(len(val_data), block_size, batch_size, eval_iters, seed + rank))
            losses["val"] = mean_loss(raw_model, val_data, eval_batches(starts), block_size, dev, autocast, ddp)
        model.train()
        return losses

    def checkpoint_state():
        """(tensors, meta) to save. Every process must call it (with FSDP it gathers the shards)."""
        model_state, optimizer_states = distributed.full_states(raw_model, optimizers, fsdp)
        tensors = {"model": model_state, "optimizers": optimizer_states,
                   "scaler": scaler.state_dict(), **rng_state(batch_state["next_step"])}
        ckpt_meta = {"model_args": model_args, "config": config, "iter_num": iter_num, "fsdp": fsdp,
                     "best_val_loss": best_val_loss, "tokenizer": meta["tokenizer"], "dataset": dataset,
                     "evaluated": evaluated_at == iter_num}
        return tensors, ckpt_meta


    # ---- training loop -------------------------------------------------------------------------
    progress = tqdm(total=max_iters, initial=iter_num, disable=None if master else True, unit="it",
                    dynamic_ncols=True, leave=False)
    log = progress.write if master else (lambda *a, **k: None)
    batches = train_batches()
    X, Y = next(batches)  # the first batch
    if inspect:
        print_gradient_table(raw_model, optimizers, X, Y, autocast, get_lr(iter_num, learning_rate, warmup_iters,
                                                                           lr_decay_iters, min_lr, decay_lr))
        return
    # evaluate before the first step unless not asked to, or the checkpoint's state was evaluated already
    eval_first = evaluated_at != iter_num if init_from == "resume" else eval_at_start
    if device_type == "cpu" and master and not ddp and not eval_only and iter_num < max_iters:
        evals = evals_ahead(iter_num, max_iters, eval_interval, eval_first)
        print(how_long(raw_model, X, Y, autocast, accum_steps, max_iters - iter_num, evals, 2 * eval_iters,
                       any_device=device == "auto"))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    guard = Guard(optimizers, scaler, max_bad_steps, dev, fsdp)
    evals_without_gain, last_val, ratios = 0, None, None
    start_iter = saved_at = last_log_iter = iter_num
    t0 = time.perf_counter()
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
        for group in [group for opt in optimizers for group in opt.param_groups]:
            group["lr"] = lr

        due = eval_only or iter_num % eval_interval == 0 or iter_num == max_iters
        if due and not (iter_num == start_iter and not eval_first and not eval_only):
            try:
                losses = estimate_loss()  # collective under torchrun
            except EvalAbandoned:
                log(f"eval {iter_num}: abandoned, a stop was requested")
                break
            last_val, evaluated_at = losses["val"], iter_num
            log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.record({"type": "eval", "iter": iter_num, "train_loss": losses["train"],
                            "val_loss": losses["val"]})
            improved = losses["val"] < best_val_loss
            best_val_loss, evals_without_gain = (losses["val"], 0) if improved else (best_val_loss,
                                                                                      evals_without_gain + 1)
            if iter_num > 0 and not eval_only and (improved or always_save_checkpoint):
                tensors, ckpt_meta = checkpoint_state()  # collective with FSDP
                saved_at = iter_num
                if master:  # ckpt.pt, best_model.pt when val improved, and the last keep_last_n ckpt_<iter>.pt
                    save_checkpoints(out_dir, tensors, ckpt_meta, improved, keep_last_n)
            t0, last_log_iter = time.perf_counter(), iter_num  # keep eval time out of ms/iter
            if patience and evals_without_gain >= patience:
                log(f"early stop: val loss has not improved for {patience} evals")
                break
        if eval_only or iter_num >= max_iters:
            break

        # one optimizer step = accum_steps micro-batches; the loss is divided so the gradients average
        log_step = (iter_num + 1) % log_interval == 0  # every process: with FSDP the figures are collective
        monitor_step = (iter_num + 1) % monitor_interval == 0
        weights_before = [p.detach().clone() for p in params] if monitor_step else None  # for the update ratio
        for micro_step in range(accum_steps):
            with distributed.sync_context(model, ddp, fsdp, micro_step == accum_steps - 1), autocast:
                _, loss = model(X, Y)
                loss = loss / accum_steps
            X, Y = next(batches)  # fetch the next batch while the device is busy
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # real gradient sizes for the norm (nothing to undo without a scaler)
        # the global gradient norm (logged), and the gradients clipped to grad_clip unless it is 0
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
                     else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        grad_norm = distributed.full(grad_norm)  # collective with FSDP
        guard.step(loss, grad_norm)  # the NaN guard: a non-finite loss or gradient never reaches the weights
        if monitor_step:
            ratios = update_ratios(optimizers, params, weights_before)
        if log_step:  # the one read of the device between logs
            loss_value, norm_value, run_now, longest, skipped_now = torch.stack(
                [loss.detach().float() * accum_steps, grad_norm.float(), *guard.counts()]).tolist()
            # iter_num + 1: the step just taken, as its log line below names it
            guard.report(log, iter_num + 1, loss_value, raw_model, run_now, longest, skipped_now, ckpt_path, progress)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        iter_num += 1
        progress.update(1)

        if log_step and master:
            t1 = time.perf_counter()
            dt = (t1 - t0) / (iter_num - last_log_iter)
            t0, last_log_iter = t1, iter_num
            mfu = raw_model.estimate_mfu(tokens_per_iter / dt, peak) if peak else None
            entry = {"type": "train", "iter": iter_num, "loss": loss_value, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, "grad_norm": norm_value,
                     "clipped": bool(grad_clip > 0 and norm_value > grad_clip),
                     "update_ratio_log10": ratios, "skipped_steps": int(skipped_now),
                     "loss_scale": scaler.get_scale() if scaler.is_enabled() else None}
            ratios = None  # each measurement is logged once
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            metrics.log_train(entry, log)  # the line, its warnings (a loss spike, MFU > 100%), metrics.jsonl
        if stop.agreed():  # collective under torchrun: every process stops after the same step
            break

    progress.close()
    if not eval_only and saved_at != iter_num:  # ckpt.pt always ends as the final state
        tensors, ckpt_meta = checkpoint_state()
        if master:
            save_checkpoint(ckpt_path, tensors, ckpt_meta)
    distributed.finish(ddp, stop_group)  # collective: no process exits before the first one has saved
    if stop.signal is not None:
        if master and not eval_only and os.path.exists(ckpt_path):
            print(f"stopped at iteration {iter_num}; {ckpt_path} saved. Resume with: "
                  f"python train.py {' '.join(sys.argv[1:])} --init_from=resume")
        elif master:  # stopped in an evaluation before any step (or in eval_only): no state worth keeping
            print(f"stopped at iteration {iter_num} with no step taken: nothing was saved; run the same command again")
        sys.exit(128 + stop.signal)
    if master:
        best = os.path.join(out_dir, "best_model.pt")
        print(f"done: best val loss {best_val_loss:.4f}" + (f", last {last_val:.4f}" if last_val else ""))
        if os.path.exists(best):
            print(f"sample from it: python generate.py --ckpt {best}")


def pretrained_model(init_from, model_args, meta, dataset):
    """GPT-2 weights to start from (init_from='gpt2'... or a local Hugging Face folder), cropped to block_size;
    model_args take the loaded model's sizes."""
    model = gpt2_from_hf(init_from, dict(dropout=model_args["dropout"], attention=model_args["attention"]))
    block_size = model_args["block_size"]
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
    return model


if __name__ == "__main__":
    configurator.run_cli(run)
