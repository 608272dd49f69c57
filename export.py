"""
Export a GlassGPT checkpoint (or a nanoGPT ckpt.pt) as a Hugging Face GPT-2 model directory.

    python export.py --ckpt out-shakespeare/best_model.pt --out hf_model/
    python export.py --ckpt ../nanoGPT/out-shakespeare-char/ckpt.pt --out hf_model/
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf_model')"

Our module names are GPT-2's, so the weights copy key by key (machinery/hf.py: ours_to_hf transposes the
four Conv1D matrices; a bias=False model gets zero biases: to_hf). A BPE model gets GPT-2's tokenizer
files beside the weights; a char model gets a tokenizer of its own characters (char_tokenizer), so
AutoTokenizer and pipeline("text-generation") load either kind. The directory is written in a temporary folder and renamed into place, so a failed
or interrupted export never leaves half a model, and an existing non-empty --out is only replaced
with --force.
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import os
import re
import shutil

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from generate import model_from_checkpoint
from machinery.checkpoint import in_run_folder
from machinery.checks import pathname, shown, writable_folder
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.faults import remove_leftovers, writing
from machinery.gpt2_bpe import gpt2_hf_tokenizer
from machinery.hf import ours_to_hf
from machinery.quantization import is_quantized


def hf_config(model_args, tokenizer):
    """The GPT2Config that describes our model: GPT-2's layout with our sizes."""
    dropout = model_args.get("dropout", 0.0)
    # <|endoftext|> (50256) only exists in the BPE vocabulary; a char model has no special tokens
    special = 50256 if tokenizer["kind"] == "gpt2" and model_args["vocab_size"] > 50256 else None
    return GPT2Config(vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
                      n_embd=model_args["n_embd"], n_layer=model_args["n_layer"], n_head=model_args["n_head"],
                      activation_function="gelu_new",  # the tanh GELU, as in our MLP
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      layer_norm_epsilon=1e-5, bos_token_id=special, eos_token_id=special)


def to_hf(model_args, state, tokenizer):
    """Our state dict -> a GPT2LMHeadModel holding the same weights (eval mode). A bias=False model
    (nanoGPT's default) gets all-zero biases, which Hugging Face's layers always have: adding zero
    changes nothing, so the logits stay the same (check_same_logits checks it)."""
    hf = GPT2LMHeadModel(hf_config(model_args, tokenizer))
    weights = ours_to_hf(state)
    for key, value in hf.state_dict().items():
        if key.endswith(".bias") and key not in weights and not model_args["bias"]:
            weights[key] = torch.zeros_like(value)
    hf.load_state_dict(weights)
    return hf.eval()


