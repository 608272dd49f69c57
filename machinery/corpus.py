"""
Corpora: many documents (a folder of .txt/.jsonl files, or a Hugging Face dataset), streamed, tokenized
with GPT-2 BPE on all cores, written as they come, and resumable after a kill. `python data.py --folder`
and `--hf` run prepare_corpus_cli.
"""

import hashlib
import json
import os
import time
import typing

import numpy as np

from machinery.cli import UsageError, first_line
from machinery import preparation
from machinery.faults import writing
from machinery.gpt2_bpe import GPT2_VOCAB_SIZE, gpt2_encoding
from machinery.preparation import (DATA_LEFTOVER, PROGRESS_FILE, TRAIN_FRACTION, check_uint16, cut_at_words,
                                   encode_text, read_text_chunks, write_json)
from machinery.faults import remove_leftovers
from machinery.workers import in_order, usable_cores

VAL_EVERY = round(1 / (1 - TRAIN_FRACTION))  # every 10th document goes to val.bin, the others to train.bin
RECORD_SECONDS = 10  # how often that record is brought up to date (a restart redoes at most this much)


class TextPiece(typing.NamedTuple):
    """Text of one document, or the next part of a long one (starts_document=False)."""
    starts_document: bool
    text: str

    def pieces(self):
        return [self]


class JsonLines(typing.NamedTuple):
    """Whole lines of a .jsonl file, undecoded: the worker processes parse them, not the reader."""
    path: str
    first_line: int
    raw: bytes
    text_field: str

    def pieces(self):
        try:
            text = self.raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{self.path}: not UTF-8 text ({e.reason} in the lines from {self.first_line} on)")
        found = []
        for number, line in enumerate(text.split("\n"), self.first_line):
            if line.strip():
                where = f"{self.path}:{number}"
                found.append(TextPiece(True, document_text(parse_json_line(line, where), self.text_field, where)))
        return found


def parse_json_line(line, where):
    try:
        return json.loads(line)
    except ValueError as e:
        raise UsageError(f"{where}: not a JSON object ({e}); a .jsonl file holds one object per line")


def document_text(record, text_field, where):
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UsageError(f"{where}: no text in a field '{text_field}'; name the field that holds it "
                         "with --text_field")
    return text


def corpus_files(folder):
    """The .txt and .jsonl files under folder, sub-folders included, in a fixed (sorted) order."""
    if not os.path.isdir(folder):
        raise UsageError(f"folder '{folder}' not found; give a folder of .txt and .jsonl files")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.endswith((".txt", ".jsonl")))
    if not paths:
        raise UsageError(f"{folder} has no .txt or .jsonl files; put the documents there")
    return paths


def folder_items(paths, text_field):
    """The folder as a stream of work items. A .txt file is one document, read CHUNK_BYTES at a time
    and cut at whitespace; a .jsonl file goes in blocks of whole lines, each non-blank line a document."""
    for path in paths:
        if path.endswith(".txt"):
            for i, text in enumerate(cut_at_words(read_text_chunks(path))):
                yield TextPiece(i == 0, text)
        else:
            yield from jsonl_blocks(path, text_field)


def jsonl_blocks(path, text_field):
    """About CHUNK_BYTES of a .jsonl file at a time, cut after its last newline."""
    carry, line = b"", 1
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(preparation.CHUNK_BYTES), b""):
            head, newline, carry = (carry + block).rpartition(b"\n")  # no newline: a long line, read on
            if newline:
                yield JsonLines(path, line, head, text_field)
                line += head.count(b"\n") + 1
    if carry.strip():
        yield JsonLines(path, line, carry, text_field)


def hf_rows(name, config, split):
    """The rows of a Hugging Face dataset, streamed: shards are fetched as they are read."""
    try:
        import datasets
    except ImportError:
        raise UsageError("--hf needs Hugging Face's datasets package, which is optional: pip install datasets")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not open the Hugging Face dataset '{name}' ({first_line(e, 150)}); "
                         "check the name, --hf_config, --hf_split and the network")


def hf_items(rows, text_field, name):
    """Every row is one document."""
    for number, row in enumerate(rows, 1):
        yield TextPiece(True, document_text(row, text_field, f"{name} row {number}"))


def corpus_jobs(items, done):
    """Work for the encoding processes: (items reached, [item, ...]) with about CHUNK_BYTES of text
    each, after the `done` items already written."""
    job, size, count = [], 0, 0
    for count, item in enumerate(items, 1):
        if count <= done:
            continue  # written before the interruption
        job.append(item)
        size += len(item.text if isinstance(item, TextPiece) else item.raw)
        if size >= preparation.CHUNK_BYTES:
            yield count, job
            job, size = [], 0
    if job:
        yield count, job
    if count < done:
        raise UsageError(f"the input has {count:,} parts, fewer than the {done:,} already written: it changed "
                         f"since the preparation was interrupted; delete {PROGRESS_FILE} to start over")


