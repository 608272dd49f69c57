"""Hostile input as a class, not as cases (issue 29): generated values thrown at every flag of every script and
every train.py setting. The contract: a value is either refused with one UsageError line naming it, or
accepted as something that can work (a finite number in its range, a name that stays in its folder); and a
whole script given such a value exits with one line, no traceback, and every earlier file as it was.
GLASSGPT_PROPERTY_EXAMPLES sets how many values each property tries (.ci/run sets more)."""

import math
import os
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import data
import export
import generate
import plot
from conftest import TINY, run_script
from machinery.checks import LARGEST_INT, SEED_RANGE, folder_name
from machinery.cli import UsageError
from machinery.configurator import load_train_config, train_defaults

EXAMPLES = int(os.environ.get("GLASSGPT_PROPERTY_EXAMPLES", 30))
quick = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# what users and attackers type: numbers at and past every edge, names that climb out of folders, text that
# looks like a flag or a file reference, control characters, and anything else Hypothesis makes up
EDGES = ["nan", "NaN", "inf", "-inf", "1e999", "-1e999", "1e-400", "-1", "0", "-0", "0.0", "1", "1.5", "2",
         str(2 ** 31), str(2 ** 63), str(2 ** 64), str(2 ** 64 - 1), str(-2 ** 63), "9" * 40, "", " ", "True",
         "None", "[]", "{}", "()", "'x'", "1_000", "0x10", "..", ".", "../x", "/etc", "a/b", "x\x00y", "\n",
         "--help", "-", "FILE:/etc/passwd", "TEXT:", "é", "\u202e", "auto", "cuda", "cpu:0"]
HOSTILE = st.one_of(st.sampled_from(EDGES), st.text(max_size=12), st.integers().map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))


def one_line(error):
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


def finite_numbers(values):
    for value in values:
        if isinstance(value, float):
            assert math.isfinite(value), values
        if isinstance(value, int) and not isinstance(value, bool):
            assert abs(value) <= 2 ** 64, values


# ---- train.py: every setting ---------------------------------------------------------------------------

DEFAULTS = train_defaults()


@quick
@given(key=st.sampled_from(sorted(DEFAULTS)), value=HOSTILE)
def test_every_train_setting_is_refused_in_one_line_or_accepted_as_something_that_can_work(key, value):
    try:
        config = load_train_config(DEFAULTS, [f"--{key}={value}"])
    except UsageError as e:
        one_line(e)
        return
    finite_numbers(config.values())
    assert 0 <= config["seed"] <= SEED_RANGE[1]
    assert os.path.normpath(os.path.join("data", config["dataset"])).startswith("data" + os.sep)
    default = DEFAULTS[key]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        assert isinstance(config[key], (int, float)) and abs(config[key]) <= LARGEST_INT


# ---- generate.py, export.py, plot.py, data.py: every flag ---------------------------------------------


def flags_of(parser_function):
    """The --flags an argparse-based main defines, read from its parser."""
    import argparse
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = capture
    try:
        parser_function()
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return sorted(o for a in captured["parser"]._actions for o in a.option_strings if o.startswith("--")
                  and o != "--help")


GENERATE_FLAGS = flags_of(lambda: generate.parse_args([]))


@quick
@given(flag=st.sampled_from(GENERATE_FLAGS), value=HOSTILE)
def test_every_generate_flag_is_refused_in_one_line_or_accepted_in_range(flag, value):
    try:
        args = generate.parse_args([f"{flag}={value}"] if value and not flag.endswith(("interactive", "cache",
                                                                                       "compile")) else [flag])
    except UsageError as e:
        one_line(e)
        return
    finite_numbers(vars(args).values())
    assert args.num_samples >= 1 and args.max_new_tokens >= 1 and args.temperature >= 0
    assert args.top_k is None or args.top_k >= 1
    assert args.top_p is None or 0 < args.top_p <= 1
    assert SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]


@quick
@given(name=HOSTILE)
def test_a_dataset_name_is_refused_in_one_line_or_stays_inside_data_dir(name):
    try:
        folder_name(name)
    except UsageError as e:
        one_line(e)
        return
    inside = os.path.normpath(os.path.join("/data", name))
    assert os.path.dirname(inside) == "/data" and inside != "/data"


@quick
@given(flag=st.sampled_from(flags_of(lambda: data.main())), value=HOSTILE)
def test_every_data_py_flag_is_refused_in_one_line_or_writes_only_inside_data_dir(flag, value, tmp_path_factory,
                                                                                  monkeypatch):
    root = tmp_path_factory.mktemp("data_flags")
    (root / "t.txt").write_text("hello world, hello data\n" * 20, encoding="utf-8")
    args = {"--input": str(root / "t.txt"), "--name": "t", "--data_dir": str(root / "data")}
    # (the data folder is the user's to choose: a hostile one is tried below root, never at / itself)
    args[flag] = f"{root}/other/{value}" if flag == "--data_dir" else value
    argv = [a for k, v in args.items() for a in (f"{k}={v}",)]
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["data.py", *argv])
    before = set(walk(root))
    try:
        data.main()
    except UsageError as e:
        one_line(e)
        assert set(walk(root)) == before
        return
    except SystemExit as e:  # --help
        assert e.code == 0
        return
    written = set(walk(root)) - before
    assert all(path.startswith(str(root / "data")) or path.startswith(str(root / "other")) for path in written), \
        written


def walk(root):
    return [os.path.join(base, name) for base, _, names in os.walk(root) for name in names]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, request):
    from test_gpt2 import save_tiny_checkpoint
    root = tmp_path_factory.mktemp("export_flags")
    (root / "run").mkdir()
    save_tiny_checkpoint(root / "run" / "best_model.pt")
    return root


