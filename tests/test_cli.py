"""Every script as a command-line tool (issue 20): --help shows the defaults, train.py takes `--key value`
and bare switches, Ctrl-C and SIGTERM end a script with one line and exit 130/143 and leave no temporary
file (data.py then continues to the same bins), generate.py takes a run folder and has an interactive
mode driven through a pipe."""

import io
import json
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from machinery import speed
import generate
from machinery import interactive
from machinery.cli import UsageError
from machinery.configurator import load_config, train_defaults
from conftest import CORPUS, ROOT, run_script
from machinery.corpus import prepare_folder
from data import load_split, prepare

TEMP_FILE = re.compile(r".*\.tmp\d+.*")  # what our atomic writes call their temporary files


def env(**extra):
    return dict(os.environ, GLASSGPT_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
                PYTHONUNBUFFERED="1", **extra)


def temp_files(*folders):
    return [name for folder in folders for _, _, names in os.walk(folder) for name in names if TEMP_FILE.fullmatch(name)]


def one_interrupt_line(stderr, signame="SIGINT"):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith(f"interrupted by {signame}") and "Traceback" not in stderr


# ---- --help -------------------------------------------------------------------------------------------


def test_train_help_lists_every_key_with_its_default_and_the_comment_of_the_defaults_block():
    result = run_script("train.py", "--help")
    assert result.returncode == 0 and result.stderr == ""
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  --")}
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        source = f.read()
    block = source[source.index("# -- defaults --"):source.index("# -- end of defaults --")]
    # a key's comment, and the indented comment lines that continue it (the block keeps to 100 characters)
    documented = [(key, value, " ".join([first, *re.findall(r"^ +# (.+)$", more, flags=re.M)]))
                  for key, value, first, more in re.findall(r"^(\w+) = (.+?)  # (.+)$\n((?: +#.*\n)*)", block,
                                                            flags=re.M)]
    assert any(" " * 10 in line for line in block.splitlines() if line.strip().startswith("#"))  # (it has some)
    assert len(documented) == len(train_defaults())  # every key has its comment, and each is shown
    for key, value, comment in documented:
        assert re.search(rf"^  --{key} +{re.escape(repr(train_defaults()[key]))} +{re.escape(comment)}$",
                         lines[f"--{key}"]), lines[f"--{key}"]
    assert "--key value" in result.stdout and "--switch" in result.stdout


@pytest.mark.parametrize("script, shown", [
    ("generate.py", ["(default: 500)", "(default: 0.8)", "(default: 200)", "(default: 1337)", "(default: auto)",
                     "run folder", "--interactive"]),
    ("data.py", ["(default: data)", "(default: train)", "(default: text)"]),
    ("export.py", ["run folder", "--force"]),
    ("plot.py", ["(default: <out_dir>/metrics.png"]),
    ("bench.py", ["(default: 5)", "(default: 500)", "(default: 2)"]),
])
def test_every_scripts_help_shows_its_defaults(script, shown):
    result = run_script(script, "--help")
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for words in shown:
        assert words in text, (words, result.stdout)


# ---- flags: --key value, bare switches ------------------------------------------------------------------


def test_flags_take_a_value_after_a_space_and_a_bare_switch_means_true(tmp_path):
    defaults = train_defaults()
    config_file = tmp_path / "c.py"
    config_file.write_text("n_layer = 3\n")

    def changed(*argv):
        config = load_config(defaults, list(argv))
        return {k: v for k, v in config.items() if v != defaults[k]}
    assert changed("--max_iters", "10", "--out_dir", "x") == {"max_iters": 10, "out_dir": "x"}
    assert changed("--max_iters=10", "--learning_rate", "1e-3") == {"max_iters": 10, "learning_rate": 1e-3}
    assert changed("--tensorboard") == {"tensorboard": True}
    assert changed("--tensorboard", "--eval_only") == {"tensorboard": True, "eval_only": True}
    assert changed("--bias", "False") == {"bias": False}
    assert changed("--tensorboard", str(config_file)) == {"tensorboard": True, "n_layer": 3}  # a switch, then a file
    assert changed("--compile") == {"compile": True}  # 'auto' settings take True/False too
    for argv, words in ((["--max_iters"], "--max_iters needs a value"),
                        (["--max_iters", "--eval_only"], "--max_iters needs a value"),
                        (["--tensorbaord"], "did you mean 'tensorboard'"),
                        (["--max_itrs", "5"], "did you mean 'max_iters'"),
                        (["--max_iters", "ten"], "'max_iters' must be int")):
        with pytest.raises(UsageError, match=words):
            load_config(defaults, argv)


def test_train_py_runs_with_space_separated_values_and_a_bare_switch(char_data, tmp_path):
    result = run_script("train.py", "--data_dir", char_data, "--dataset", "tiny", "--out_dir", tmp_path / "o",
                        "--n_layer", "1", "--n_head", "1", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
                        "--eval_iters", "2", "--device", "cpu", "--compile", "False", "--eval_only")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^eval 0: train loss \d", result.stdout, flags=re.M) and "done: best val loss" in result.stdout


