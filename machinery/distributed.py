"""
Several processes, one run (torchrun): process set-up, DDP or FSDP2 wrapping, and what sharded tensors
need (gathering them for the log and the checkpoint). Every function that says "collective" must be
called by every process, in the same order, or the run hangs.
"""

import os

import torch

from machinery.cli import UsageError


def launched_by_torchrun():
    return int(os.environ.get("RANK", -1)) != -1


def init_processes(dev, backend, gradient_accumulation_steps):
    """(device, rank, world_size, accum_steps, stop_group) of this process. Each process gets its own GPU;
    the global batch stays the same however many processes share it. stop_group: a gloo group for the
    stop flag, so that agreeing on a stop never waits for the GPU (None when the run is already gloo)."""
    import torch.distributed as dist
    local_rank = int(os.environ["LOCAL_RANK"])
    if dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=("nccl" if dev.startswith("cuda") else "gloo") if backend == "auto" else backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    stop_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    if gradient_accumulation_steps % world_size:
        raise UsageError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be "
                         f"divisible by the number of processes ({world_size})")
    return dev, rank, world_size, gradient_accumulation_steps // world_size, stop_group


def shard(model):
    """FSDP2: each process keeps 1/world_size of every block's weights, gathering a block's full weights
    only while it runs; the optimizer then sees (and steps) only the local shards."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def wrap_ddp(model, dev):
    """DDP: every process holds the whole model, and backward all-reduces the gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[dev] if dev.startswith("cuda") else None)


def sync_context(model, env, last_micro_step):
    """Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on its last micro-batch."""
    from contextlib import nullcontext
    if env.fsdp:
        model.set_requires_gradient_sync(last_micro_step)
    return model.no_sync() if env.ddp and not env.fsdp and not last_micro_step else nullcontext()


def all_reduce_sum(*tensors):
    """Sum each tensor over all processes, in place (collective)."""
    for t in tensors:
        torch.distributed.all_reduce(t)


def full(tensor):
    """A plain tensor from an FSDP-sharded one (a collective: every process must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_states(model, optimizers, fsdp):
    """The unsharded model and optimizer state dicts (collective with FSDP: gathered onto the first process's
    CPU; with cpu_offload=True PyTorch hands the full dicts to rank 0 only, the others get empty ones)."""
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


def finish(ddp, group):
    """The end of a torchrun run (collective). No process exits before the first one has saved: torchrun stops
    all of them when one exits non-zero."""
    if ddp:
        torch.distributed.barrier(group=group)
        torch.distributed.destroy_process_group()
