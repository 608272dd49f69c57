"""Shared helpers: a tiny corpus prepared in tmp_path and a way to run the entry points."""

import os
import signal
import sys

import pytest

from scripts import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread per process, set before PyTorch is imported: the tests' models are tiny, and on a busy
# 2-core machine threads that wait for each other make them many times slower. It changes no result.
os.environ["OMP_NUM_THREADS"] = "1"

# A suite started in the background by a non-interactive shell inherits an ignored SIGINT, and so would every
# process it starts: the tests that press Ctrl-C on a script need the default, as a terminal gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A small corpus with a few speakers: enough text for 32-token windows in both splits.
VERSES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs? The matter? speak, I pray you.\n\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
]
CORPUS = "".join(VERSES[i % len(VERSES)] for i in range(60))

# Settings that make a training run take a few seconds on a CPU.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_iters=5", "--log_interval=5", "--device=cpu", "--dtype=float32", "--compile=False",
        "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture
def char_data(tmp_path, corpus_file):
    """data_dir with a prepared char dataset named 'tiny'."""
    from data import prepare
    data_dir = tmp_path / "data"
    prepare(str(corpus_file), str(data_dir / "tiny"), "char")
    return data_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short real training run, shared by the tests that need a checkpoint."""
    from data import prepare
    root = tmp_path_factory.mktemp("run")
    (root / "tiny.txt").write_text(CORPUS, encoding="utf-8")
    prepare(str(root / "tiny.txt"), str(root / "data" / "tiny"), "char")
    out = root / "out"
    result = run_script("train.py", f"--data_dir={root / 'data'}", "--dataset=tiny", f"--out_dir={out}",
                        "--max_iters=50", "--eval_interval=25", *TINY, check=True)
    return out, result