def encode_job(job):
    """(items reached, ids, length of each piece's ids, whether each piece starts a document) of one
    job (run in a worker process)."""
    reached, items = job
    pieces = [piece for item in items for piece in item.pieces()]
    ids = [encode_text(piece.text) for piece in pieces]
    return (reached, np.concatenate([np.zeros(0, dtype=np.uint16), *ids]), np.array([len(i) for i in ids]),
            [piece.starts_document for piece in pieces])


def to_splits(ids, lengths, starts, document):
    """One job's ids as {"train": ids, "val": ids}, every document but the first of its split after
    an end-of-text token; `document` is the index of the last document started, before and after."""
    eot = np.array([gpt2_encoding().eot_token], dtype=np.uint16)
    parts = {"train": [np.zeros(0, dtype=np.uint16)], "val": [np.zeros(0, dtype=np.uint16)]}
    for piece, starts_document in zip(np.split(ids, np.cumsum(lengths)[:-1]), starts):
        document += starts_document
        split = "val" if document % VAL_EVERY == VAL_EVERY - 1 else "train"
        if starts_document and document != (VAL_EVERY - 1 if split == "val" else 0):
            parts[split].append(eot)
        parts[split].append(piece)
    return {split: np.concatenate(p) for split, p in parts.items()}, document


def resume_state(out_dir, source):
    """The progress record of an interrupted preparation of this same input, or a fresh one."""
    path = os.path.join(out_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        return fresh_state(source)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; delete it to start the preparation over")
    if state.get("input") != source and origin(state.get("input")) == origin(source):
        print(f"note: {origin(source)} changed since its preparation here stopped; starting it over")
        return fresh_state(source)
    if state.get("input") != source:
        raise UsageError(f"{out_dir} holds an unfinished preparation of another input ({state.get('input')}); "
                         f"run that command again to finish it, or delete {path} to start over")
    print(f"resuming: {state['documents']:,} documents, {state['train_tokens'] + state['val_tokens']:,} "
          "tokens already written")
    return state


def fresh_state(source):
    return {"input": source, "items": 0, "documents": 0, "train_tokens": 0, "val_tokens": 0}


def origin(source):
    """The folder or Hugging Face dataset a preparation reads, whatever its contents and options."""
    return (source.get("folder") or source.get("hf")) if isinstance(source, dict) else None


def open_at(path, size):
    """path opened for writing after its first `size` bytes, the part the progress record vouches for;
    anything after it was written after the last record and is dropped."""
    f = open(path, "r+b" if os.path.exists(path) else "w+b")
    if os.fstat(f.fileno()).st_size < size:
        f.close()
        raise UsageError(f"{path} is shorter than its progress record says; delete {PROGRESS_FILE} next to it "
                         "to start over")
    f.truncate(size)
    f.seek(size)
    return f


def prepare_corpus(items, out_dir, source, workers=None):
    """Tokenize a stream of work items (TextPiece, JsonLines) into out_dir/{train.bin, val.bin, meta.json}.

    Document d goes to val.bin when d % VAL_EVERY == VAL_EVERY - 1, the others to train.bin, and each
    file is its documents' ids joined by GPT-2's end-of-text token. Ids are appended as they come; a
    progress record says how much of them is safely on disk, so a preparation stopped at any point
    (even by kill -9) and run again with the same `source` ends with the same files."""
    from tqdm import tqdm
    check_uint16(GPT2_VOCAB_SIZE, "GPT-2's BPE")
    gpt2_encoding()  # built once here: the forked workers inherit it
    # both decide the items and the splits
    source = {**source, "chunk_bytes": preparation.CHUNK_BYTES, "val_every": VAL_EVERY}
    os.makedirs(out_dir, exist_ok=True)
    remove_leftovers(out_dir, DATA_LEFTOVER)
    state = resume_state(out_dir, source)
    progress_path, meta_path = os.path.join(out_dir, PROGRESS_FILE), os.path.join(out_dir, "meta.json")
    write_json(progress_path, state)  # the folder now says it is in the making
    if state["items"] == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # until the new bins are complete, the folder is not a usable dataset
    files = {split: open_at(os.path.join(out_dir, f"{split}.bin"), 2 * state[f"{split}_tokens"])
             for split in ("train", "val")}

    def record():
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())  # on disk before the record says so
        write_json(progress_path, state)

    document, last_record = state["documents"] - 1, time.monotonic()  # the last document started
    with tqdm(unit="tok", unit_scale=True, initial=state["train_tokens"] + state["val_tokens"],
              desc="tokenizing", disable=None) as bar:
        for reached, ids, lengths, starts in in_order(encode_job, corpus_jobs(items, state["items"]),
                                                      workers or usable_cores()):
            split_ids, document = to_splits(ids, lengths, starts, document)
            for split, out in split_ids.items():
                files[split].write(out.tobytes())
                state[f"{split}_tokens"] += len(out)
                bar.update(len(out))
            state["items"], state["documents"] = reached, document + 1
            if time.monotonic() - last_record >= RECORD_SECONDS:
                record()
                last_record = time.monotonic()
    record()
    if state["train_tokens"] and not state["val_tokens"]:
        move_last_document_to_val(files, state, record)
    for f in files.values():
        f.close()
    documents = state["documents"]
    if documents == 0:
        raise UsageError(f"{source.get('folder') or source.get('hf')} holds no documents")
    val_documents = documents // VAL_EVERY + (state.get("val_from_train") == "document")
    meta = {"source": source, "tokenizer": {"kind": "gpt2"}, "vocab_size": GPT2_VOCAB_SIZE,
            "train_tokens": state["train_tokens"], "val_tokens": state["val_tokens"],
            "train_documents": documents - val_documents, "val_documents": val_documents}
    write_json(meta_path, meta)
    os.remove(progress_path)
    print(f"prepared {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from "
          f"{documents:,} documents (GPT-2 BPE)")
    if state.get("val_from_train"):
        moved = "its last document" if state["val_from_train"] == "document" else "the last tenth of its one document"
        print(f"note: every {VAL_EVERY}th document goes to val.bin, and there are only {documents}: "
              f"{moved} went there instead")
    return meta


