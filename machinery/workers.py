"""
Tokenizing on all cores: jobs handed to worker processes a few at a time and their results taken back in
order; the workers ignore Ctrl-C (the parent handles it) and leave when their parent is gone.
"""

import collections
import os
import sys
import time


def in_order(work, jobs, workers):
    """work(job) for every job, in order: the jobs go to `workers` processes, a few at a time, never the
    whole stream. Threads would do as well (tiktoken lets go of Python's GIL while it encodes, and a corpus
    job's own Python, decoding and parsing JSON lines, is 2% of it: tools/bench_workers.py,
    records/workers.json); processes are kept because the Ctrl-C and kill -9 handling below is built and
    tested around them."""
    if workers == 1:
        yield from map(work, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # fork on Linux (Python 3.14 would pick a fork server): workers start at once with the parent's
    # GPT-2 tables, and their parent is this process; elsewhere the platform's default, spawn
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent)
    try:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.submit(work, job))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C the queued jobs are dropped, not done


def exit_with_parent():
    """Worker start-up: leave once the parent is gone. A parent killed with -9 cannot stop its
    workers, and they would wait for work forever. Ctrl-C reaches every process of the terminal's
    group: the parent handles it, so the workers ignore it (no traceback from each of them)."""
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
