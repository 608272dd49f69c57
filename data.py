"""
Data, as chapter 2 tells it: a tokenizer turns text into ids, the ids of one text become a train
and a val split on disk, and training draws batches of windows from them.

Prepare any UTF-8 text:   python data.py --input my.txt --name mydata --tokenizer char|gpt2
Prepare a known dataset:  python data.py --name shakespeare_char   (or shakespeare)
Prepare a corpus:         python data.py --folder my_texts/ --name mycorpus   (.txt, .jsonl files)
                          python data.py --hf Skylion007/openwebtext --name openwebtext  (streamed)

A prepared dataset is data/<name>/{train.bin, val.bin, meta.json}: token ids as uint16, the first
90% of the ids for training and the last 10% for validation, and JSON describing the source and the
tokenizer (so nothing is ever unpickled). How a file of any size is streamed through this, and how a
corpus of documents is prepared (split by document, resumable), is in machinery/preparation.py and
machinery/corpus.py.
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import os

import numpy as np

from machinery.checks import folder_name, pathname, writable_folder
from machinery.cli import ArgumentParser, UsageError, run_cli
from machinery.gpt2_bpe import GPT2_VOCAB_SIZE, gpt2_encoding
from machinery.preparation import (char_id_stream, check_text, gpt2_id_stream, needs_preparing,
                                   read_meta, text_chars, write_json, write_splits)
from machinery.sources import KNOWN_DATASETS, find_known_source

# ---------------------------------------------------------------------------------------------
# Tokenizers


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters in the corpus."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:10])
            raise UsageError(f"the text has characters outside this model's vocabulary: {shown!r}; "
                             "use only characters from the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def describe(self):
        return {"kind": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken: any text encodes, 50257 ids."""

    vocab_size = GPT2_VOCAB_SIZE

    def encode(self, text):
        return gpt2_encoding().encode_ordinary(text)

    def decode(self, ids):
        return gpt2_encoding().decode(ids)

    def describe(self):
        return {"kind": "gpt2"}


def tokenizer_from(description):
    """Rebuild a tokenizer from the JSON description kept in meta.json and checkpoints."""
    if description.get("kind") == "char":
        return CharTokenizer(description["chars"])
    if description.get("kind") == "gpt2":
        return GPT2Tokenizer()
    raise UsageError(f"unknown tokenizer description {description!r}; expected kind 'char' or "
                     "'gpt2'")


# ---------------------------------------------------------------------------------------------
# One text -> train.bin, val.bin, meta.json


def prepare(input_path, out_dir, tokenizer_kind, source=None):
    """Tokenize input_path into out_dir/{train.bin, val.bin, meta.json}; returns the meta dict."""
    text_sha, byte_counts, size = check_text(input_path, out_dir)
    if tokenizer_kind == "gpt2":
        tokenizer = GPT2Tokenizer()
        ids = gpt2_id_stream(input_path, size)
    else:
        tokenizer = CharTokenizer(text_chars(input_path, byte_counts))
        ids = char_id_stream(input_path, tokenizer.stoi)
    n_train, n_val = write_splits(out_dir, ids, size)  # the first 90% of the ids, then the rest
    meta = {"source": source or os.path.abspath(input_path), "text_sha256": text_sha,
            "text_bytes": size, "tokenizer": tokenizer.describe(),
            "vocab_size": tokenizer.vocab_size, "train_tokens": n_train, "val_tokens": n_val}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    print(f"prepared {out_dir}: {n_train:,} train and {n_val:,} val tokens, "
          f"vocab {tokenizer.vocab_size:,} ({tokenizer_kind})")
    return meta


def load_meta(data_dir, name):
    """meta.json of data/<name>, preparing a known dataset first if its files are missing."""
    if needs_preparing(data_dir, name):
        path, source = find_known_source(name, data_dir)
        prepare(path, os.path.join(data_dir, name), KNOWN_DATASETS[name], source)
    return read_meta(data_dir, name)


# ---------------------------------------------------------------------------------------------
# Batches


