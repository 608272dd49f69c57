"""
Sample text from a trained checkpoint; tokens are printed as they are made.

    python generate.py --ckpt out-shakespeare-char/best_model.pt --start "ROMEO:" --num_samples 2
    python generate.py --ckpt best_model.pt          # the newest best_model.pt under this folder
    python generate.py --ckpt out-shakespeare-char --interactive   # a run folder; prompts line by line
"""

import glob
import os
import sys
import torch

from machinery import interactive
from machinery.checkpoint import in_run_folder, model_from_checkpoint
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.devices import device_type, pick_device, pick_dtype


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


def load_model(ckpt_path, device, dtype="float32"):
    """The model and tokenizer a checkpoint describes, ready for inference on device in dtype ('auto':
    train.py's fast path). Sampling needs no float32 master weights: the model runs in that dtype itself,
    with no casts per step, and the weights are converted once, on their way to the device."""
    model, tokenizer, _ = model_from_checkpoint(ckpt_path)  # on the CPU: only the weights go to the device
    ptdtype = getattr(torch, pick_dtype(dtype, device_type(device), model.config.n_embd))
    return model.eval().to(device=device, dtype=ptdtype), tokenizer


def read_prompt(start):
    """--start text, or FILE:path for a prompt kept in a file."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the prompt file '{path}' ({e}); give a UTF-8 text file")


def parse_args(argv=None):
    p = ArgumentParser(description="Sample text from a GlassGPT checkpoint.")
    p.add_argument("--ckpt", default="best_model.pt",
                   help="a checkpoint file, or a run folder (its best_model.pt); a bare file name is looked up in "
                        "the run folders below (default: the newest best_model.pt)")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file (default: a newline)")
    p.add_argument("--interactive", action="store_true",
                   help="keep the model loaded and read prompts line by line (a terminal or a pipe); /help there")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens sampled after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--stop", default=None, help="stop a sample when this text appears")
    p.add_argument("--no_kv_cache", action="store_true", help="recompute the whole window every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step (fused kernels; costs seconds to compile)")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 or float16 on a GPU, float32 on most CPUs")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {args.top_k}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    return args


def main():
    args = parse_args()
    device = pick_device(args.device)
    model, tokenizer = load_model(find_checkpoint(args.ckpt), device, args.dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # same seed -> same text
    if args.interactive:
        interactive.run(lambda prompt, s: print_samples(model, tokenizer, prompt, s, generator), args, parse_args)
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
        for token in model.generate_stream(x, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                           kv_cache=not s.no_kv_cache, generator=generator, compile=s.compile):
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
