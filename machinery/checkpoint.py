"""
Checkpoints and resume state: written atomically, read without unpickling anything.

A checkpoint is a dict of tensors (model, optimizer and scaler state, RNG states: every process's under
torchrun) saved with torch.save, plus one JSON string `meta` (configuration, tokenizer, iteration, best val
loss) and its format number; the optimizer and scaler states hold plain numbers, strings and tuples too.
It is loaded with torch.load(weights_only=True), which only rebuilds tensors and plain containers:
a file from a stranger cannot run code on your machine. A nanoGPT ckpt.pt is read the same way and
converted to ours (machinery/nanogpt.py: converted). generate.py: model_from_checkpoint builds the
model a checkpoint describes.
"""

import glob
import json
import os
import sys

import torch

from machinery import nanogpt
from machinery.checks import fields, shown
from machinery.cli import UsageError, first_line
from machinery.faults import atomic_write, writing

FORMAT_VERSION = 1


def save_checkpoint(path, tensors, meta):
    """Write tensors + meta to path atomically: a temp file in the same folder, fsync, rename.

    A crash at any moment leaves the previous file at path intact; a full disk, an unwritable folder or
    Ctrl-C leaves no temp file either, and a full disk or an unwritable folder is one UsageError."""
    payload = dict(tensors, format_version=FORMAT_VERSION, meta=json.dumps(meta))
    kept = "the previous checkpoint is kept" if os.path.exists(path) else ""
    with writing(path, kept=kept), atomic_write(path, "wb") as f:
        save_reporting_os_errors(payload, f)


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


def find_checkpoint(path):
    """path itself if it is a file; a run folder means its best_model.pt; a bare file name is looked up in
    the newest run folder here."""
    if os.path.isdir(path):
        return in_run_folder(path)
    if os.path.exists(path) or os.path.dirname(path):
        return path
    found = [p for p in glob.glob(os.path.join("*", path)) + glob.glob(os.path.join("*", "*", path))
             if not p.startswith("data" + os.sep)]
    if not found:
        raise UsageError(f"no {path} found here or in the run folders below; train first "
                         "(python train.py config/shakespeare_char_cpu.py) or give --ckpt <out_dir>/best_model.pt")
    newest = max(found, key=os.path.getmtime)
    print(f"using {newest}", file=sys.stderr)
    return newest


def in_run_folder(path):
    """A run folder (a train.py out_dir) means its best_model.pt; a folder with only a ckpt.pt (nanoGPT's
    out_dir, where ckpt.pt is the best model) its ckpt.pt; any other path is itself."""
    if not os.path.isdir(path):
        return path
    best, last = os.path.join(path, "best_model.pt"), os.path.join(path, "ckpt.pt")
    if os.path.isfile(best):
        return best
    if os.path.isfile(last):
        print(f"using {last} (no best_model.pt in {path})", file=sys.stderr)
        return last
    raise UsageError(f"{path} is a folder without a best_model.pt or ckpt.pt; give a checkpoint file "
                     "or a run folder that train.py (or nanoGPT's train.py) has written")