def load_split(data_dir, name, split):
    """The token ids of one split as a read-only memory map (the file is never loaded whole)."""
    path = os.path.join(data_dir, name, f"{split}.bin")
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint16)  # a memory map cannot be empty; train.py says so
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random windows: x (B, T) and y (B, T), where y is x shifted one token left,
    so y[b, t] is the token that follows x[b, :t+1]."""
    import torch  # here, not at the top: preparing data (python data.py) never needs PyTorch
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return windows_at(data, ix, block_size, device)


def windows_at(data, ix, block_size, device):
    """The windows that start at positions ix (B,): x (B, T) and y (B, T) on device."""
    import torch
    offsets = np.arange(block_size + 1)
    rows = data[ix.numpy()[:, None] + offsets]  # (B, T + 1): one gather
    rows = torch.from_numpy(rows.astype(np.int64))
    if device.startswith("cuda"):
        # page-locked memory lets the copy to the GPU run while the CPU carries on
        rows = rows.pin_memory().to(device, non_blocking=True)
    else:
        rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:].contiguous()  # y is x shifted one token left


class TrainBatches:
    """Training micro-batches (x, y), endlessly. Each optimizer step draws the start positions of
    its whole global batch (every process, every micro-batch) from the run's own generator, and this
    process takes its accum_steps micro-batches of it: so the global batch does not depend on how
    many processes share it, and the generator's state before a step's draw (`state`, which
    checkpoints save) redraws that step on resume."""

    def __init__(self, data, batch_size, block_size, device, seed, accum_steps, rank=0,
                 world_size=1):
        import torch
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.device = device
        self.accum_steps, self.rank, self.world_size = accum_steps, rank, world_size
        self.rng = torch.Generator().manual_seed(seed)
        self.micro_batches = self.draw()

    def draw(self):
        import torch
        while True:
            self.state = self.rng.get_state()
            n = self.world_size * self.accum_steps * self.batch_size  # the global batch
            ix = torch.randint(len(self.data) - self.block_size, (n,), generator=self.rng)
            for micro_step in range(self.accum_steps):
                first = (self.rank * self.accum_steps + micro_step) * self.batch_size
                starts = ix[first:first + self.batch_size]
                yield windows_at(self.data, starts, self.block_size, self.device)

    def __next__(self):
        return next(self.micro_batches)


class TokenWindows:
    """The PyTorch way: every (x, y) window of a split as a map-style dataset (__len__ and
    __getitem__, all that a DataLoader asks of one), for a DataLoader."""

    def __init__(self, data, block_size):
        self.data, self.block_size = data, block_size

    def __len__(self):
        return len(self.data) - self.block_size

    def __getitem__(self, i):
        import torch
        chunk = torch.from_numpy(self.data[i:i + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def create_dataloader(dataset, batch_size, shuffle):
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=True)


def main():
    p = ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--input", type=pathname, help="a UTF-8 text file (omit for the known datasets)")
    p.add_argument("--name", required=True, help="dataset name: data/<name>/ is written")
    p.add_argument("--tokenizer", choices=["char", "gpt2"],
                   help="default: char, or the known dataset's")
    p.add_argument("--data_dir", type=pathname, default="data", help="where datasets live")
    p.add_argument("--folder", type=pathname,
                   help="a folder of .txt files (one document each) and .jsonl files (one a line)")
    p.add_argument("--hf", help="a Hugging Face dataset name, streamed (pip install datasets)")
    p.add_argument("--hf_config",
                   help="with --hf: the dataset's configuration (subset), if it has several")
    p.add_argument("--hf_split", default="train", help="with --hf: the split to read")
    p.add_argument("--text_field", default="text",
                   help="the field of a .jsonl line or a row that holds the text")
    args = p.parse_args()
    out_dir = os.path.join(writable_folder(args.data_dir, "--data_dir"), folder_name(args.name))
    if args.folder or args.hf:
        from machinery.corpus import prepare_corpus_cli
        prepare_corpus_cli(args, out_dir)
    elif args.input:
        prepare(args.input, out_dir, args.tokenizer or "char")
    elif args.name in KNOWN_DATASETS:
        path, source = find_known_source(args.name, args.data_dir)
        prepare(path, out_dir, args.tokenizer or KNOWN_DATASETS[args.name], source)
    else:
        raise UsageError(f"'{args.name}' is not a known dataset ({', '.join(KNOWN_DATASETS)}); "
                         "give your text with --input")


# what to do after Ctrl-C or SIGTERM (run_cli says it on its one line)
INTERRUPTED_HINT = ("run the same command again: a --folder or --hf corpus continues where it "
                    "stopped, an --input text starts over")

if __name__ == "__main__":
    run_cli(main, INTERRUPTED_HINT)
