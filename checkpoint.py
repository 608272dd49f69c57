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
from faults import removed_on_failure, writing

FORMAT_VERSION = 1


def save_checkpoint(path, tensors, meta):
    """Write tensors + meta to path atomically: a temp file in the same folder, fsync, rename.

    A crash at any moment leaves the previous file at path intact; a full disk, an unwritable folder or
    Ctrl-C leaves no temp file either, and a full disk or an unwritable folder is one UsageError."""
    payload = dict(tensors, format_version=FORMAT_VERSION, meta=json.dumps(meta))
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, kept="the previous checkpoint is kept"), removed_on_failure(tmp):
        with open(tmp, "wb") as f:
            save_reporting_os_errors(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class ErrorKeepingFile:
    """A file that keeps the OSError of a failed write: torch.save reports one only as a RuntimeError
    about a zip offset ('unexpected pos'), which loses the reason (a full disk, say)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_reporting_os_errors(payload, f):
    """torch.save(payload, f), but a failed write raises its own OSError."""
    keeper = ErrorKeepingFile(f)
    try:
        torch.save(payload, keeper)
    except RuntimeError as e:
        if keeper.error is None:
            raise
        raise keeper.error from e


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


def in_run_folder(path):
    """A run folder (a train.py out_dir) means its best_model.pt; any other path is itself."""
    if not os.path.isdir(path):
        return path
    best = os.path.join(path, "best_model.pt")
    if not os.path.isfile(best):
        raise UsageError(f"{path} is a folder without a best_model.pt; give a checkpoint file in it "
                         f"(such as {os.path.join(path, 'ckpt.pt')}) or a run folder that train.py has written")
    return best


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