def load_checkpoint(path, map_location="cpu"):
    """(tensors, meta) from a checkpoint file, or one clear UsageError saying what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' not found; train first (python train.py config/...) "
                         "or give the right --ckpt path")
    try:
        # mmap: tensors are read from disk only when used (sampling never touches the optimizer state);
        # PyTorch opens a path as UTF-8, so a name that is not (Linux allows it) is read through a file
        if path == shown(path):
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        else:
            with open(path, "rb") as f:
                payload = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, unsafe globals: all mean "not ours"
        if "weights_only" in str(e):  # a pickle of more than tensors and plain containers
            raise UsageError(f"'{path}' is not a readable GlassGPT checkpoint: it holds Python objects that "
                             "torch.load(weights_only=True) does not rebuild (GlassGPT and nanoGPT checkpoints hold "
                             "only tensors and plain containers); use another file")
        raise UsageError(f"'{path}' is not a readable GlassGPT checkpoint ({first_line(e)}); "
                         "it may be truncated or from another program: retrain or use another file")
    fix = "use a checkpoint written by train.py"
    if nanogpt.is_checkpoint(payload):  # nanoGPT's ckpt.pt, as our (tensors, meta)
        payload, meta = nanogpt.converted(payload, path)
        fix = "use a ckpt.pt written by nanoGPT's train.py"
    else:
        meta = glassgpt_meta(payload, path, fix)
    fields(meta, META_FIELDS, f"'{path}'", fix)
    fields(meta["model_args"], MODEL_ARGS_FIELDS, f"'{path}' model_args", fix)
    if meta["model_args"]["n_embd"] % meta["model_args"]["n_head"]:
        raise UsageError(f"'{path}' model_args: n_embd is not divisible by n_head; {fix}")
    return payload, meta


def glassgpt_meta(payload, path, fix):
    """The JSON meta of one of our checkpoints (taken out of payload), its format checked."""
    if not isinstance(payload, dict) or "format_version" not in payload or "meta" not in payload:
        raise UsageError(f"'{path}' is not a GlassGPT checkpoint (no format_version/meta) nor a nanoGPT ckpt.pt; "
                         "for Hugging Face GPT-2 weights use --init_from=<directory>")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"'{path}' has checkpoint format {version!r}, newer than this "
                         f"code's {FORMAT_VERSION}; update GlassGPT (git pull)")
    try:
        return json.loads(payload.pop("meta"))
    except (TypeError, ValueError) as e:
        raise UsageError(f"'{path}': its metadata is not JSON ({first_line(e, 80)}); {fix}")


# what a checkpoint's JSON must hold, and the sizes a model can have, checked before anything is built
META_FIELDS = {"model_args": (dict, None, None)}  # (the tokenizer: generate.py: model_from_checkpoint)
MODEL_ARGS_FIELDS = {"n_layer": (int, 0, 10_000), "n_head": (int, 1, 10_000), "n_embd": (int, 1, 1 << 20),
                     "block_size": (int, 1, 1 << 24), "vocab_size": (int, 1, 1 << 24), "bias": (bool, None, None),
                     "dropout": ((int, float), 0, 1)}


MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def check_resumable(ckpt_meta, ckpt_path, config, model_args, tokenizer, master):
    """Resuming needs the checkpoint's model shape, tokenizer, optimizer and fsdp setting: the same ids must
    mean the same tokens, and the saved optimizer state must fit. A changed schedule is said, not refused."""
    fix = "resume from a checkpoint written by train.py, or start a new run in another out_dir"
    fields(ckpt_meta, {"iter_num": (int, 0, None), "config": (dict, None, None)}, f"'{ckpt_path}'", fix)
    best = ckpt_meta.get("best_val_loss")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best != best:  # (inf: never evaluated)
        raise UsageError(f"'{ckpt_path}': 'best_val_loss' is {best!r}, not a number; {fix}")
    dataset = config["dataset"]
    trained_on = ckpt_meta.get("dataset", dataset)
    if ckpt_meta.get("tokenizer", tokenizer) != tokenizer:
        raise UsageError(f"cannot resume: {ckpt_path} was trained on dataset '{trained_on}', whose tokenizer "
                         f"differs from that of '{dataset}'; resume with --dataset={trained_on}, or start a new "
                         "run in another out_dir")
    if trained_on != dataset and master:
        print(f"resume: dataset changed from {trained_on} to {dataset} (the same tokenizer)")
    saved = ckpt_meta["model_args"]
    for k in MODEL_KEYS:
        if saved[k] != model_args[k]:
            raise UsageError(f"cannot resume: {k} is {model_args[k]} in this config but {saved[k]} "
                             f"in {ckpt_path}; use the original model settings or a new out_dir")
    trained_with = ckpt_meta["config"].get("optimizer", config["optimizer"])  # (saved state fits only its own)
    if trained_with != config["optimizer"]:
        raise UsageError(f"cannot resume: optimizer is {config['optimizer']} in this config but {trained_with} in "
                         f"{ckpt_path}, whose saved state is {trained_with}'s; resume with --optimizer={trained_with} "
                         "(or leave it out), or start a new run in another out_dir")
    for key in ("learning_rate", "max_iters", "lr_decay_iters", "min_lr", "warmup_iters"):
        if ckpt_meta["config"].get(key, config[key]) != config[key] and master:
            print(f"resume: {key} changed from {ckpt_meta['config'][key]} to {config[key]}")
    if ckpt_meta.get("fsdp", False) != config["fsdp"]:
        raise UsageError(f"cannot resume: {ckpt_path} was written with fsdp={ckpt_meta.get('fsdp', False)}; "
                         "resume with the same fsdp setting")


class Checkpoints:
    """What train.py saves and restores: the model, the optimizers, the GradScaler and every random state
    (the batches' included) as tensors, with the run's settings and progress as JSON."""

    def __init__(self, out_dir, model, optimizers, scaler, batches, model_args, config, meta, env):
        self.out_dir, self.model, self.optimizers, self.scaler, self.batches = out_dir, model, optimizers, scaler, \
            batches
        self.model_args, self.config, self.meta, self.env = model_args, config, meta, env
        self.saved_at = None  # the iteration of the last save in this run

    def state(self, iter_num, evals):
        """(tensors, meta) to save. Every process must call it (with FSDP it gathers the shards)."""
        from machinery import distributed  # (training code: sampling, which reads checkpoints, never loads it)
        model_state, optimizer_states = distributed.full_states(self.model, self.optimizers, self.env.fsdp)
        tensors = {"model": model_state, "optimizers": optimizer_states, "scaler": self.scaler.state_dict(),
                   **rng_state(self.batches.state, self.env)}
        ckpt_meta = {"model_args": self.model_args, "config": self.config, "iter_num": iter_num,
                     "fsdp": self.env.fsdp, "best_val_loss": evals.best_val_loss,
                     "tokenizer": self.meta["tokenizer"], "dataset": self.config["dataset"],
                     "evaluated": evals.evaluated_at == iter_num}
        return tensors, ckpt_meta

    def save(self, iter_num, evals):
        """After an evaluation: ckpt.pt, best_model.pt when val improved, the last keep_last_n ckpt_<iter>.pt
        (collective with FSDP; the first process writes)."""
        tensors, ckpt_meta = self.state(iter_num, evals)
        self.saved_at = iter_num
        if self.env.master:
            save_checkpoints(self.out_dir, tensors, ckpt_meta, evals.improved, self.config["keep_last_n"])

    def save_final(self, iter_num, evals):
        """ckpt.pt always ends as the final state, unless this run took no step since it was saved (collective
        with FSDP). An eval_only run saves nothing."""
        last_saved = evals.first_iter if self.saved_at is None else self.saved_at
        if not self.config["eval_only"] and iter_num != last_saved:
            tensors, ckpt_meta = self.state(iter_num, evals)
            if self.env.master:
                save_checkpoint(os.path.join(self.out_dir, "ckpt.pt"), tensors, ckpt_meta)

    def restore(self, ckpt):
        """The optimizer, scaler and random states of a checkpoint being resumed (a nanoGPT checkpoint holds
        only its AdamW's state: machinery/nanogpt.py: resume_optimizer)."""
        from machinery import distributed
        if "optimizers" not in ckpt:
            return nanogpt.resume_optimizer(ckpt, self.optimizers, self.env.master)
        distributed.load_optimizer_states(self.model, self.optimizers, ckpt["optimizers"], self.env.fsdp)
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, self.batches.rng, self.env.rank)


def save_checkpoints(out_dir, tensors, ckpt_meta, improved, keep_last_n):
    """After an evaluation: best_model.pt if val improved, ckpt.pt always, and ckpt_<iter>.pt when kept."""
    if improved:
        save_checkpoint(os.path.join(out_dir, "best_model.pt"), tensors, ckpt_meta)
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), tensors, ckpt_meta)
    if keep_last_n:
        keep_periodic_checkpoint(out_dir, ckpt_meta["iter_num"], tensors, ckpt_meta, keep_last_n)


