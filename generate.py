"""
Sample text from a trained checkpoint; tokens are printed as they are made.

    python generate.py --ckpt out-shakespeare-char/best_model.pt --start "ROMEO:" --num_samples 2
    python generate.py --ckpt best_model.pt          # the newest best_model.pt under this folder
    python generate.py --ckpt out-shakespeare-char --interactive   # a run folder; a prompt a line
    python generate.py --ckpt ../nanoGPT/out-shakespeare-char      # a nanoGPT run (its ckpt.pt)
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import sys

import torch

from data import tokenizer_from
from machinery import interactive
from machinery.checkpoint import find_checkpoint
from machinery.checks import SEED_RANGE, integer, pathname, real, temperature
from machinery.cli import ArgumentParser, UsageError, first_line, run_cli
from machinery.devices import device_type, pick_device, pick_dtype
from machinery.interactive import read_prompt
from machinery.nanogpt import SAMPLE_FLAGS
from machinery.quantization import load_weights, quantized_into
from model import GPT, GPTConfig


def model_from_checkpoint(path, map_location="cpu"):
    """(model, tokenizer, meta): the GPT and tokenizer a checkpoint describes, its weights loaded
    (the one way every script builds a model from a checkpoint). A file quantize.py wrote gives its
    quantized model: int8 or int4 weights, dequantized on use (docs chapter 11)."""
    tensors, meta, quantized = load_weights(path, map_location)
    if meta.get("tokenizer", {}).get("kind") not in ("char", "gpt2"):
        raise UsageError(f"'{path}' names no known tokenizer ({meta.get('tokenizer')!r}); "
                         "use a checkpoint written by train.py")
    try:
        model = GPT(GPTConfig(**meta["model_args"]))
        if quantized:
            quantized_into(model, tensors["model"], meta)
        else:
            model.load_state_dict(tensors["model"])
        tokenizer = tokenizer_from(meta["tokenizer"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"'{path}' does not hold a complete GlassGPT model "
                         f"({first_line(e, 100)}); use a checkpoint written by train.py")
    return model, tokenizer, meta


def load_model(ckpt_path, device, dtype="float32"):
    """The model and tokenizer a checkpoint describes, ready for inference on device in dtype
    ('auto': train.py's fast path). Sampling needs no float32 master weights: the model runs in that
    dtype itself, with no casts per step, and the weights are converted once, on their way to the
    device (they are loaded on the CPU)."""
    model, tokenizer, _ = model_from_checkpoint(ckpt_path)
    dtype = getattr(torch, pick_dtype(dtype, device_type(device), model.config.n_embd))
    return model.eval().to(device=device, dtype=dtype), tokenizer


def parse_args(argv=None):
    p = ArgumentParser(description="Sample text from a GlassGPT or nanoGPT checkpoint.",
                       renamed=SAMPLE_FLAGS)  # nanoGPT's sample.py flags, said in ours
    p.add_argument("--ckpt", type=pathname, default="best_model.pt",
                   help="a checkpoint file, or a run folder (its best_model.pt); a bare file name "
                        "is looked up in the run folders below (default: the newest best_model.pt)")
    p.add_argument("--start", default="\n",
                   help="the prompt, FILE:path to read it from a file, or TEXT:text for a text "
                        "that itself begins with FILE: (default: a newline)")
    p.add_argument("--interactive", action="store_true",
                   help="keep the model loaded and read prompts line by line (a terminal or a "
                        "pipe); /help there")
    # each value is checked as it is read: a whole number or a finite number in its range
    p.add_argument("--num_samples", type=integer(1), default=1, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=integer(1), default=500,
                   help="tokens sampled after the prompt")
    p.add_argument("--temperature", type=temperature, default=0.8,
                   help="0 = greedy; <1 sharper, >1 more random")
    p.add_argument("--top_k", type=integer(1), default=200,
                   help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=real(0, 1, low_open=True), default=None,
                   help="nucleus sampling: smallest set with probability >= p, in (0, 1]")
    p.add_argument("--stop", default=None, help="stop a sample when this text appears")
    p.add_argument("--no_kv_cache", action="store_true",
                   help="recompute the whole window every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step (fused kernels; seconds to compile)")
    p.add_argument("--seed", type=integer(*SEED_RANGE), default=1337,
                   help="the same seed gives the same text")
    p.add_argument("--device", default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 or float16 on a GPU, float32 on most CPUs")
    return p.parse_args(argv)


def main():
    args = parse_args()
    device = pick_device(args.device)
    model, tokenizer = load_model(find_checkpoint(args.ckpt), device, args.dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # same seed -> same text
    if args.interactive:
        sample = lambda prompt, flags: print_samples(model, tokenizer, prompt, flags, generator)
        interactive.run(sample, args, parse_args)
    else:
        print_samples(model, tokenizer, read_prompt(args.start), args, generator)


def print_samples(model, tokenizer, prompt, s, generator):
    """s.num_samples samples after prompt, each printed token by token as it is made."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt is empty; give --start some text")
    x = torch.tensor([ids], dtype=torch.long, device=generator.device)  # (1, T)
    for _ in range(s.num_samples):
        sys.stdout.write(prompt)
        text_ids, printed = [], ""
        tokens = model.generate_stream(x, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                       not s.no_kv_cache, generator, s.compile)
        for token in tokens:
            text_ids.append(token.item())
            text = tokenizer.decode(text_ids)
            if s.stop and s.stop in text:
                text = text[:text.index(s.stop) + len(s.stop)]
            if text.startswith(printed) and not text.endswith("\ufffd"):  # whole characters only
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
            if s.stop and s.stop in text:
                break
        sys.stdout.write(text[len(printed):] + "\n---------------\n")
        sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
