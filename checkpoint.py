"""
Checkpoints: written atomically, read without unpickling anything.

A checkpoint is a dict of tensors (model, optimizer and scaler state, RNG states) saved with
torch.save, plus one JSON string `meta` (configuration, tokenizer, iteration, best val loss).
It is loaded with torch.load(weights_only=True), which only rebuilds tensors and plain containers:
a file from a stranger cannot run code on your machine.
"""

import json
import os

import torch

from configurator import UsageError

FORMAT_VERSION = 1


def save_checkpoint(path, tensors, meta):
    """Write tensors + meta to path atomically: a temp file in the same folder, fsync, rename.

    A crash at any moment leaves the previous file at path intact."""
    payload = dict(tensors, format_version=FORMAT_VERSION, meta=json.dumps(meta))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is kept. "
                         "Free some disk space or choose a writable out_dir") from e
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder):
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """(tensors, meta) from a checkpoint file, or one clear UsageError saying what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' not found; train first (python train.py config/...) "
                         "or give the right --ckpt path")
    try:
        # mmap: tensors are read from disk only when used (sampling never touches the optimizer state)
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, foreign pickle, unsafe globals: all mean "not ours"
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"'{path}' is not a readable GlassGPT checkpoint ({reason}); "
                         "it may be truncated or from another program: retrain or use another file")
    if not isinstance(payload, dict) or "format_version" not in payload or "meta" not in payload:
        raise UsageError(f"'{path}' is not a GlassGPT checkpoint (no format_version/meta); "
                         "for Hugging Face GPT-2 weights use --init_from=<directory>")
    if payload["format_version"] > FORMAT_VERSION:
        raise UsageError(f"'{path}' has checkpoint format {payload['format_version']}, newer than this "
                         f"code's {FORMAT_VERSION}; update GlassGPT (git pull)")
    meta = json.loads(payload.pop("meta"))
    return payload, meta
