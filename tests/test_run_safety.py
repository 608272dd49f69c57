"""Nothing lost, nothing surprising around a run: an earlier run is kept, one run per out_dir, the
leftovers of a killed write are cleaned up, Ctrl-C stops even mid-evaluation, unsupported GPT-2
variants are refused, MFU divides by one cached peak, and the usual slips are one clear line."""

import json
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
from contextlib import nullcontext

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import plot
from machinery import run_folder
from machinery import speed
from machinery.evaluation import evals_ahead
from machinery import faults
from machinery import metrics
from machinery.checkpoint import load_checkpoint
from conftest import CORPUS, ROOT, TINY, run_script
from machinery.cli import UsageError
from data import prepare
from model import GPT, GPTConfig


def train_args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--lr_decay_iters=40", *extra]


def start(*args, code=None):
    """A real train.py process (optionally run through `code`), stdout and stderr merged, unbuffered."""
    env = dict(os.environ, GLASSGPT_OFFLINE="1", PYTHONUNBUFFERED="1")
    prefix = ["-c", code] if code else []
    return subprocess.Popen([sys.executable, *prefix, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process, text, give_up=300):
    """The child's output line by line until a line contains text (no sleeping, no timing). A child that hangs
    before it prints text is killed after give_up seconds, so a regression fails here instead of stalling the
    suite (a guard far above any healthy run, never a speed check)."""
    seen, guard = [], threading.Timer(give_up, process.kill)
    guard.start()
    try:
        for line in process.stdout:
            seen.append(line)
            if text in line:
                return "".join(seen)
    finally:
        guard.cancel()
    raise AssertionError(f"'{text}' never appeared:\n{''.join(seen)}")


# ---- 1. a new run keeps the earlier one ----------------------------------------------------------


def test_earlier_run_files_are_moved_to_a_folder_of_their_own(tmp_path):
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    for name in ("ckpt.pt", "best_model.pt", "ckpt_0000010.pt", "metrics.jsonl", "metrics.png", "notes.txt"):
        (out / name).write_text(name)
    run_folder.set_aside_earlier_run(str(out), replace=False)
    [folder] = (out / run_folder.EARLIER_RUNS).iterdir()
    assert sorted(os.listdir(folder)) == ["best_model.pt", "ckpt.pt", "ckpt_0000010.pt", "metrics.jsonl",
                                          "metrics.png", "tensorboard"]
    assert (folder / "ckpt.pt").read_text() == "ckpt.pt"
    assert sorted(os.listdir(out)) == [run_folder.EARLIER_RUNS, "notes.txt"]  # the user's own file stays
    (out / "ckpt.pt").write_text("second")
    os.utime(out / "ckpt.pt", (os.path.getmtime(folder / "ckpt.pt"),) * 2)  # the same time: a folder all the same
    run_folder.set_aside_earlier_run(str(out), replace=False)
    assert sorted(p.name for p in (out / run_folder.EARLIER_RUNS).iterdir()) == [folder.name, folder.name + "-2"]


def test_replace_earlier_run_deletes_only_run_files(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    for name in ("ckpt.pt", "metrics.jsonl", "notes.txt"):
        (tmp_path / name).write_text(name)
    run_folder.set_aside_earlier_run(str(tmp_path), replace=True)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.slow
def test_second_run_keeps_the_first_and_says_where(char_data, tmp_path):
    out = tmp_path / "out"
    args = train_args(char_data, out, "--max_iters=10", "--eval_interval=5")
    run_script("train.py", *args, check=True)
    first, _ = load_checkpoint(out / "best_model.pt")
    second = run_script("train.py", *args, "--learning_rate=1e-3", check=True)
    [folder] = (out / run_folder.EARLIER_RUNS).iterdir()
    assert f"the earlier run in {out} was moved to {folder}" in second.stdout
    kept, _ = load_checkpoint(folder / "best_model.pt")
    assert all(torch.equal(kept["model"][k], v) for k, v in first["model"].items())
    assert load_checkpoint(out / "best_model.pt")[1]["config"]["learning_rate"] == 1e-3
    assert sum(json.loads(line)["type"] == "eval" for line in (out / "metrics.jsonl").open()) == 3
    assert (folder / "metrics.jsonl").read_text() != (out / "metrics.jsonl").read_text()
    replaced = run_script("train.py", *args, "--replace_earlier_run=True", check=True)
    assert "deleted the earlier run's best_model.pt, ckpt.pt, metrics.jsonl" in replaced.stdout
    assert len(os.listdir(out / run_folder.EARLIER_RUNS)) == 1


# ---- 2. one run per out_dir ------------------------------------------------------------------------


@pytest.mark.slow
def test_second_process_in_a_busy_out_dir_stops_and_a_killed_runs_lock_is_taken_over(char_data, tmp_path):
    out = tmp_path / "out"
    first = start(*train_args(char_data, out, "--max_iters=100000", "--eval_interval=1000", "--eval_at_start=False"))
    try:
        read_until(first, "iter 5:")
        second = run_script("train.py", *train_args(char_data, out, "--max_iters=10"))
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {out} is in use by another training run (process {first.pid} on ")
        assert ": python train.py " in line and "--max_iters=100000" in line  # its command, to recognise it
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (out / run_folder.LOCK_FILE).read_text().startswith(f"process {first.pid} ")  # kill -9 leaves it
    third = run_script("train.py", *train_args(char_data, out, "--max_iters=2"), check=True)
    assert f"took over {out / run_folder.LOCK_FILE} from a run that is no longer running (process {first.pid} " \
        in third.stdout
    assert not (out / run_folder.LOCK_FILE).exists()  # released at exit


@pytest.mark.slow
def test_lock_is_refused_while_held_and_free_once_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from machinery import run_folder; run_folder.lock_run_folder(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UsageError, match=f"in use by another training run \\(process {holder.pid} on "):
            run_folder.lock_run_folder(str(tmp_path))
    finally:
        holder.communicate("", timeout=60)  # end of stdin: it exits and releases the lock
    assert not (tmp_path / run_folder.LOCK_FILE).exists()


# ---- 3. leftovers of a kill -9 ---------------------------------------------------------------------

KILLED_WHILE_WRITING = """
import os, signal, sys, torch
from machinery.checkpoint import save_checkpoint
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # dies with the temp file written, not renamed
save_checkpoint(sys.argv[1], {"w": torch.zeros(3)}, {})
"""


def killed_writer(path):
    """The pid of a real process that was killed while writing a checkpoint to path."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, str(path)], cwd=ROOT)
    assert writer.wait(timeout=120) == -signal.SIGKILL
    return writer.pid


@pytest.mark.slow
def test_leftovers_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    pid = killed_writer(tmp_path / "ckpt.pt")
    leftover = f"ckpt.pt.tmp{pid}"
    assert os.listdir(tmp_path) == [leftover]
    alive = f"best_model.pt.tmp{os.getpid()}"  # a writer that is still running
    others = [alive, f"notes.txt.tmp{pid}", "metrics.jsonl.tmpX", "ckpt.pt"]
    for name in others:
        (tmp_path / name).write_text("keep me")
    faults.remove_leftovers(str(tmp_path), run_folder.LEFTOVER)
    assert sorted(os.listdir(tmp_path)) == sorted(others)


@pytest.mark.slow
def test_train_start_removes_a_killed_runs_half_written_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid = killed_writer(out / "ckpt.pt")
    result = run_script("train.py", *train_args(char_data, out, "--max_iters=2"), check=True)
    assert f"removed 1 half-written file(s) of a killed run from {out}: ckpt.pt.tmp{pid}" in result.stdout
    assert not any(".tmp" in name for name in os.listdir(out))


# ---- 4. GPT-2 variants this model does not implement ------------------------------------------------

VARIANTS = {"activation_function": "relu", "n_inner": 100, "scale_attn_weights": False,
            "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True, "layer_norm_epsilon": 1e-6,
            "add_cross_attention": True, "tie_word_embeddings": False}


def save_tiny_gpt2(folder, **field):
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                        eos_token_id=None, **field)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("field, value", VARIANTS.items())
def test_unsupported_gpt2_variant_is_refused_naming_the_field(tmp_path, field, value):
    folder = save_tiny_gpt2(tmp_path / "variant", **{field: value})
    with pytest.raises(UsageError, match=f"GPT-2 variant this model does not implement: {field} is {value!r}"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("field, value", [("activation_function", "gelu_pytorch_tanh"), ("n_inner", 128)])
def test_the_same_maths_spelled_otherwise_is_accepted(tmp_path, field, value):
    folder = save_tiny_gpt2(tmp_path / "same", **{field: value})
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = GPT.from_pretrained(folder).eval()(idx, idx)
        assert (logits - hf(idx).logits).abs().max().item() < 1e-5


@pytest.mark.slow
def test_train_init_from_a_variant_is_one_clear_line(char_data, tmp_path):
    folder = save_tiny_gpt2(tmp_path / "variant", scale_attn_by_inverse_layer_idx=True)
    result = run_script("train.py", *train_args(char_data, tmp_path / "out", f"--init_from={folder}"))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "scale_attn_by_inverse_layer_idx is True" in line and "Traceback" not in result.stderr


def test_a_hub_name_with_no_network_fails_at_once_in_one_whole_line(monkeypatch):
    """No network and HF_HUB_OFFLINE unset: one failed connection, then the local cache only (no retries)."""
    import socket
    import transformers
    from machinery import hf
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    tried, asked = [], []

    def no_network(address, timeout=None, *args):
        tried.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    def not_cached(name, **kwargs):
        asked.append(kwargs)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      f"in the cached files. Check your internet connection or see how to run the library in "
                      f"offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(transformers.GPT2Config, "from_pretrained", not_cached)
    with pytest.raises(UsageError) as error:
        hf.gpt2_weights("gpt2", 1e-5)
    assert tried == [(("huggingface.co", 443), 3.0)] and asked == [{"local_files_only": True}]
    [line] = str(error.value).splitlines()
    assert line.startswith("could not load 'gpt2': the Hugging Face hub is unreachable and its weights are not in")
    assert "download them once" in line and line.endswith("--init_from=path/to/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # told so: not even one connection is tried
    assert not hf.hub_reachable() and len(tried) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert hf.hub_reachable()


@pytest.mark.parametrize("message, width, expected", [
    ("short enough", 40, "short enough"),
    ("We couldn't connect to 'https://huggingface.co' to load the files", 40, "We couldn't connect to..."),
    ("a" * 50, 20, "a" * 17 + "..."),  # one word longer than the width: cut inside it, marked
    ("first line\nsecond line", 40, "first line"),
    ("cut (right after a bracket", 12, "cut..."),
])
def test_a_cut_message_ends_at_a_word_and_says_it_was_cut(message, width, expected):
    from machinery.cli import first_line
    assert first_line(ValueError(message), width) == expected
    assert len(first_line(ValueError(message), width)) <= width


# ---- 5. MFU: one peak per machine --------------------------------------------------------------------


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "PEAK_FLOPS_CACHE", str(tmp_path / "glassgpt" / "peak_flops.json"))
    measured = []
    monkeypatch.setattr(speed, "measure_matmul_flops", lambda dev, dtype: measured.append(dtype) or 1.5e11)
    assert speed.peak_flops("cpu", torch.float32) == 1.5e11
    assert speed.peak_flops("cpu", torch.float32) == 1.5e11
    assert measured == [torch.float32]
    [(key, value)] = json.loads((tmp_path / "glassgpt" / "peak_flops.json").read_text()).items()
    assert "torch.float32" in key and f"{torch.get_num_threads()} threads" in key and value == 1.5e11


@pytest.mark.slow
def test_train_divides_by_the_cached_peak(char_data, tmp_path):
    cache = tmp_path / "cache" / "glassgpt" / "peak_flops.json"
    cache.parent.mkdir(parents=True)
    key = speed.peak_cache_key("cpu", torch.float32)
    cache.write_text(json.dumps({key: 1e12}))
    out = tmp_path / "out"
    env = dict(os.environ, GLASSGPT_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_args(char_data, out, "--max_iters=10")],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    _, meta = load_checkpoint(out / "ckpt.pt")
    flops = speed.flops_per_token(GPT(GPTConfig(**meta["model_args"])))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    for entry in (e for e in logs if e["type"] == "train"):
        assert entry["mfu"] == pytest.approx(flops * entry["tokens_per_s"] / 1e12)


@pytest.mark.slow
def test_an_mfu_above_100_percent_names_the_stale_cached_peak_once(char_data, tmp_path):
    cache = tmp_path / "cache" / "glassgpt" / "peak_flops.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({speed.peak_cache_key("cpu", torch.float32): 1e3}))  # far below any real step
    env = dict(os.environ, GLASSGPT_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                             *train_args(char_data, tmp_path / "out", "--max_iters=10")],
                            cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert result.stdout.count("warning: MFU above 100%") == 1
    assert f"delete {cache} to measure it again" in result.stdout


# ---- 6. Ctrl-C ---------------------------------------------------------------------------------------


def open_terminal():
    """A pseudo-terminal of 24 x 80 characters: (our end, the child's end)."""
    ours, childs = pty.openpty()
    fcntl.ioctl(childs, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 x 0
    return ours, childs


def read_terminal_until(fd, text, timeout=120):
    """What the child wrote to its terminal until text appears; fails if it stays silent for timeout s."""
    seen = b""
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], timeout)  # waits for the child to write
        try:
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"'{text}' never appeared:\n{seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode(errors="replace")


def interrupt_an_evaluation(args):
    """Run train.py with args, press Ctrl-C once an evaluation has begun; (stdout, exit status)."""
    terminal, child_end = open_terminal()  # so that the progress bars are drawn, as a user sees them
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                               env=dict(os.environ, GLASSGPT_OFFLINE="1"), stdout=subprocess.PIPE,
                               stderr=child_end, text=True)
    os.close(child_end)
    try:
        read_terminal_until(terminal, "evaluating")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()  # (a no-op once it has exited)
        process.wait(timeout=60)
        os.close(terminal)
    return output, process.returncode


@pytest.mark.slow
def test_interrupt_during_an_evaluation_abandons_it_and_saves(char_data, tmp_path):
    out = tmp_path / "out"
    # 100,000 evaluation batches: far longer than the timeout unless the evaluation is abandoned
    output, returncode = interrupt_an_evaluation(train_args(char_data, out, "--max_iters=100000", "--eval_interval=5",
                                                            "--eval_at_start=False", "--eval_iters=100000"))
    assert returncode == 128 + signal.SIGINT
    assert "eval 5: abandoned, a stop was requested" in output and "--init_from=resume" in output
    _, meta = load_checkpoint(out / "ckpt.pt")
    assert meta["iter_num"] == 5 and meta["evaluated"] is False
    resumed = run_script("train.py", *train_args(char_data, out, "--max_iters=6", "--eval_interval=5",
                                                 "--init_from=resume"), check=True)
    assert "eval 5: train loss" in resumed.stdout  # the abandoned evaluation is made on resume


@pytest.mark.slow
def test_interrupt_during_the_evaluation_before_the_first_step_saves_nothing_and_says_so(char_data, tmp_path):
    out = tmp_path / "out"
    output, returncode = interrupt_an_evaluation(train_args(char_data, out, "--max_iters=100000",
                                                            "--eval_iters=100000"))
    assert returncode == 128 + signal.SIGINT
    assert "eval 0: abandoned, a stop was requested" in output
    assert "with no step taken: nothing was saved" in output and "--init_from=resume" not in output
    assert not (out / "ckpt.pt").exists()


@pytest.mark.parametrize("saves", [True, False])
def test_the_stop_notice_promises_a_checkpoint_only_where_one_is_saved(capfd, saves):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = run_folder.StopRequest(ddp=False, group=None, saves=saves)  # eval_only runs pass saves=False
        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    notice = capfd.readouterr().err
    assert stop.signal == signal.SIGTERM and "stopping at the next safe point" in notice
    assert ("to save ckpt.pt" in notice) == saves


BLOCKED_IN_FSYNC = """
import os, runpy, signal, sys
def fsync_blocks(fd):  # the final checkpoint write hangs, as on a stalled disk
    print("fsync reached", flush=True)
    while True:
        signal.pause()
os.fsync = fsync_blocks
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_second_interrupt_exits_at_once(char_data, tmp_path):
    out = tmp_path / "out"
    process = start(*train_args(char_data, out, "--max_iters=100000", "--eval_interval=100000",
                                "--eval_at_start=False", "--snapshots=False"),  # the first fsync: the final save's
                    code=BLOCKED_IN_FSYNC)
    try:
        read_until(process, "iter 5:")
        process.send_signal(signal.SIGINT)
        assert "stopping at the next safe point" in read_until(process, "fsync reached")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()  # (a no-op once it has exited)
        process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "second interrupt: exiting now, without saving" in output
    assert not (out / "ckpt.pt").exists() and not (out / run_folder.LOCK_FILE).exists()


# ---- 7. a CPU run says how long it will take -----------------------------------------------------------


def test_how_long_counts_steps_and_evaluations_and_flags_gpu_sized_runs():
    assert evals_ahead(0, 5000, 250, eval_first=True) == 21  # the GPU recipe
    assert evals_ahead(0, 1000, 1000, eval_first=False) == 1  # the CPU recipe: one, at the end
    assert evals_ahead(5, 12, 5, eval_first=False) == 2  # 10 and the last, 12
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, dropout=0.5))
    X = torch.zeros(2, 4, dtype=torch.long)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    short = speed.how_long(model, X, X, nullcontext(), 1, steps=10, evals=1, eval_batches=2, any_device=True)
    assert short.startswith("on this CPU a step takes about ") and "10 steps and 1 evaluation of up to 2" in short
    assert "sized for a GPU" not in short
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
    long = speed.how_long(model, X, X, nullcontext(), 1, steps=10 ** 9, evals=1, eval_batches=2, any_device=True)
    assert "config/shakespeare_char_cpu.py" in long
    asked_for_cpu = speed.how_long(model, X, X, nullcontext(), 1, steps=10 ** 9, evals=1, eval_batches=2,
                                   any_device=False)  # a recipe made for a CPU, like the CPU recipe itself
    assert "sized for a GPU" not in asked_for_cpu


# the CPU recipe's step, measured on a 2-core Zen 4 (machinery/speed.py: ONE_THREAD_GAIN has the table)
@pytest.mark.parametrize("step_ms, one_thread_ms, load, says", [
    (854, 183, 4.1, "a step takes 854 ms on 2 threads but 183 ms on one here; the CPU is busy (load average 4.1"),
    (2456, 427, 1.0, "a step takes 2,456 ms on 2 threads but 427 ms on one here: OMP_NUM_THREADS=1 python"),
    (90, 100, 3.5, "note: the CPU is busy (load average 3.5 on 2 cores): 2 threads that wait for each other"),
    (91, 114, 0.4, None),  # two threads with both cores (the best steps measured): nothing is said
    (100, 90, 0.4, None),  # within the noise of one thread: nothing is said
])
def test_a_step_far_slower_than_on_one_thread_or_a_busy_cpu_suggests_omp_num_threads_1(step_ms, one_thread_ms,
                                                                                          load, says):
    advice = speed.thread_advice(step_ms / 1000, one_thread_ms / 1000, 2, load, 2)
    if says is None:
        assert advice == ""
    else:
        assert says in advice and "OMP_NUM_THREADS=1" in advice and "\n" not in advice
    assert speed.thread_advice(step_ms / 1000, None, 2, load, 2) == ""  # one thread not timed: OMP_NUM_THREADS set
    assert speed.thread_advice(step_ms / 1000, one_thread_ms / 1000, 1, load, 2) == ""  # a run on one thread


def test_how_long_times_one_thread_too_unless_the_threads_were_chosen(monkeypatch):
    """The timings are injected: the default threads' step 854 ms, one thread's 183 ms (a busy 2-core CPU)."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    X = torch.zeros(2, 4, dtype=torch.long)
    threads = [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(speed, "median_seconds", lambda work: 0.854 if threads[-1] == 2 else 0.183)
    monkeypatch.setattr(speed, "cpu_load", lambda: 1.2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    line, advice = speed.how_long(model, X, X, nullcontext(), 1, steps=10, evals=1, eval_batches=2,
                                  any_device=False).splitlines()
    assert line.startswith("on this CPU a step takes about 854 ms")
    assert advice.startswith("note: a step takes 854 ms on 2 threads but 183 ms on one here: OMP_NUM_THREADS=1")
    assert threads == [2, 1, 2]  # one thread for the timing, then as before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # chosen: neither timed nor questioned
    assert "\n" not in speed.how_long(model, X, X, nullcontext(), 1, steps=10, evals=1, eval_batches=2,
                                      any_device=False)


@pytest.mark.slow
def test_gpu_recipe_on_a_cpu_points_to_the_cpu_recipe_before_its_first_eval(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # device='auto' finds no GPU, as on a laptop
    # its model and batch size, a context the tiny corpus holds, and steps enough to be GPU-sized on any CPU
    process = start("config/shakespeare_char.py", f"--data_dir={char_data}", "--dataset=tiny",
                    f"--out_dir={tmp_path / 'out'}", "--block_size=32", "--max_iters=1000000")
    try:
        output = read_until(process, "on this CPU a step takes about")
    finally:
        process.kill()
        process.wait(timeout=60)
    assert "eval 0" not in output  # said before the first evaluation starts
    assert "sized for a GPU: on a CPU, config/shakespeare_char_cpu.py" in output


# ---- 8. the usual slips: one clear line, nothing lost ----------------------------------------------------


def one_error_line(result, expected):
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line


def saved_run(tmp_path, **config):
    """A run folder whose ckpt.pt holds train.py's defaults overlaid with config (and that model shape)."""
    from machinery.checkpoint import save_checkpoint
    from machinery.configurator import train_defaults
    config = {**train_defaults(), **config}
    model_args = {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")}
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(str(out / "ckpt.pt"), {"model": {}}, {"model_args": {**model_args, "vocab_size": 65},
                                                          "config": config, "iter_num": 7, "best_val_loss": 2.0})
    return out


def test_a_resumed_run_takes_its_checkpoints_settings_as_defaults_then_files_and_flags_on_top(tmp_path):
    from machinery.configurator import load_train_config, train_defaults
    defaults = train_defaults()
    out = saved_run(tmp_path, n_layer=3, n_head=2, n_embd=64, block_size=48, optimizer="muon", max_iters=450,
                    learning_rate=1e-2, dataset="tiny", data_dir="elsewhere", eval_only=True, inspect=True,
                    out_dir="moved-from-here", replace_earlier_run=True, device="cpu")
    resumed = load_train_config(defaults, ["--init_from=resume", f"--out_dir={out}"])
    assert {k: resumed[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "optimizer", "max_iters",
                                    "learning_rate", "dataset", "data_dir", "device")} == \
        dict(n_layer=3, n_head=2, n_embd=64, block_size=48, optimizer="muon", max_iters=450, learning_rate=1e-2,
             dataset="tiny", data_dir="elsewhere", device="cpu")
    # where and how this command runs is its own: never the checkpoint's
    assert (resumed["out_dir"], resumed["init_from"], resumed["eval_only"], resumed["inspect"],
            resumed["replace_earlier_run"]) == (str(out), "resume", False, False, False)
    config_file = tmp_path / "recipe.py"
    config_file.write_text(f"out_dir = {str(out)!r}\nmax_iters = 900\nlearning_rate = 5e-3\n", encoding="utf-8")
    on_top = load_train_config(defaults, [str(config_file), "--init_from=resume", "--max_iters=1000"])
    assert (on_top["max_iters"], on_top["learning_rate"], on_top["n_layer"]) == (1000, 5e-3, 3)  # flag > file > ckpt
    assert load_train_config(defaults, [f"--out_dir={out}"])["n_layer"] == defaults["n_layer"]  # a new run: defaults


def test_a_checkpoints_unknown_or_mistyped_settings_are_left_at_their_defaults(tmp_path):
    from machinery.configurator import load_train_config, train_defaults
    defaults = train_defaults()
    out = saved_run(tmp_path, no_such_setting=3, max_iters="many", optimizer="muon")
    resumed = load_train_config(defaults, ["--init_from=resume", f"--out_dir={out}"])
    assert resumed["max_iters"] == defaults["max_iters"] and resumed["optimizer"] == "muon"
    assert "no_such_setting" not in resumed


def test_resume_with_another_optimizer_or_shape_or_without_a_checkpoint_is_one_line(tmp_path):
    from machinery.checkpoint import check_resumable, load_checkpoint
    from machinery.configurator import load_train_config, train_defaults
    defaults = train_defaults()
    out = saved_run(tmp_path, optimizer="muon", n_layer=2, n_head=2, n_embd=32)
    _, meta = load_checkpoint(str(out / "ckpt.pt"))
    for flags, expected in ((["--optimizer=adamw"], "cannot resume: optimizer is adamw in this config but muon in "),
                            (["--n_layer=3"], "cannot resume: n_layer is 3 in this config but 2 in ")):
        config = load_train_config(defaults, ["--init_from=resume", f"--out_dir={out}", *flags])
        model_args = {**{k: config[k] for k in meta["model_args"] if k != "vocab_size"}, "vocab_size": 65}
        with pytest.raises(UsageError, match=expected):
            check_resumable(meta, str(out / "ckpt.pt"), config, model_args, None, master=True)
    with pytest.raises(UsageError, match=r"cannot resume: checkpoint '.*ckpt.pt' not found; name the run's folder"):
        load_train_config(defaults, ["--init_from=resume", f"--out_dir={tmp_path / 'no-run'}"])
    assert not (tmp_path / "no-run").exists()


@pytest.mark.slow
def test_resume_with_another_tokenizer_is_refused(char_data, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=5", "--eval_interval=5"), check=True)
    before = (out / "ckpt.pt").read_bytes()
    (tmp_path / "other.txt").write_text(CORPUS.upper(), encoding="utf-8")
    prepare(str(tmp_path / "other.txt"), str(char_data / "other"), "char")
    result = run_script("train.py", *train_args(char_data, out, "--init_from=resume", "--max_iters=10"),
                        "--dataset=other")
    one_error_line(result, f"cannot resume: {out / 'ckpt.pt'} was trained on dataset 'tiny', whose tokenizer "
                           "differs from that of 'other'; resume with --dataset=tiny")
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.slow
def test_out_dir_that_is_a_file_config_that_is_a_folder_dataset_without_meta(char_data, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("my notes")
    one_error_line(run_script("train.py", *train_args(char_data, blocker, "--max_iters=2")),
                   f"out_dir '{blocker}' is a file, not a folder")
    assert blocker.read_text() == "my notes"
    one_error_line(run_script("train.py", "config"), "'config' is a folder, not a config file")
    (char_data / "tiny" / "meta.json").unlink()
    bins = {name: (char_data / "tiny" / name).read_bytes() for name in ("train.bin", "val.bin")}
    one_error_line(run_script("train.py", *train_args(char_data, tmp_path / "out", "--max_iters=2")),
                   f"{char_data / 'tiny'} has no meta.json")
    assert {name: (char_data / "tiny" / name).read_bytes() for name in bins} == bins


def test_plot_skips_a_corrupt_metrics_line_and_says_which(tmp_path, capsys):
    lines = [json.dumps({"type": "train", "iter": i, "loss": 4.0 - i, "lr": 1e-3}) for i in range(1, 4)]
    text = "\n".join([lines[0], '{"type": "train", "it', lines[1], "[1, 2]", lines[2]]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    train_entries, _ = plot.read_metrics(str(tmp_path))
    assert [e["iter"] for e in train_entries] == [1, 2, 3]
    assert f"skipped line(s) 2, 4 of {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == text  # nothing rewritten


def test_resume_drops_a_torn_metrics_line_instead_of_failing(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "iter": 5}\n{"type": "eval", "iter": 5}\n{"type": "train", "iter": 6}\n'
                    '{"type": "tra')  # killed while writing its last line
    metrics.trim_metrics(str(path), 5)
    assert path.read_text() == '{"type": "train", "iter": 5}\n{"type": "eval", "iter": 5}\n'
    assert "dropped line(s) 4" in capsys.readouterr().out
