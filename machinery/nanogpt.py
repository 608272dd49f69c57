"""
Coming from nanoGPT: its checkpoints, its char tokenizer file and its names, read here (docs: README.md,
"Coming from nanoGPT").

- A nanoGPT `ckpt.pt` is a dict of `model` (a state dict with our key names; `_orig_mod.` in front of
  each when it was trained with compile=True), `model_args`, `iter_num`, `best_val_loss` (a 0-d tensor),
  `config` and `optimizer`. machinery/checkpoint.py: load_checkpoint reads it with
  torch.load(weights_only=True), as it reads ours, and `converted` turns it into our (tensors, meta),
  which load_checkpoint then checks as it checks ours. nanoGPT's optimizer state is kept under
  `optimizer`, as nanoGPT names it.
- Its MLP uses the exact GELU, ours the tanh form GPT-2 was trained with: `gelu_gap` measures what that
  changes in the logits, on the checkpoint's own weights, and `converted` says it in one line.
- Its char tokenizer is data/<dataset>/meta.pkl, a pickle. It is never unpickled: `read_meta_pkl` walks
  the pickle's opcodes (pickletools.genops) and accepts only dicts, whole numbers and strings; an opcode
  that could run code (GLOBAL, REDUCE, ...) is refused before anything is built. Without a meta.pkl, a
  vocabulary of GPT-2's size means GPT-2's tokenizer (as nanoGPT's sample.py decides).
- Its names that do not exist here (a config file, a script, a flag of sample.py) map to ours in one
  place, NAMES and SAMPLE_FLAGS: generate.py's flag errors say SAMPLE_FLAGS' line, `instead` is the hint
  an error about a missing file appends, and tests/test_nanogpt.py keeps the README's table in step.
"""

import os
import pickletools
import sys

import torch

from machinery.checks import fields
from machinery.cli import UsageError, first_line

