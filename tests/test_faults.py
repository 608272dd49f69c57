"""Machine faults and awkward data as bad input (issue 20): a full disk while locking the run folder,
writing a checkpoint or preparing data is one line naming the path, with nothing half-written left and
the previous files intact; a preparation stopped by a bad file runs again once it is fixed; a corpus of
two documents gets a val document and trains."""

import json
import os
import subprocess

import pytest
import torch

from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.cli import UsageError
from conftest import CORPUS, TINY, VERSES, run_script
from data import load_split
from machinery.gpt2_bpe import gpt2_encoding
from machinery.preparation import PROGRESS_FILE
from test_cli import temp_files


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk, and fill(leave): fill it up but for `leave` bytes (skipped where
    tmpfs cannot be mounted: not root, or in a container that forbids it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or 'not permitted'}")

    def fill(leave=0):
        reserve = disk / "reserve"
        reserve.write_bytes(b"\0" * leave)
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError:  # the disk is full
                pass
        reserve.unlink()
    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def one_error_line(result, *words):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: could not write ") and all(w in lines[0] for w in words), lines[0]


def train_args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", *extra]


def test_a_full_disk_when_locking_the_run_folder_is_one_line_and_leaves_no_lock(char_data, small_disk):
    disk, fill = small_disk
    fill()
    result = run_script("train.py", *train_args(char_data, disk / "out", "--max_iters=2"))
    one_error_line(result, str(disk / "out" / "train.lock"), "No space left on device", "free some disk space")
    assert os.listdir(disk / "out") == []


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(char_data, small_disk):
    disk, fill = small_disk
    out = disk / "out"
    args = train_args(char_data, out, "--eval_interval=5", "--snapshots=False", "--max_iters=5")  # (no timeline:
    run_script("train.py", *args, check=True)  # its snapshots would meet the full disk first)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "best_model.pt")}
    fill(leave=64 * 1024)  # room for the lock and the metrics, not for a checkpoint
    result = run_script("train.py", *args[:-1], "--max_iters=10", "--init_from=resume")
    one_error_line(result, "No space left on device", "the previous checkpoint is kept", str(out))
    assert {name: (out / name).read_bytes() for name in before} == before and temp_files(out) == []
    assert load_checkpoint(str(out / "ckpt.pt"))[1]["iter_num"] == 5


def test_a_full_disk_at_the_first_checkpoint_does_not_speak_of_a_previous_one(small_disk):
    disk, fill = small_disk
    fill()
    with pytest.raises(UsageError) as error:
        save_checkpoint(str(disk / "ckpt.pt"), {"w": torch.zeros(100_000)}, {"iter_num": 1})
    assert "No space left on device" in str(error.value) and "previous" not in str(error.value)
    assert not (disk / "ckpt.pt").exists() and temp_files(disk) == []


