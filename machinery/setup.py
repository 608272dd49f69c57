"""
A run's set-up in one call: which processes (one, or torchrun's), which device, which precision, compiled or
not. train.py gets the same named values for one process and for torchrun, each setting resolved once
('auto' made concrete, the accumulation split across processes), so the loop never asks again.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from machinery import devices, distributed
from machinery.cli import UsageError


@dataclass
class Setup:
    device: str  # 'cpu', 'cuda:0', 'mps': where this process computes
    device_type: str  # 'cpu', 'cuda', 'mps': what autocast, GradScaler and the fast path key on
    dtype: torch.dtype  # the precision the forward pass runs in (autocast), or float32
    autocast: object  # a context manager: torch.autocast in dtype, or nothing for float32
    compile: bool  # torch.compile the model
    muon_dtype: torch.dtype  # the dtype Muon's Newton-Schulz steps run in (devices.py: fast_path)
    ddp: bool  # launched by torchrun: several processes, one run
    fsdp: bool  # with torchrun: weights, gradients and optimizer state sharded
    rank: int  # this process's number, 0 in a one-process run
    world_size: int  # how many processes
    master: bool  # rank 0: the process that logs, evaluates-and-saves and writes files
    accum_steps: int  # micro-batches per optimizer step in this process (gradient_accumulation_steps / world_size)
    stop_group: object  # the gloo group that agrees on a stop request under torchrun (or None)


def setup(config):
    """Resolve config's device, dtype, compile and processes; seed the initial weights."""
    c = config
    ddp = distributed.launched_by_torchrun()
    device, rank, world_size, accum_steps, stop_group = devices.pick_device(c["device"]), 0, 1, \
        c["gradient_accumulation_steps"], None
    if ddp:
        device, rank, world_size, accum_steps, stop_group = distributed.init_processes(device, c["backend"],
                                                                                    accum_steps)
    elif c["fsdp"]:
        raise UsageError("fsdp=True shards the model across processes: launch it with "
                         "torchrun --standalone --nproc_per_node=N train.py ...")
    if c["fsdp"] and c["inspect"]:
        raise UsageError("inspect=True runs in one process; drop fsdp=True (and torchrun) for it")
    device_type = devices.device_type(device)
    fast = devices.fast_path(device_type, c["n_embd"])
    dtype = getattr(torch, devices.pick_dtype(c["dtype"], device_type, c["n_embd"]))
    torch.manual_seed(c["seed"])  # the same initial weights in every process (FSDP does not broadcast them)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)
    return Setup(device=device, device_type=device_type, dtype=dtype, autocast=autocast,
                 compile=fast["compile"] if c["compile"] == "auto" else c["compile"],
                 muon_dtype=getattr(torch, fast["muon_dtype"]), ddp=ddp, fsdp=c["fsdp"], rank=rank,
                 world_size=world_size, master=rank == 0, accum_steps=accum_steps, stop_group=stop_group)