def keep_periodic_checkpoint(out_dir, iter_num, tensors, ckpt_meta, keep):
    """Write ckpt_<iter>.pt and delete the oldest ones beyond the newest `keep`."""
    save_checkpoint(os.path.join(out_dir, f"ckpt_{iter_num:07d}.pt"), tensors, ckpt_meta)
    periodic = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
    for old in periodic[:-keep]:
        os.remove(os.path.join(out_dir, old))


def rng_state(batch_state, env=None):
    """Every random state training draws from, as tensors (restored exactly on resume): the batches' (the
    same in every process), this process's own under their names, and under torchrun every process's
    (each seeds its own: seed + rank, for its own dropout masks) in `rng_processes`, one row per rank."""
    state = {**process_rng_state(), "rng_batches": batch_state}
    if env is not None and env.ddp:  # (collective: every process gathers them, the first one saves them)
        state["rng_processes"] = {k: gathered(v, env.stop_group) for k, v in process_rng_state().items()}
    return state


def process_rng_state():
    """This process's random states as tensors: torch's CPU generator, CUDA's (one row per GPU), Python's
    and NumPy's (Mersenne Twister words and position)."""
    import random
    import numpy as np
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"rng_torch": torch.get_rng_state(), "rng_python": torch.tensor(py_state, dtype=torch.int64),
             "rng_numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "rng_numpy_pos": torch.tensor(np_state[2])}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (GPUs, state bytes)
    return state


def gathered(tensor, group):
    """(world_size, *tensor.shape): the tensor of every process, by rank (collective; CPU tensors, so a
    gloo group: the run's own under gloo, stop_group under NCCL)."""
    rows = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, tensor, group=group)
    return torch.stack(rows)


def restore_rng(ckpt, batch_rng, rank=0):
    """The batches' state, and this process's own random states: its row of `rng_processes`, else (a
    one-process checkpoint, or one from before they were saved) the first process's, which only the
    first process restores; any other keeps its fresh seed + rank (train.py)."""
    import random
    import numpy as np
    batch_rng.set_state(ckpt["rng_batches"].cpu())
    rows = ckpt.get("rng_processes")
    if rows is not None and rank < len(rows["rng_torch"]):
        ckpt = {k: v[rank].clone() for k, v in rows.items()}  # (set_state reads a view's storage from its start)
    elif rank > 0:
        return
    torch.set_rng_state(ckpt["rng_torch"].cpu())
    random.setstate((3, tuple(ckpt["rng_python"].tolist()), None))
    words = ckpt["rng_numpy"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", words, int(ckpt["rng_numpy_pos"]), 0, 0.0))
    if "rng_cuda" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
