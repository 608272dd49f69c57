"""
The run folder (out_dir) of train.py: one run at a time in it, nothing of an earlier run lost, and a
run that ends, or is stopped, saying what it saved and what to do next.

- open_run_folder: lock_run_folder (a second train.py that starts in a folder in use stops with one
  line naming the first; the lock of a run that was killed is taken over), then faults.remove_leftovers
  (the half-written `<file>.tmp<pid>` that a killed run's atomic write left behind; nothing else).
- start_record: a new run first moves the files of the earlier run in the folder to
  out_dir/earlier-runs/<time of its last write>/ (set_aside_earlier_run; or deletes them, when asked to
  replace it); a resumed run cuts its metrics.jsonl back to the checkpoint.
- StopRequest: Ctrl-C / SIGTERM stop the loop at a safe point; end_run: the final checkpoint and the
  closing lines.
"""

import atexit
import os
import re
import shlex
import shutil
import socket
import sys
import time

from filelock import lock_descriptor

from machinery import distributed
from machinery.cli import UsageError
from machinery.faults import remove_leftovers, writing
from machinery.metrics import trim_metrics

LOCK_FILE = "train.lock"
EARLIER_RUNS = "earlier-runs"
# what a run writes into out_dir (train.py, and plot.py's default picture of it)
RUN_FILE = re.compile(r"ckpt\.pt|ckpt_\d+\.pt|best_model\.pt|metrics\.jsonl|metrics\.png|tensorboard")
# what its atomic writes leave behind when killed midway (checkpoint.py: save_checkpoint, metrics.py:
# trim_metrics, plot.py)
LEFTOVER = re.compile(r"(?:ckpt\.pt|ckpt_\d+\.pt|best_model\.pt|metrics\.jsonl|metrics\.png)\.tmp(\d+)")


def open_run_folder(out_dir, lock):
    """Make out_dir, take its lock (lock=False: another process of this run, or --inspect, which writes
    nothing) and remove what a killed run half-wrote; returns the path of its ckpt.pt."""
    make_run_folder(out_dir)
    if lock:
        lock_run_folder(out_dir)
        remove_leftovers(out_dir, LEFTOVER)
    return os.path.join(out_dir, "ckpt.pt")


def start_record(out_dir, config, iter_num, master):
    """A resumed run continues its record (metrics.jsonl cut back to the checkpoint); a new one first sets
    the earlier run's files aside. Only the first process, and only for a run that trains."""
    if not master or config["eval_only"] or config["inspect"]:
        return
    if config["init_from"] == "resume":
        trim_metrics(os.path.join(out_dir, "metrics.jsonl"), iter_num)
    else:
        set_aside_earlier_run(out_dir, config["replace_earlier_run"])


def end_run(iter_num, checkpoints, evals, stop, env, progress):
    """After the loop: the final ckpt.pt (collective with FSDP), every process waits for it, then the first
    says what was saved and what to do next. A stopped run exits with 128 + the signal's number."""
    progress.close()
    checkpoints.save_final(iter_num, evals)
    distributed.finish(env.ddp, env.stop_group)  # collective: no process exits before the first one has saved
    ckpt_path = os.path.join(checkpoints.out_dir, "ckpt.pt")
    eval_only = checkpoints.config["eval_only"]
    if stop.signal is not None:
        if env.master and not eval_only and os.path.exists(ckpt_path):
            print(f"stopped at iteration {iter_num}; {ckpt_path} saved. Resume with: "  # (its settings are in it)
                  f"python train.py --init_from=resume --out_dir={shlex.quote(checkpoints.out_dir)}")
        elif env.master:  # stopped in an evaluation before any step (or in eval_only): no state worth keeping
            print(f"stopped at iteration {iter_num} with no step taken: nothing was saved; run the same command "
                  "again")
        sys.exit(128 + stop.signal)
    if env.master:
        best = os.path.join(checkpoints.out_dir, "best_model.pt")
        last = f", last {evals.last_val:.4f}" if evals.last_val else ""
        print(f"done: best val loss {evals.best_val_loss:.4f}{last}")
        if os.path.exists(best):
            print(f"sample from it: python generate.py --ckpt {best}")