def move_last_document_to_val(files, state, record):
    """A corpus of fewer than VAL_EVERY documents has none for validation: the last one moves from the
    end of train.bin to val.bin (a corpus of one document gives the last tenth of its ids), so that
    train.py has a val split. Recorded before train.bin is cut, so a kill at any point resumes."""
    train_ids = np.memmap(files["train"].name, dtype=np.uint16, mode="r", shape=(state["train_tokens"],))
    eot = last_position(train_ids, gpt2_encoding().eot_token)  # where the last document begins, after it
    train_end, val_start = (eot, eot + 1) if eot is not None else (int(len(train_ids) * TRAIN_FRACTION),) * 2
    files["val"].write(train_ids[val_start:].tobytes())
    state["train_tokens"], state["val_tokens"] = train_end, len(train_ids) - val_start
    state["val_from_train"] = "document" if eot is not None else "tokens"
    del train_ids
    record()
    files["train"].truncate(2 * train_end)


def last_position(ids, value):
    """The index of the last `value` in ids, or None; read from the end, CHUNK_BYTES at a time."""
    step = preparation.CHUNK_BYTES // 2
    for end in range(len(ids), 0, -step):
        found = np.flatnonzero(ids[max(0, end - step):end] == value)
        if len(found):
            return max(0, end - step) + int(found[-1])
    return None


def folder_source(folder, paths, text_field):
    """What identifies a folder's contents for resuming: its files' names, sizes and times."""
    listing = [[os.path.relpath(p, folder), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]
    digest = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    return {"folder": os.path.abspath(folder), "files_sha256": digest, "text_field": text_field}


def prepare_folder(folder, out_dir, text_field="text", workers=None):
    paths = corpus_files(folder)
    return prepare_corpus(folder_items(paths, text_field), out_dir, folder_source(folder, paths, text_field),
                          workers)


def prepare_hf(name, out_dir, config=None, split="train", text_field="text", workers=None):
    source = {"hf": name, "config": config, "split": split, "text_field": text_field}
    return prepare_corpus(hf_items(hf_rows(name, config, split), text_field, name), out_dir, source, workers)


def prepare_corpus_cli(args, out_dir):
    """python data.py --folder DIR or --hf NAME (args: data.py's parsed flags)."""
    if sum(map(bool, (args.input, args.folder, args.hf))) > 1:
        raise UsageError("give one of --input, --folder and --hf")
    if args.tokenizer == "char":
        raise UsageError("--folder and --hf corpora are GPT-2 BPE (documents end at its end-of-text token); "
                         "drop --tokenizer char")
    with writing(out_dir, kept="what is written so far is kept, and the same command continues it"):
        if args.folder:
            prepare_folder(args.folder, out_dir, args.text_field)
        else:
            prepare_hf(args.hf, out_dir, args.hf_config, args.hf_split, args.text_field)
