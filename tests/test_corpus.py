"""Corpora of many documents (corpus.py: prepare_corpus): a folder of .txt/.jsonl files or a streamed
Hugging Face dataset becomes train.bin/val.bin, each split its documents' GPT-2 ids joined by
end-of-text; a preparation killed with -9 resumes to the same files; and the GPT-2 recipes run."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from machinery import corpus
import data
from machinery.cli import UsageError, run_cli
from machinery.configurator import load_config
from conftest import CORPUS, ROOT, VERSES, run_script
from machinery.corpus import prepare_folder
from data import load_split
from machinery import gpt2_bpe, preparation
from machinery.gpt2_bpe import gpt2_encoding
from machinery.preparation import PROGRESS_FILE

# Documents that are awkward for a tokenizer: many scripts, whitespace runs, the end-of-text marker
# as plain text (it must be encoded as text, not as the special token) and a JSON-escaped lone surrogate.
ODD = ["Héllo wörld! 你好，世界。 Привет, мир. 🙂 naïve café —  tabs\tand\nnewlines   end  ",
       "a literal <|endoftext|> inside a document", "", "   leading spaces", "trailing spaces   \n\n",
       "lone surrogate \ud800 here"]


def write_folder(root):
    """A corpus folder of .txt and .jsonl files; returns its documents in the order data.py reads them."""
    root.mkdir()
    (root / "sub").mkdir()
    big = ODD[0] * 60  # many CHUNK_BYTES-sized pieces once CHUNK_BYTES is small
    lines = [{"text": text, "id": i} for i, text in enumerate(ODD + VERSES * 3 + [ODD[0] * 30])]  # one long line
    (root / "a.txt").write_text(big, encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    (root / "notes.md").write_text("not a corpus file", encoding="utf-8")
    (root / "sub" / "c.txt").write_text(CORPUS, encoding="utf-8")
    (root / "z.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in VERSES), encoding="utf-8")
    return [big] + [line["text"] for line in lines] + [CORPUS] + VERSES


def expected_split(documents, split):
    """GPT-2 ids of the split's documents (every 10th document is val), joined by end-of-text."""
    encoding = gpt2_encoding()
    chosen = [doc for d, doc in enumerate(documents) if (d % 10 == 9) == (split == "val")]
    ids = []
    for i, doc in enumerate(chosen):
        ids += ([encoding.eot_token] if i else []) + encoding.encode_ordinary(doc)
    return ids


def bins(data_dir, name):
    return {split: load_split(str(data_dir), name, split).tolist() for split in ("train", "val")}


def test_gpt2_ranks_equal_tiktokens_own_loader():
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    vocab_bpe, encoder_json = gpt2_bpe.gpt2_files()
    assert gpt2_bpe.gpt2_ranks(encoder_json) == data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    return root, write_folder(root)