def test_time_estimate_is_the_median_of_several_timed_steps(monkeypatch):
    clock = iter([0.0, 0.9,  1.0, 1.1,  1.2, 1.3,  1.4, 1.7,  1.8, 1.9])  # steps of 0.9, 0.1, 0.1, 0.3, 0.1 s
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(clock))
    calls = []
    assert speed.median_seconds(lambda: calls.append(1)) == pytest.approx(0.1)
    assert len(calls) == speed.TIMED_RUNS == 5  # one slow step does not make the estimate
    slow = iter([0.0, 3.0])  # a step that takes longer than the budget is timed once
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(slow))
    assert speed.median_seconds(lambda: None) == 3.0


# ---- Ctrl-C and SIGTERM -------------------------------------------------------------------------------


def read_until(stream, text):
    """Read a process's output until `text` has appeared (the process reports its progress: no sleep)."""
    seen = ""
    while text not in seen:
        char = stream.read(1)
        assert char, f"the process ended before printing {text!r}: {seen[-500:]!r}"
        seen += char
    return seen


@pytest.mark.slow
def test_ctrl_c_in_generate_is_one_line_and_exit_130(trained_run):
    out, _ = trained_run
    process = subprocess.Popen([sys.executable, "generate.py", "--ckpt", str(out), "--device", "cpu", "--start",
                                "ROMEO:", "--max_new_tokens", "100000"], cwd=ROOT, env=env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(process.stdout, "ROMEO:")  # sampling has begun
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and one_interrupt_line(stderr), stderr


# data.py in a real process that interrupts itself at a point of its own progress: the whole process group
# gets SIGINT, as from a terminal's Ctrl-C (the encoding workers too), or the main process gets SIGTERM.
INTERRUPTING = """
import os, signal, sys
import data
from machinery import corpus, preparation
from machinery.cli import run_cli
preparation.CHUNK_BYTES, corpus.RECORD_SECONDS = 997, 0
signum = getattr(signal, {signal!r})
def interrupt():
    os.killpg(0, signum) if signum == signal.SIGINT else os.kill(os.getpid(), signum)
if {hook!r} == 'record':  # the third progress record of a corpus is on disk
    write_json, records = corpus.write_json, []
    def write_and_interrupt(path, value):
        write_json(path, value)
        if path.endswith(preparation.PROGRESS_FILE):
            records.append(path)
            if len(records) == 3:
                interrupt()
    corpus.write_json = write_and_interrupt
elif {hook!r} == 'chunk':  # the second chunk of a text has been tokenized
    in_order = preparation.in_order
    def interrupting(*args):
        for n, result in enumerate(in_order(*args)):
            if n == 1:
                interrupt()
            yield result
    preparation.in_order = interrupting
sys.argv = ['data.py'] + sys.argv[1:]
run_cli(data.main, data.INTERRUPTED_HINT)  # as data.py's __main__ does
"""


def interrupted_data_py(hook, signame, *args):
    code = INTERRUPTING.format(hook=hook, signal=signame)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300, start_new_session=True)  # its own process group


@pytest.mark.slow
def test_ctrl_c_while_preparing_a_text_leaves_nothing_and_the_rerun_gives_the_same_bins(tmp_path, monkeypatch):
    text = tmp_path / "big.txt"
    text.write_text(CORPUS * 4, encoding="utf-8")
    monkeypatch.setattr("machinery.preparation.CHUNK_BYTES", 997)
    prepare(str(text), str(tmp_path / "whole" / "d"), "gpt2")
    data_dir = tmp_path / "data"
    args = ["--input", text, "--tokenizer", "gpt2", "--name", "d", "--data_dir", data_dir]
    result = interrupted_data_py("chunk", "SIGINT", *args)
    assert result.returncode == 130 and one_interrupt_line(result.stderr), result.stderr
    assert "starts over" in result.stderr and temp_files(data_dir) == []
    assert run_script("data.py", *args).returncode == 0
    for split in ("train", "val"):
        assert load_split(str(data_dir), "d", split).tolist() == load_split(str(tmp_path / "whole"), "d", split).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_corpus_preparation_keeps_its_progress_and_continues_to_the_same_bins(tmp_path, signame, status,
                                                                                        monkeypatch):
    from test_corpus import write_folder
    folder = tmp_path / "corpus"
    write_folder(folder)
    monkeypatch.setattr("machinery.preparation.CHUNK_BYTES", 997)
    prepare_folder(str(folder), str(tmp_path / "whole" / "c"))
    data_dir = tmp_path / "data"
    args = ["--folder", folder, "--name", "c", "--data_dir", data_dir]
    result = interrupted_data_py("record", signame, *args)
    assert result.returncode == status and one_interrupt_line(result.stderr, signame), result.stderr
    assert "continues where it stopped" in result.stderr and temp_files(data_dir) == []
    record = json.loads((data_dir / "c" / "progress.tmp.json").read_text(encoding="utf-8"))
    assert record["items"] > 0
    resumed = interrupted_data_py("none", "SIGINT", *args)  # the same command, not interrupted this time
    assert resumed.returncode == 0 and "resuming: " in resumed.stdout, resumed.stderr
    for split in ("train", "val"):
        assert load_split(str(data_dir), "c", split).tolist() == load_split(str(tmp_path / "whole"), "c", split).tolist()


