"""
Quantize a trained model's weights to int8 or int4 and write a quantized checkpoint (docs chapter 11): a
safetensors file holding the integers, their scales and the float rest, with JSON metadata saying how.

    python quantize.py --ckpt out-shakespeare-char-cpu                        # int8, one scale per row
    python quantize.py --ckpt out-shakespeare-char-cpu --scheme int4 --group_size 32
    python generate.py --ckpt out-shakespeare-char-cpu/best_model-int4-g32.safetensors

It prints the bytes of the float32 weights and of the file, and the val loss of both over the whole val split.
The quantizer itself, a few plain lines, is machinery/quantization.py: quantize, dequantize, QuantizedLinear.
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import os

import torch

from data import load_split, windows_at
from generate import model_from_checkpoint
from machinery.checkpoint import find_checkpoint
from machinery.checks import integer, pathname
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.evaluation import mean_loss, whole_split_starts
from machinery.quantization import (SCHEMES, is_quantized, load_quantized, quantize_model, save_quantized,
                                    state_to_save)


def load_quantized_model(path, device="cpu"):
    """(model in eval mode on device, meta) of a quantized checkpoint; meta['quantization'] says how. The
    model's forward is GPT's (model.py: GPT.forward): the lens and generate.py use it as they use any GPT."""
    if not is_quantized(path):
        raise UsageError(f"'{path}' is not a quantized checkpoint; write one with python quantize.py --ckpt {path}")
    model, _, meta = model_from_checkpoint(path)
    return model.eval().to(device), meta


def weight_bytes(model):
    """Bytes of a model's tensors as stored (each tied tensor once)."""
    return sum(t.numel() * t.element_size() for t in state_to_save(model).values())


def val_loss(model, val_data, block_size, batch_size=64):
    """The mean loss over every non-overlapping block_size window of val_data, as train.py scores the whole split
    (machinery/evaluation.py), on the CPU."""
    with torch.inference_mode():
        starts = whole_split_starts(len(val_data), block_size, batch_size)
        return mean_loss(model.eval(), (windows_at(val_data, ix, block_size, "cpu") for ix in starts), "cpu")


def val_split(meta, data_dir):
    """The val token ids of the dataset a checkpoint was trained on, or None (said in one line) without them."""
    path = os.path.join(data_dir, str(meta.get("dataset")), "val.bin")
    if not os.path.isfile(path):
        print(f"val loss: not measured, {path} is missing (prepare the dataset, or give --data_dir)")
        return None
    return load_split(data_dir, meta["dataset"], "val")


def out_path(ckpt, scheme, group_size, keep_head):
    stem = os.path.splitext(ckpt)[0]
    return f"{stem}-{scheme}{f'-g{group_size}' if group_size else ''}{'-head' if keep_head else ''}.safetensors"


def quantize_checkpoint(ckpt, scheme="int8", group_size=None, keep_head=False, out=None, force=False,
                        data_dir="data"):
    """Quantize the model of a checkpoint (or run folder) and write it; return (out, report dict)."""
    ckpt = find_checkpoint(ckpt)
    if is_quantized(ckpt):
        raise UsageError(f"'{ckpt}' is already quantized; quantize the float checkpoint it came from "
                         f"({load_quantized(ckpt)[1].get('source')})")
    if scheme not in SCHEMES:  # (quantize_model checks it too; here before anything is loaded)
        raise UsageError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    out = out or out_path(ckpt, scheme, group_size, keep_head)
    if os.path.exists(out) and not force:
        raise UsageError(f"{out} exists; give --force to replace it, or --out another path")
    if os.path.abspath(out) == os.path.abspath(ckpt):
        raise UsageError(f"--out is the checkpoint being quantized ({ckpt}); give another path")
    model, _, meta = model_from_checkpoint(ckpt)
    report = {"float32_bytes": weight_bytes(model), "checkpoint_bytes": os.path.getsize(ckpt)}
    val = val_split(meta, data_dir)
    if val is not None:
        report["float_val_loss"] = val_loss(model, val, meta["model_args"]["block_size"])
    model, info = quantize_model(model, scheme, group_size, keep_head)
    keep = ("model_args", "tokenizer", "dataset", "iter_num", "best_val_loss")
    saved = {**{k: meta[k] for k in keep if k in meta}, "quantization": info, "source": ckpt}
    save_quantized(out, model, saved)
    report["bytes"] = os.path.getsize(out)
    if val is not None:
        report["val_loss"] = val_loss(model, val, meta["model_args"]["block_size"])
    return out, report


def main(argv=None):
    p = ArgumentParser(description="Quantize a checkpoint's weights to int8 or int4 (docs chapter 11).")
    p.add_argument("--ckpt", required=True, type=pathname,
                   help="a checkpoint written by train.py, or a run folder (its best_model.pt)")
    p.add_argument("--scheme", default="int8", help=f"bits per weight: {', '.join(SCHEMES)}")
    p.add_argument("--group_size", type=integer(1), default=None,
                   help="columns that share one scale (must divide each layer's width); default: a whole row")
    p.add_argument("--keep_head", action="store_true",
                   help="keep the output layer (the token embedding too: they are tied) in float")
    p.add_argument("--out", type=pathname, default=None,
                   help="the file to write (default: beside the checkpoint, named for the scheme)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--data_dir", type=pathname, default="data", help="where the dataset's val.bin is")
    args = p.parse_args(argv)
    out, r = quantize_checkpoint(args.ckpt, args.scheme, args.group_size, args.keep_head, args.out, args.force,
                                 args.data_dir)
    print(f"wrote {out}: {r['bytes']:,} bytes, against {r['float32_bytes']:,} bytes of float32 weights "
          f"({r['float32_bytes'] / r['bytes']:.2f}x smaller; the checkpoint file, with its optimizer state, "
          f"is {r['checkpoint_bytes']:,} bytes)")
    if "val_loss" in r:
        print(f"val loss over the whole val split: {r['float_val_loss']:.4f} float32, {r['val_loss']:.4f} "
              f"{args.scheme} ({r['val_loss'] - r['float_val_loss']:+.4f})")
    print(f"sample from it: python generate.py --ckpt {out}")


if __name__ == "__main__":
    run_cli(main)