def test_a_full_disk_while_preparing_a_text_keeps_the_dataset_there(tmp_path, small_disk):
    disk, fill = small_disk
    (tmp_path / "small.txt").write_text(CORPUS, encoding="utf-8")
    (tmp_path / "big.txt").write_text(CORPUS * 20, encoding="utf-8")
    run_script("data.py", "--input", tmp_path / "small.txt", "--name", "d", "--data_dir", disk, check=True)
    before = {name: (disk / "d" / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    fill(leave=16 * 1024)
    result = run_script("data.py", "--input", tmp_path / "big.txt", "--name", "d", "--data_dir", disk)
    one_error_line(result, str(disk / "d"), "No space left on device", "the dataset there is unchanged")
    assert {name: (disk / "d" / name).read_bytes() for name in before} == before and temp_files(disk) == []


@pytest.mark.slow
def test_a_full_disk_while_preparing_a_corpus_keeps_its_progress_and_the_rerun_finishes_it(tmp_path, small_disk):
    disk, fill = small_disk
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:02d}.txt").write_text(CORPUS, encoding="utf-8")
    whole = run_script("data.py", "--folder", folder, "--name", "c", "--data_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    fill(leave=64 * 1024)  # a few documents' worth: the bins outgrow it
    args = ["--folder", folder, "--name", "c", "--data_dir", disk]
    result = run_script("data.py", *args)
    one_error_line(result, "No space left on device", "the same command continues it")
    assert (disk / "c" / PROGRESS_FILE).exists() and temp_files(disk) == []
    (disk / "filler").unlink()
    assert run_script("data.py", *args).returncode == 0
    for split in ("train", "val"):
        assert load_split(str(disk), "c", split).tolist() == load_split(str(tmp_path / "whole"), "c", split).tolist()


def test_a_preparation_stopped_by_a_bad_file_runs_again_once_the_file_is_fixed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(CORPUS, encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    args = ["--folder", folder, "--name", "c", "--data_dir", tmp_path / "data"]
    failed = run_script("data.py", *args)
    assert failed.returncode == 2 and "b.jsonl:2: no text in a field 'text'" in failed.stderr
    assert (tmp_path / "data" / "c" / PROGRESS_FILE).exists()  # what it had written, kept as progress
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": "fixed now"}\n', encoding="utf-8")
    fixed = run_script("data.py", *args)
    assert fixed.returncode == 0, fixed.stderr
    assert "changed since its preparation here stopped; starting it over" in fixed.stdout
    fresh = run_script("data.py", "--folder", folder, "--name", "c", "--data_dir", tmp_path / "fresh", check=True)
    assert fresh.returncode == 0
    for split in ("train", "val"):
        assert load_split(str(tmp_path / "data"), "c", split).tolist() == \
            load_split(str(tmp_path / "fresh"), "c", split).tolist()


def two_documents(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    first, second = CORPUS, "".join(VERSES) * 3
    (folder / "a.txt").write_text(first, encoding="utf-8")
    (folder / "b.txt").write_text(second, encoding="utf-8")
    return folder, first, second


def test_a_corpus_of_two_documents_gives_its_second_to_val(tmp_path):
    folder, first, second = two_documents(tmp_path)
    result = run_script("data.py", "--folder", folder, "--name", "two", "--data_dir", tmp_path / "data")
    assert result.returncode == 0 and "there are only 2: its last document went there instead" in result.stdout
    encoding = gpt2_encoding()
    assert load_split(str(tmp_path / "data"), "two", "train").tolist() == encoding.encode_ordinary(first)
    assert load_split(str(tmp_path / "data"), "two", "val").tolist() == encoding.encode_ordinary(second)
    meta = json.loads((tmp_path / "data" / "two" / "meta.json").read_text(encoding="utf-8"))
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)


def test_a_corpus_of_one_document_gives_the_last_tenth_of_its_ids_to_val(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.txt").write_text(CORPUS, encoding="utf-8")
    run_script("data.py", "--folder", folder, "--name", "one", "--data_dir", tmp_path / "data", check=True)
    ids = gpt2_encoding().encode_ordinary(CORPUS)
    cut = int(len(ids) * 0.9)
    assert load_split(str(tmp_path / "data"), "one", "train").tolist() == ids[:cut]
    assert load_split(str(tmp_path / "data"), "one", "val").tolist() == ids[cut:]


@pytest.mark.slow
def test_the_gpt2_recipe_trains_on_a_corpus_of_two_documents(tmp_path):
    folder, _, _ = two_documents(tmp_path)
    run_script("data.py", "--folder", folder, "--name", "two", "--data_dir", tmp_path / "data", check=True)
    result = run_script("train.py", "config/train_gpt2.py", "--data_dir", tmp_path / "data", "--dataset", "two",
                        "--out_dir", tmp_path / "out", "--n_layer", "1", "--n_head", "1", "--n_embd", "16",
                        "--block_size", "32", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                        "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "2", "--warmup_iters", "1",
                        "--lr_decay_iters", "2", "--device", "cpu", "--compile", "False", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "eval 2: train loss" in result.stdout and (tmp_path / "out" / "best_model.pt").exists()


def test_an_empty_val_split_is_one_line_saying_what_to_do(char_data, tmp_path):
    (char_data / "tiny" / "val.bin").write_bytes(b"")
    result = run_script("train.py", *train_args(char_data, tmp_path / "out", "--max_iters=2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: the val split of 'tiny' has 0 tokens, fewer than block_size + 1 = 33; "
                                     "use a longer text or a smaller block_size")