EXPORT_INTERRUPTED = """
import os, signal, sys
import export
from machinery.cli import run_cli
write_tokenizer = export.write_tokenizer
def write_and_interrupt(*args):
    write_tokenizer(*args)  # the weights and the tokenizer are in the temporary folder
    os.kill(os.getpid(), signal.SIGINT)
export.write_tokenizer = write_and_interrupt
sys.argv = ['export.py'] + sys.argv[1:]
run_cli(export.main)
"""


@pytest.mark.slow
def test_ctrl_c_in_export_leaves_the_earlier_export_and_no_temporary_folder(trained_run, tmp_path):
    out, _ = trained_run
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # an earlier export, which --force may replace
    (hf / "mine.txt").write_text("an earlier export")
    result = subprocess.run([sys.executable, "-c", EXPORT_INTERRUPTED, "--ckpt", str(out), "--out", str(hf), "--force"],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and "interrupted by SIGINT" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["hf_model"] and sorted(os.listdir(hf)) == ["config.json", "mine.txt"]


# ---- generate.py: a run folder, --interactive --------------------------------------------------------


def test_generate_takes_a_run_folder_for_its_best_model(trained_run, tmp_path):
    out, _ = trained_run
    args = ["--device", "cpu", "--max_new_tokens", "8", "--start", "ROMEO:"]
    by_folder = run_script("generate.py", "--ckpt", out, *args)
    assert by_folder.returncode == 0, by_folder.stderr
    assert by_folder.stdout == run_script("generate.py", "--ckpt", out / "best_model.pt", *args, check=True).stdout
    empty = run_script("generate.py", "--ckpt", tmp_path, *args)
    assert empty.returncode == 2 and "is a folder without a best_model.pt" in empty.stderr


def settings(**changes):
    return SimpleNamespace(**{**vars(generate.parse_args([])), **changes})


def test_interactive_commands_change_the_settings_of_the_prompts_after_them(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/temperature 0.5\nfirst\n/top_k off\n/top_p 2\n/tempreature 1\n"
                                                  "/stop .\n/max_new_tokens\n\nsecond\\nline\n"))
    asked = []
    interactive.run(lambda prompt, s: asked.append((prompt, s.temperature, s.top_k, s.stop)), settings(),
                    generate.parse_args)
    assert asked == [("first", 0.5, 200, None), ("\n", 0.5, None, "."), ("second\nline", 0.5, None, ".")]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: argument --top_p: must be a finite number in (0, 1], got '2' (see /help)",
                      "error: unknown command '/tempreature' (did you mean '/temperature'?); /help lists them",
                      "error: /max_new_tokens needs a value, e.g. /max_new_tokens 500"]


def test_ctrl_c_during_an_interactive_sample_returns_to_the_prompt(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    done = []

    def sample(prompt, s):
        if prompt == "one":
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a sample
        done.append(prompt)
    interactive.run(sample, settings(), generate.parse_args)
    assert done == ["two"] and "(sample stopped)" in capsys.readouterr().err


@pytest.mark.slow
def test_interactive_through_a_pipe_samples_each_prompt_with_the_settings_in_force(trained_run):
    out, _ = trained_run
    flags = ["--ckpt", str(out), "--device", "cpu", "--max_new_tokens", "20"]
    result = subprocess.run([sys.executable, "generate.py", *flags, "--interactive"], cwd=ROOT, env=env(), text=True,
                            input="ROMEO:\n/temperature 0\nAll:\n", capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("\n---------------\n")
    assert len(samples) == 3 and samples[2] == ""  # two samples, then the end of the input
    assert samples[0].startswith("ROMEO:") and len(samples[0]) == len("ROMEO:") + 20
    greedy = run_script("generate.py", *flags, "--start", "All:", "--temperature", "0", check=True).stdout
    assert samples[1] + "\n---------------\n" == greedy
    assert "temperature 0.0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_in_an_interactive_sample_ends_it_and_the_next_prompt_is_answered(trained_run):
    out, _ = trained_run
    process = subprocess.Popen([sys.executable, "generate.py", "--ckpt", str(out), "--device", "cpu", "--interactive",
                                "--max_new_tokens", "100000"], cwd=ROOT, env=env(), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write("ROMEO:\n")
        process.stdin.flush()
        read_until(process.stdout, "ROMEO:")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate("/max_new_tokens 5\nAll:\n", timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0 and "(sample stopped)" in stderr and "Traceback" not in stderr
    assert stdout.endswith("\n---------------\n") and len(stdout.split("\n---------------\n")[-2]) == len("All:") + 5