NAMES = {  # nanoGPT's files, commands and configs that do not exist here -> ours
    "sample.py": "python generate.py --ckpt <out_dir>",
    "data/shakespeare_char/prepare.py": "python data.py --name shakespeare_char",
    "data/shakespeare/prepare.py": "python data.py --name shakespeare",
    "data/openwebtext/prepare.py": "python data.py --hf Skylion007/openwebtext --name openwebtext",
    "config/train_shakespeare_char.py": "config/shakespeare_char.py",
}
SAMPLE_FLAGS = {  # sample.py's flags that generate.py spells otherwise (its others are generate.py's too)
    "--out_dir": "--out_dir is nanoGPT's sample.py flag: here give the run folder as --ckpt <out_dir> (its "
                 "best_model.pt, else its ckpt.pt)",
    "--init_from": "--init_from is nanoGPT's sample.py flag: here give --ckpt <out_dir or checkpoint file>; GPT-2's "
                   "own weights come in through train.py --init_from=gpt2",
    "--compile": "here --compile is a switch: give --compile, or leave it out (nanoGPT's sample.py takes "
                 "--compile=False)",
}
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's GPTConfig
# what nanoGPT's config holds resolved for the machine it ran on (its dtype: 'float16' on a GPU without
# bfloat16, say): a resumed run takes this machine's own defaults instead ('auto')
MACHINE_SETTINGS = ("device", "dtype", "compile", "backend")
SAID = set()  # the checkpoints whose one line was said
COMPILED = "_orig_mod."  # torch.compile's wrapper puts this before every key of the state dict
META_PKL_LIMIT = 16 << 20  # bytes: a char vocabulary's meta.pkl is a few kB
GPT2_VOCAB = 50257  # without a meta.pkl, nanoGPT's sample.py takes GPT-2's tokenizer (50257, or 50304 padded)
SAFE_OPCODES = {  # what a pickle of dicts, whole numbers and strings is made of; nothing here calls anything
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def instead(name):
    """'; NAME is nanoGPT's, here it is OURS' when name (a path, maybe in another folder) is one of nanoGPT's
    that do not exist here, else ''."""
    key = os.path.normpath(name).replace(os.sep, "/")
    for theirs, ours in NAMES.items():
        if key == theirs or key.endswith("/" + theirs):
            return f"; {theirs} is nanoGPT's, here it is {ours}"
    return ""


def is_checkpoint(payload):
    """Whether a loaded payload is nanoGPT's (its keys; ours has format_version and a JSON meta)."""
    return isinstance(payload, dict) and "format_version" not in payload and {"model", "model_args"} <= payload.keys()


def converted(payload, path):
    """nanoGPT's payload -> our (tensors, meta): `_orig_mod.` stripped, the tokenizer found (`tokenizer`),
    the model computing with our attention ('sdpa') and GELU (said in one line, with `gelu_gap`)."""
    what, fix = f"'{path}' (a nanoGPT checkpoint)", "use a ckpt.pt written by nanoGPT's train.py"
    fields(payload, {"model": (dict, None, None), "model_args": (dict, None, None), "iter_num": (int, 0, None),
                     "config": (dict, None, None)}, what, fix)
    args = payload["model_args"]
    unknown = sorted(str(k) for k in args if k not in MODEL_ARGS)
    if unknown:  # a fork with another architecture: loading it would compute something else
        raise UsageError(f"{what}: model_args has {', '.join(unknown)}, which nanoGPT's GPT (and this one) does "
                         f"not have; {fix}")
    best = payload.get("best_val_loss", float("inf"))
    best = best.item() if isinstance(best, torch.Tensor) and best.numel() == 1 else best
    state = {k.removeprefix(COMPILED): v for k, v in payload["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}  # the causal mask of torch < 2.0
    config = payload["config"]
    description, source = tokenizer(path, config.get("dataset"), args.get("vocab_size"))
    meta = {"model_args": dict(args, attention="sdpa"), "config": config, "iter_num": payload["iter_num"],
            "best_val_loss": best, "dataset": config.get("dataset"), "evaluated": True, "nanogpt": True,
            "tokenizer": description}
    tensors = {"model": state, **({"optimizer": payload["optimizer"]} if "optimizer" in payload else {})}
    if path not in SAID:  # (once a process: a resumed run reads the file for its settings, then its weights)
        SAID.add(path)
        print(f"{path}: a nanoGPT checkpoint (iteration {payload['iter_num']}, {source}); it computes here with the "
              f"tanh GELU, not nanoGPT's exact one{gelu_gap(state, args)}", file=sys.stderr)
    return tensors, meta


def tokenizer(path, dataset, vocab_size):
    """(our tokenizer description, where it came from) for a nanoGPT checkpoint: the characters of the first
    meta.pkl found (`meta_pkl_places`), else GPT-2's for a vocabulary of its size, else one line saying where
    to put the meta.pkl."""
    places = meta_pkl_places(path, dataset)
    found = next((p for p in places if os.path.isfile(p)), None)
    if found:
        chars = read_meta_pkl(found)
        if isinstance(vocab_size, int) and len(chars) > vocab_size:
            raise UsageError(f"{found} has {len(chars)} characters but the model in '{path}' only {vocab_size} "
                             "tokens; copy the meta.pkl of the dataset it was trained on beside it")
        return {"kind": "char", "chars": chars}, f"its {len(chars)} characters from {found}, read without unpickling"
    if isinstance(vocab_size, int) and vocab_size >= GPT2_VOCAB:
        return {"kind": "gpt2"}, "GPT-2's tokenizer, as no meta.pkl was found"
    raise UsageError(f"'{path}' is a nanoGPT model of {vocab_size} tokens and no meta.pkl was found (looked for "
                     f"{', '.join(places)}); copy its dataset's meta.pkl beside the checkpoint")


def meta_pkl_places(path, dataset):
    """Where a nanoGPT checkpoint's meta.pkl may be, in this order: beside the checkpoint; data/<dataset>/ below
    this folder (where nanoGPT's sample.py looks); data/<dataset>/ beside the checkpoint's out_dir (a nanoGPT
    folder: out-x/ckpt.pt and data/x/meta.pkl)."""
    folder = os.path.dirname(os.path.abspath(path))
    places = [os.path.join(os.path.dirname(path), "meta.pkl")]
    plain = isinstance(dataset, str) and dataset and "/" not in dataset and "\\" not in dataset \
        and dataset not in (".", "..") and "\x00" not in dataset
    if plain:
        places += [os.path.join("data", dataset, "meta.pkl"),
                   os.path.join(os.path.dirname(folder), "data", dataset, "meta.pkl")]
    unique = []
    for p in places:
        if os.path.abspath(p) not in map(os.path.abspath, unique):
            unique.append(p)
    return unique


def read_meta_pkl(path):
    """The characters of nanoGPT's char tokenizer (its itos: id -> character, ids 0..n-1) from a meta.pkl,
    read without unpickling: `plain_pickle` builds only dicts, numbers and strings."""
    if os.path.getsize(path) > META_PKL_LIMIT:
        raise UsageError(f"'{path}' is {os.path.getsize(path):,} bytes, too large for a char tokenizer's meta.pkl")
    with open(path, "rb") as f:
        value = plain_pickle(f.read(), path)
    itos = value.get("itos") if isinstance(value, dict) else None
    ok = isinstance(itos, dict) and sorted(k for k in itos if type(k) is int) == list(range(len(itos))) and \
        all(isinstance(c, str) and len(c) == 1 for c in itos.values()) and len(set(itos.values())) == len(itos)
    if not ok or not itos or value.get("vocab_size", len(itos)) != len(itos):
        raise UsageError(f"'{path}' holds no char tokenizer (an 'itos' dict of ids 0..n-1 to distinct single "
                         "characters, as nanoGPT's data/shakespeare_char/prepare.py writes); copy the right meta.pkl")
    return [itos[i] for i in range(len(itos))]


def plain_pickle(data, path):
    """The value a pickle of dicts, whole numbers, strings, None and booleans describes, built by walking its
    opcodes; any other opcode (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST, OBJ, ... which import and call)
    is one UsageError, raised before anything is built. Nothing is ever unpickled."""
    stack, memo, marks = [], {}, []
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name not in SAFE_OPCODES:
                raise UsageError(f"'{path}' holds the pickle opcode {name} at byte {pos}: only a meta.pkl of "
                                 "dicts, numbers and strings is read, never unpickled (GLOBAL, REDUCE and their "
                                 "kind run code)")
            if name == "MARK":
                marks.append(len(stack))
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name in ("DICT", "SETITEMS"):  # the keys and values pushed since the last MARK
                start = marks.pop()
                items, stack[start:] = stack[start:], []
                if name == "DICT":
                    stack.append({})
                stack[-1].update(zip(items[::2], items[1::2]))
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
            elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "STOP":
                return stack.pop()
            elif name not in ("PROTO", "FRAME"):
                stack.append(arg)  # a number, a string, None, True or False (genops decodes them)
    except UsageError:
        raise
    except Exception as e:  # truncated, unbalanced, an unhashable key: not a pickle of plain values
        raise UsageError(f"'{path}' is not a readable meta.pkl ({first_line(e, 80)}); copy the right meta.pkl")
    raise UsageError(f"'{path}' is not a complete pickle (no STOP); copy the right meta.pkl")


def gelu_gap(state, args):
    """', which moves its logits by at most X (of up to Y) on a test sequence': nanoGPT's forward written out
    from the state dict (`reference_logits`), with the exact GELU and with ours, on the same tokens. '' when
    the weights do not make a model (load_state_dict then says what is wrong)."""
    try:
        T = min(int(args["block_size"]), 64)
        idx = torch.randint(0, int(args["vocab_size"]), (1, T), generator=torch.Generator().manual_seed(0))
        exact, tanh = (reference_logits(state, args, idx, form) for form in ("none", "tanh"))
    except Exception:  # (a missing or misshapen weight, a size that is not a number)
        return ""
    return f", which moves its logits by at most {(exact - tanh).abs().max().item():.1e} (of up to " \
           f"{exact.abs().max().item():.1f}) on a test sequence"


@torch.no_grad()
def reference_logits(state, args, idx, gelu="none"):
    """Logits (1, T, vocab) of nanoGPT's GPT computed from its state dict, with its exact GELU
    (gelu='none') or the tanh form (gelu='tanh', ours)."""
    F = torch.nn.functional
    C, nh, T = args["n_embd"], args["n_head"], idx.size(1)
    w = lambda name: None if state.get(name) is None else state[name].float()
    ln = lambda x, name: F.layer_norm(x, (C,), w(name + ".weight"), w(name + ".bias"), 1e-5)
    linear = lambda x, name: F.linear(x, w(name + ".weight"), w(name + ".bias"))
    x = w("transformer.wte.weight")[idx] + w("transformer.wpe.weight")[:T]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        q, k, v = (t.view(1, T, nh, C // nh).transpose(1, 2) for t in linear(ln(x, h + "ln_1"), h + "attn.c_attn")
                   .split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, T, C)
        x = x + linear(y, h + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, h + "ln_2"), h + "mlp.c_fc"), approximate=gelu), h + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), w("lm_head.weight"))