@quick
@given(out=HOSTILE, force=st.booleans())
def test_export_never_deletes_what_it_reads_whatever_out_and_force_say(out, force, exported_run, monkeypatch):
    assume(not os.path.isabs(out) and not out.startswith("~"))  # (this machine's own folders stay out of it)
    monkeypatch.chdir(exported_run / "run")
    before = {path: os.path.getsize(path) for path in walk(exported_run / "run")}
    try:
        export.main(["--ckpt", "best_model.pt", f"--out={out}", *(["--force"] if force else [])])
    except UsageError as e:
        one_line(e)
    after = {path: os.path.getsize(path) for path in walk(exported_run / "run")}
    assert {p: s for p, s in after.items() if p in before} == before  # every earlier file still there, unchanged


@quick
@given(line=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.dictionaries(st.sampled_from(["iter", "type", "loss", "lr", "val_loss", "grad_norm"]),
                                      st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                                                st.lists(st.integers(), max_size=2)))
                      .map(lambda d: __import__("json").dumps(d).encode())))
def test_plot_reads_any_metrics_line_without_a_traceback(line, tmp_path_factory):
    run = tmp_path_factory.mktemp("metrics")
    good = b'{"type": "train", "iter": 1, "loss": 3.0, "lr": 0.001}\n{"type": "eval", "iter": 1, "val_loss": 3.1}\n'
    (run / "metrics.jsonl").write_bytes(good + line.replace(b"\n", b" ") + b"\n" + good)
    train, evals = plot.read_metrics(str(run))
    figure = plot.plot_runs({"run": (train, evals)})
    assert figure is not None


# ---- whole scripts: one line, no traceback, nothing lost ------------------------------------------------


@pytest.mark.slow
@settings(max_examples=max(5, EXAMPLES // 4), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(["learning_rate", "seed", "n_embd", "block_size", "batch_size", "dropout", "dataset",
                            "out_dir", "max_iters", "grad_clip", "eval_iters", "warmup_iters", "min_lr"]),
       value=st.sampled_from(["nan", "inf", "1e999", "-1", "0", str(2 ** 64), "9" * 30, "../x", "", "/"]))
def test_train_py_given_a_hostile_setting_exits_with_one_line_and_loses_nothing(key, value, trained_run):
    out, _ = trained_run
    before = {path: open(path, "rb").read() for path in walk(out)}
    result = run_script("train.py", *TINY, f"--data_dir={out.parent / 'data'}", "--dataset=tiny",
                        f"--out_dir={out.parent / 'hostile'}", "--max_iters=2", "--eval_interval=2",
                        f"--{key}={value}", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {path: open(path, "rb").read() for path in walk(out)} == before


SCRIPTS = ["train.py", "generate.py", "data.py", "lens.py", "export.py", "plot.py", "bench.py", "tools/bench_corpus.py",
           "docs/figures.py", "docs/ablations.py", "docs/notebooks.py", "quantize.py", "docs/quantization.py",
           "docs/timeline_story.py", "docs/muon_speed.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_handles_ctrl_c_before_its_slow_imports(script):
    import ast
    from conftest import ROOT
    tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "quiet_interrupts"]
    assert calls, f"{script} does not call quiet_interrupts(__name__)"
    heavy = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno < calls[0].lineno
             and any(name in ast.unparse(n) for name in ("torch", "numpy", "transformers", "matplotlib", "tiktoken"))]
    assert not heavy, f"{script} imports {ast.unparse(heavy[0])} before it handles Ctrl-C"


def test_ctrl_c_while_the_imports_load_is_one_line_and_exit_130():
    import subprocess
    from conftest import ROOT
    code = ("from machinery.cli import quiet_interrupts; quiet_interrupts('__main__'); import os, signal; "
            "os.kill(os.getpid(), signal.SIGINT); import torch")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr.strip() == "interrupted by SIGINT", result.stderr


@pytest.mark.slow
def test_a_closed_stdout_stops_nothing_the_run_saves_and_exits_as_usual(char_data, tmp_path):
    import subprocess
    from conftest import ROOT
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={char_data}",
                                "--dataset=tiny", f"--out_dir={out}", "--max_iters=30", "--eval_interval=30"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()  # `| head -1`: one line read, then the reader is gone
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr, stderr
    assert (out / "ckpt.pt").exists() and (out / "best_model.pt").exists()


@pytest.mark.slow
def test_folder_names_that_are_not_utf8_work_or_are_one_line(char_data, tmp_path):
    out = os.fsdecode(bytes(tmp_path) + b"/run-\xff\xfe")  # legal on Linux, not UTF-8
    train = run_script("train.py", *TINY, f"--data_dir={char_data}", "--dataset=tiny", f"--out_dir={out}",
                       "--max_iters=4", "--eval_interval=4")
    assert train.returncode == 0 and "\\udcff" in train.stdout, train.stderr  # shown escaped
    assert run_script("generate.py", "--ckpt", out, "--max_new_tokens=4", "--device=cpu").returncode == 0
    assert run_script("plot.py", out).returncode == 0
    resumed = run_script("train.py", *TINY, f"--data_dir={char_data}", "--dataset=tiny", f"--out_dir={out}",
                         "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    exported = run_script("export.py", "--ckpt", out, "--out", out + "-hf")
    assert exported.returncode in (0, 2) and "Traceback" not in exported.stderr
    if exported.returncode:
        assert len(exported.stderr.strip().splitlines()) == 1 and "UTF-8" in exported.stderr