def test_folder_gives_each_document_encoded_and_joined_with_end_of_text(tmp_path, folder, monkeypatch):
    root, documents = folder
    monkeypatch.setattr(preparation, "CHUNK_BYTES", 997)  # big documents in many pieces, many jobs
    meta = prepare_folder(str(root), str(tmp_path / "data" / "c"), workers=2)
    got = bins(tmp_path / "data", "c")
    assert got["train"] == expected_split(documents, "train")
    assert got["val"] == expected_split(documents, "val") and len(got["val"]) > 10
    assert got["train"].count(gpt2_encoding().eot_token) == meta["train_documents"] - 1
    assert (meta["train_documents"], meta["val_documents"]) == (len(documents) - len(documents) // 10,
                                                                len(documents) // 10)
    assert data.load_meta(str(tmp_path / "data"), "c") == meta
    assert not [f for f in os.listdir(tmp_path / "data" / "c") if ".tmp" in f]


# Run data.py in a real process with small pieces; with `die` set, it kills itself with SIGKILL when it
# comes to write its third progress record: 'before' that record (ids already appended that no record
# vouches for) or 'after' it.
PREPARE = """
import os, signal, sys
import data
from machinery import corpus, preparation
from machinery.cli import run_cli
preparation.CHUNK_BYTES = 997
corpus.RECORD_SECONDS = 0
die, records = {die!r}, []
write_json = corpus.write_json
def write_and_maybe_die(path, value):
    records.append(path) if path.endswith(preparation.PROGRESS_FILE) else None
    if die == 'before' and len(records) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, value)
    if die == 'after' and len(records) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
corpus.write_json = write_and_maybe_die
sys.argv = ['data.py'] + sys.argv[1:]
run_cli(data.main)
"""


def prepare_process(folder, data_dir, die=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", PREPARE.format(die=die), "--folder", str(folder), "--name", "c",
                           "--data_dir", str(data_dir)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("die", ["before", "after"])
def test_preparation_killed_with_sigkill_resumes_to_the_same_bins(tmp_path, folder, die, monkeypatch):
    root, _ = folder
    monkeypatch.setattr(preparation, "CHUNK_BYTES", 997)  # as in the process
    prepare_folder(str(root), str(tmp_path / "whole" / "c"))
    killed = prepare_process(root, tmp_path / "resumed", die=die)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "resumed" / "c"
    record = json.loads((out / PROGRESS_FILE).read_text(encoding="utf-8"))
    written = os.path.getsize(out / "train.bin") + os.path.getsize(out / "val.bin")
    assert record["items"] > 0 and not (out / "meta.json").exists()
    if die == "before":  # ids on disk that the record does not cover: the restart must drop them
        assert written > 2 * (record["train_tokens"] + record["val_tokens"])
    with pytest.raises(UsageError, match="being prepared, or its preparation was interrupted"):
        data.load_meta(str(tmp_path / "resumed"), "c")
    resumed = prepare_process(root, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: " in resumed.stdout
    assert bins(tmp_path / "resumed", "c") == bins(tmp_path / "whole", "c")
    assert not (out / PROGRESS_FILE).exists()


class FakeHub:
    """Stands in for the `datasets` package: load_dataset streams in-memory rows, and can break off
    after `fail_after` rows the way a dropped connection does."""

    def __init__(self, documents, fail_after=None):
        self.documents, self.fail_after, self.calls = documents, fail_after, []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        return self.rows()

    def rows(self):
        for i, text in enumerate(self.documents):
            if i == self.fail_after:
                raise ConnectionError("connection reset by peer")
            yield {"id": i, "text": text}


def prepare_from_hub(monkeypatch, hub, data_dir):
    monkeypatch.setitem(sys.modules, "datasets", hub)
    monkeypatch.setattr(sys, "argv", ["data.py", "--hf", "someone/corpus", "--hf_config", "tiny", "--name", "hf",
                                      "--data_dir", str(data_dir)])
    data.main()


def test_a_streamed_hugging_face_dataset_takes_the_same_path(tmp_path, monkeypatch):
    documents = ODD + VERSES * 4
    hub = FakeHub(documents)
    monkeypatch.setattr(preparation, "CHUNK_BYTES", 200)
    prepare_from_hub(monkeypatch, hub, tmp_path)
    assert hub.calls == [("someone/corpus", "tiny", "train", True)]
    assert bins(tmp_path, "hf") == {split: expected_split(documents, split) for split in ("train", "val")}


def test_a_broken_stream_resumes_where_it_stopped(tmp_path, monkeypatch):
    documents = ODD + VERSES * 8
    monkeypatch.setattr(preparation, "CHUNK_BYTES", 100)
    monkeypatch.setattr(corpus, "RECORD_SECONDS", 0)  # a record after every job
    with pytest.raises(ConnectionError):
        prepare_from_hub(monkeypatch, FakeHub(documents, fail_after=40), tmp_path)
    record = json.loads((tmp_path / "hf" / PROGRESS_FILE).read_text(encoding="utf-8"))
    assert 0 < record["documents"] < 40
    prepare_from_hub(monkeypatch, FakeHub(documents), tmp_path)
    assert bins(tmp_path, "hf") == {split: expected_split(documents, split) for split in ("train", "val")}


def test_without_the_datasets_package_hf_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    monkeypatch.setattr(sys, "argv", ["data.py", "--hf", "someone/corpus", "--name", "hf", "--data_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        run_cli(data.main)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "pip install datasets" in err


@pytest.mark.parametrize("flags, message", [
    (["--input", "a.txt", "--folder", "docs"], "give one of --input, --folder and --hf"),
    (["--folder", "docs", "--tokenizer", "char"], "drop --tokenizer char"),
    (["--folder", "no_such_folder"], "folder 'no_such_folder' not found"),
])
def test_corpus_flags_that_cannot_work_are_one_clear_error(flags, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(sys, "argv", ["data.py", *flags, "--name", "x"])
    with pytest.raises(UsageError, match=message):
        data.main()
    assert not (tmp_path / "data").exists()


def test_a_vocabulary_too_large_for_uint16_is_refused_before_writing(tmp_path, folder, monkeypatch):
    root, _ = folder
    monkeypatch.setattr(corpus, "GPT2_VOCAB_SIZE", 100_277)
    with pytest.raises(UsageError, match="uint16"):
        prepare_folder(str(root), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_bad_jsonl_line_names_its_file_and_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"x\.jsonl:2: no text in a field 'text'; .* --text_field"):
        prepare_folder(str(root), str(tmp_path / "out"), workers=1)
    (root / "x.jsonl").write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"x\.jsonl:2: not a JSON object"):
        prepare_folder(str(root), str(tmp_path / "out2"), workers=1)


def test_an_unfinished_preparation_of_other_files_is_kept_not_overwritten(tmp_path, folder):
    root, _ = folder
    out = tmp_path / "out"
    out.mkdir()
    record = {"input": {"folder": "/elsewhere"}, "pieces": 7, "documents": 3, "train_tokens": 5, "val_tokens": 0}
    (out / PROGRESS_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(UsageError, match="unfinished preparation of another input"):
        prepare_folder(str(root), str(out))
    assert json.loads((out / PROGRESS_FILE).read_text(encoding="utf-8")) == record


# ---------------------------------------------------------------------------------------------
# The GPT-2 recipes


@pytest.fixture
def gpt2_corpus(tmp_path):
    """data_dir with a folder corpus 'docs' prepared: 20 documents, so 2 of them for val."""
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(20):
        (root / f"{i:02d}.txt").write_text(CORPUS[i * 50:] + CORPUS[:i * 50], encoding="utf-8")
    prepare_folder(str(root), str(tmp_path / "data" / "docs"))
    return tmp_path / "data"


@pytest.mark.slow
def test_train_gpt2_recipe_runs_on_a_cpu_with_tiny_overrides(tmp_path, gpt2_corpus):
    result = run_script("train.py", "config/train_gpt2.py", "--max_iters=2", "--batch_size=1", "--block_size=64",
                        "--n_layer=2", "--n_head=2", "--n_embd=64", "--gradient_accumulation_steps=2",
                        "--dataset=docs", f"--data_dir={gpt2_corpus}", f"--out_dir={tmp_path / 'out'}", check=True)
    assert "128 tokens per iteration" in result.stdout  # 1 sequence x 64 tokens x 2 micro-batches
    assert os.path.isfile(tmp_path / "out" / "ckpt.pt")
    evals = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl") if '"eval"' in line]
    assert [e["iter"] for e in evals] == [0, 2] and all(math.isfinite(e["val_loss"]) for e in evals)


@pytest.mark.slow
def test_eval_gpt2_config_scores_a_local_hugging_face_gpt2_offline(tmp_path, gpt2_corpus):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    result = run_script("train.py", "config/eval_gpt2.py", f"--init_from={tmp_path / 'gpt2'}", "--dataset=docs",
                        f"--data_dir={gpt2_corpus}", f"--out_dir={tmp_path / 'out'}", "--block_size=64",
                        "--batch_size=2", "--eval_iters=3", check=True)
    val = float(re.search(r"val loss (\d+\.\d+)", result.stdout).group(1))
    assert abs(val - math.log(50257)) < 0.1  # a random GPT-2 guesses nearly uniformly over 50,257 ids
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")  # evaluation only: nothing trained or saved


@pytest.mark.parametrize("size", ["", "_medium", "_large", "_xl"])
def test_eval_configs_evaluate_openai_gpt2_weights_only(size):
    from machinery import configurator
    import train
    config = load_config(train.DEFAULTS, [os.path.join(ROOT, f"config/eval_gpt2{size}.py")])
    configurator.check_train_config(config)
    assert config["init_from"] == "gpt2" + size.replace("_", "-") and config["eval_only"] is True