def resume_optimizer(ckpt, optimizers, master):
    """On resuming a nanoGPT run: its AdamW's state goes to ours where it fits (one AdamW, the same parameter
    groups: weight decay on the matrices, as nanoGPT's configure_optimizers splits them, in the same order and
    shapes), else the optimizer starts fresh; either way one line says so. nanoGPT saves no random states, so
    the run goes on from the checkpoint's iteration, but not bit for bit as it would have."""
    saved = ckpt.get("optimizer")
    fits = saved is not None and len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)
    if fits:
        ours = optimizers[0].state_dict()
        params = [p for group in optimizers[0].param_groups for p in group["params"]]
        fits = [len(g["params"]) for g in ours["param_groups"]] == [len(g["params"]) for g in saved["param_groups"]] \
            and all(tuple(saved["state"][i]["exp_avg"].shape) == tuple(p.shape) for i, p in enumerate(params)
                    if i in saved["state"])
    if fits:
        ours["state"] = saved["state"]  # (the groups keep our settings: fused, the learning rate of this run)
        optimizers[0].load_state_dict(ours)
    taken = "its AdamW state is taken over" if fits else \
        "its optimizer state does not fit this optimizer, which starts fresh"
    if master:
        print(f"resume: a nanoGPT checkpoint: {taken}; it saved no random states, so the batches and dropout go "
              "on from a new draw")