def make_run_folder(out_dir):
    """Create out_dir (and its parents) unless it exists; a file in its place is one clear error."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"out_dir '{out_dir}' is a file, not a folder; choose another out_dir "
                         "(the file is left as it is)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create out_dir '{out_dir}' ({e.strerror}); choose a writable folder")


def lock_run_folder(out_dir):
    """Hold out_dir/train.lock until this process exits, or raise a UsageError naming its holder.

    The lock is the operating system's (flock on POSIX), so it dies with its process: a lock file
    whose writer was killed is free to take, whatever it still says."""
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not lock_descriptor(fd, blocking=False):
            holder = read_holder(fd).replace("\n", ": ") or "a process that is just starting"
            os.close(fd)
            raise UsageError(f"{out_dir} is in use by another training run ({holder}); wait for it to finish, "
                             "stop it, or choose another out_dir")
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)  # its holder deleted the file between our open and our lock: open the new one
    stale = read_holder(fd)
    if stale:
        print(f"note: took over {path} from a run that is no longer running ({stale.splitlines()[0]})")
    holder = (f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              f"python {os.path.basename(sys.argv[0])} {' '.join(sys.argv[1:])}")  # who, then its command
    try:
        with writing(path):  # a full disk: one line, and no lock file left behind
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, holder.encode("utf-8", "backslashreplace"))  # (a folder name need not be UTF-8)
    except BaseException:
        release_lock(fd, path)
        raise
    atexit.register(release_lock, fd, path)


def read_holder(fd):
    """What the lock file says about the run that holds (or held) it: who, then its command; '' if empty."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1000).decode("utf-8", "replace").strip()
    except OSError:  # Windows forbids reading a locked byte range
        return "another process"


def release_lock(fd, path):
    if os.path.exists(path):  # (unless the folder itself was deleted meanwhile)
        os.remove(path)  # while still holding the lock, so nobody can take a lock on a file about to vanish
    os.close(fd)


def set_aside_earlier_run(out_dir, replace):
    """Before a new run writes into out_dir: move the earlier run's files to a folder of their own,
    or, with replace=True, delete them."""
    names = [name for name in sorted(os.listdir(out_dir)) if RUN_FILE.fullmatch(name)]
    if not names:
        return
    paths = [os.path.join(out_dir, name) for name in names]
    if replace:
        for path in paths:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        print(f"replace_earlier_run=True: deleted the earlier run's {', '.join(names)} from {out_dir}")
        return
    folder = new_folder(os.path.join(out_dir, EARLIER_RUNS), max(os.path.getmtime(p) for p in paths))
    for name, path in zip(names, paths):
        os.replace(path, os.path.join(folder, name))  # same file system: a rename, nothing is copied
    print(f"the earlier run in {out_dir} was moved to {folder} (--replace_earlier_run=True replaces it instead)")


def new_folder(parent, timestamp):
    """parent/<YYYY-MM-DD_HH-MM-SS of timestamp>, with -2, -3, ... when that exists already."""
    stem = os.path.join(parent, time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(timestamp)))
    folder, n = stem, 1
    while True:
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            n += 1
            folder = f"{stem}-{n}"


class EvalAbandoned(Exception):
    """A stop request during an evaluation: its batches so far are dropped and the run stops."""


class StopRequest:
    """Ctrl-C / SIGTERM during training: stop at the next safe point (after this step, or abandoning an
    evaluation), save ckpt.pt, then exit; a second one exits at once, without saving."""

    def __init__(self, ddp, group, saves=True):
        import signal
        self.signal, self.ddp, self.group = None, ddp, group
        self.notice = b"\nstopping at the next safe point" + (b" to save ckpt.pt" if saves else b"") + \
            b" (interrupt again to exit at once, without saving)\n"  # saves=False: an eval_only run
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        if self.signal is not None:
            os.write(sys.stderr.fileno(), b"\nsecond interrupt: exiting now, without saving\n")
            sys.exit(128 + signum)
        self.signal = signum
        # os.write, not print: a handler may run in the middle of a print, and print is not re-entrant
        os.write(sys.stderr.fileno(), self.notice)

    def check_eval(self):
        """Abandon an evaluation at a stop request, except under torchrun, whose processes must all make the
        same collective calls: they finish it first."""
        if self.signal is not None and not self.ddp:
            raise EvalAbandoned

    def agreed(self):
        """Whether to stop after this step. Under torchrun the processes agree after every step, whichever of
        them got the signal, so that all stop after the same one (collective); the flag is a CPU tensor
        all-reduced over gloo, which never waits for the GPU. A signal that comes after this process sent its
        flag is kept for the next step, never overwritten by the agreement."""
        if not self.ddp:
            return self.signal is not None
        import torch
        flag = torch.tensor([self.signal or 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if int(flag):
            self.signal = self.signal or int(flag)  # the processes that got no signal stop for it too
        return bool(int(flag))