def check_same_logits(ours, hf):
    """Run both models on one random sequence: the export is refused unless they agree."""
    idx = torch.randint(0, ours.config.vocab_size, (1, min(ours.config.block_size, 64)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(idx, idx)  # (1, T, V)
        b = hf(idx).logits  # (1, T, V)
    diff = (a - b).abs().max().item()
    # float32 rounding grows with the logits' size (large for real GPT-2s); a wrong copy is off by O(1)
    if diff > 1e-4 * max(1.0, a.abs().max().item()):
        raise UsageError(f"the exported model's logits differ from the checkpoint's by {diff:.2e}; "
                         "this is a bug in export.py, please report it")
    return diff


def check_out_dir(out, force, ckpt_path):
    """out may be written: not a file, new or empty (or replaced with --force, which says what it removes
    before it removes anything), and never a folder that holds the checkpoint being exported or the
    folder this command runs in, whatever --force says: nothing the export reads is ever deleted."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out '{out}' is a file; give a directory path")
    writable_folder(os.path.dirname(os.path.abspath(out)), "--out's folder")
    if os.path.abspath(out) != shown(os.path.abspath(out)):
        raise UsageError(f"--out '{out}' is not a UTF-8 path, and the Hugging Face libraries write only "
                         "those; choose another --out")
    holds = lambda folder, path: os.path.commonpath([os.path.realpath(folder), os.path.realpath(path)]) == \
        os.path.realpath(folder)
    for inside, what in ((ckpt_path, "the checkpoint being exported"), (os.getcwd(), "the current folder")):
        if holds(out, inside):
            raise UsageError(f"--out '{out}' holds {what} ({inside}), which an export into it would replace; "
                             "choose a new directory for --out")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise UsageError(f"--out '{out}' exists and is not empty; choose a new directory or add --force "
                             "to replace it")
        if not os.path.isfile(os.path.join(out, "config.json")):  # --force replaces an earlier export only
            raise UsageError(f"--out '{out}' holds files but no earlier export (no config.json), so --force "
                             "will not replace it; choose a new directory for --out")
        names = sorted(os.listdir(out))
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"--force: {out} will be replaced; its {len(names)} entries ({listed}) are deleted once the "
              "export is written")


def write_tokenizer(folder, tokenizer, block_size):
    if tokenizer["kind"] == "gpt2":
        hf_tokenizer = gpt2_hf_tokenizer()
        hf_tokenizer.model_max_length = block_size
        hf_tokenizer.save_pretrained(folder)
    else:
        char_tokenizer(tokenizer["chars"], block_size).save_pretrained(folder)


def char_tokenizer(chars, block_size):
    """Our char tokenizer as a Hugging Face fast tokenizer: every character is a piece of its own (a Split
    on any one character), looked up in a WordLevel vocabulary of our ids, and decoding joins the pieces
    as they are (Fuse, no clean-up of spaces), so encode and decode equal data.py: CharTokenizer's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False)


def replace_dir(tmp, out):
    """Move the finished tmp folder to out. An old out is moved aside first, put back if the move
    fails, and deleted only once the new one is in place."""
    old = f"{tmp}.old" if os.path.isdir(out) else None
    if old:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:  # (Ctrl-C included)
        if old:
            os.replace(old, out)
        raise
    if old:
        shutil.rmtree(old)


def export(ckpt_path, out, force=False):
    """Write the checkpoint's model (and tokenizer) to out as a Hugging Face directory."""
    out = os.path.normpath(out)
    ckpt_path = in_run_folder(ckpt_path)
    if is_quantized(ckpt_path):  # Hugging Face's GPT-2 layers hold float weights only
        raise UsageError(f"'{ckpt_path}' is quantized (quantize.py); export the float checkpoint it came from")
    check_out_dir(out, force, ckpt_path)
    model, _, meta = model_from_checkpoint(ckpt_path)
    model_args, tokenizer, state = meta["model_args"], meta["tokenizer"], model.state_dict()
    hf = to_hf(model_args, state, tokenizer)
    diff = check_same_logits(model.eval(), hf)
    parent = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    if os.path.isdir(parent):  # an export killed mid-write (kill -9) left its temp folder; not its .old copy
        remove_leftovers(parent, re.compile(rf"\.{re.escape(os.path.basename(out))}\.tmp(\d+)"))
    try:
        with writing(out, kept="nothing was changed there"):
            os.makedirs(parent, exist_ok=True)
            hf.save_pretrained(tmp)
            write_tokenizer(tmp, tokenizer, model_args["block_size"])
            replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure or Ctrl-C: no half-written folder
    sizes = ", ".join(f"{k}={model_args[k]}" for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"))
    print(f"wrote {out} ({sizes}); its logits match the checkpoint's to {diff:.1e}")
    return out


def main(argv=None):
    p = ArgumentParser(description="Export a GlassGPT (or nanoGPT) checkpoint as a Hugging Face GPT-2 directory.")
    p.add_argument("--ckpt", required=True, type=pathname,
                   help="a checkpoint written by train.py (best_model.pt or ckpt.pt) or by nanoGPT's train.py "
                        "(ckpt.pt), or a run folder (its best_model.pt, else its ckpt.pt)")
    p.add_argument("--out", required=True, type=pathname, help="the directory to write (must be new or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace --out when it holds an earlier export (never the checkpoint's own folder)")
    args = p.parse_args(argv)
    export(args.ckpt, args.out, args.force)


if __name__ == "__main__":
    run_cli(main)
