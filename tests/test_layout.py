"""The layout a learner reads: the core files stay nanoGPT-sized and free of machinery, the machinery
lives in modules of its own that never import the training script, and each duplicated idea exists once."""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

CORE_LIMITS = {"train.py": 400, "model.py": 380, "data.py": 450}
ENTRY_SCRIPTS = {"train.py", "generate.py", "data.py", "export.py", "plot.py", "bench.py", "bench_corpus.py",
                 "lens.py"}


def modules():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def source(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def function(tree, name):
    return next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)


@pytest.mark.parametrize("name", modules())
def test_every_module_is_readable_in_one_sitting(name):
    lines = source(name).splitlines()
    assert len(lines) <= CORE_LIMITS.get(name, 400 if name != "bench.py" else 500), f"{name}: {len(lines)} lines"
    assert not [i for i, line in enumerate(lines, 1) if len(line) > 120], f"{name} has lines over 120 characters"
    assert ast.get_docstring(ast.parse(source(name))), f"{name} does not say what it is for"


def test_the_training_loop_and_its_step_are_textbook_sized():
    run = function(ast.parse(source("train.py")), "run")
    [loop] = [node for node in run.body if isinstance(node, ast.While)]
    assert loop.end_lineno - loop.lineno + 1 <= 80
    fors = [node for node in loop.body if isinstance(node, ast.For)]
    micro = next(f for f in fors if "accum_steps" in ast.unparse(f.iter))  # micro-batches -> ... -> zero_grad
    zero = next(f for f in fors if "zero_grad" in ast.unparse(f))
    assert zero.end_lineno - micro.lineno + 2 <= 25  # + the comment line above the micro-batches


def test_model_py_holds_the_model_and_nothing_that_only_makes_it_fast_or_connects_it():
    text = source("model.py")
    defined = {node.name for node in ast.parse(text).body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert not defined & {"Muon", "orthogonalise", "DecodeStep", "measure_matmul_flops", "published_peak_flops",
                          "hf_to_ours", "ours_to_hf", "refuse_gpt2_variants"}
    assert "CUDAGraph" not in text and "PEAK_FLOPS" not in text and "HF_TRANSPOSED" not in text


def imported_modules(name):
    found = set()
    for node in ast.walk(ast.parse(source(name))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_benchmark_imports_the_training_script():
    assert [m for m in modules() if "train" in imported_modules(m)] == ["bench.py"]


def test_machinery_never_imports_an_entry_script():
    for name in set(modules()) - ENTRY_SCRIPTS:
        assert not imported_modules(name) & {m[:-3] for m in ENTRY_SCRIPTS - {"data.py"}}, name


def test_sampling_loads_no_training_code(trained_run):
    out, _ = trained_run
    code = ("import sys, generate; generate.load_model(sys.argv[1], 'cpu'); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code, str(out / "best_model.pt")], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split())
    assert "model" in loaded
    assert not loaded & {"train", "optim", "health", "metrics", "estimate", "run_folder", "distributed", "filelock"}


def test_run_never_assigns_a_config_name_and_no_other_function_reads_one():
    """run() turns the settings into module globals (globals().update): a name it assigned would be local
    in all of run(), and every earlier read of that setting would fail. Other functions take settings as
    arguments, never as globals that exist only once run() has run."""
    import train
    keys = set(train.DEFAULTS)
    tree = ast.parse(source("train.py"))
    run = function(tree, "run")
    stored = {n.id for n in ast.walk(run) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    stored |= {a.arg for n in ast.walk(run) if isinstance(n, (ast.FunctionDef, ast.Lambda)) for a in n.args.args}
    assert not stored & keys, f"run() assigns the config names {sorted(stored & keys)}"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name != "run":
            own = {a.arg for a in node.args.args} | {n.id for n in ast.walk(node)
                                                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            assert not (read - own) & keys, f"{node.name} reads the settings {sorted((read - own) & keys)} as globals"


BENCHMARKS = {"bench.py", "bench_corpus.py"}  # their reference paths are other code's way, on purpose
ONE_PLACE = [  # (what, a pattern that finds it, the one module allowed to have it)
    ("the device-type rule", r'"cuda" if \w+\.startswith\("cuda"\)|\.split\(":"\)\[0\]', "devices.py"),
    ("a temp file beside its target, renamed into place", r'f"\{\w+\}\.tmp\{os\.getpid\(\)\}', "faults.py"),
    ("an exception's first line", r"splitlines\(\)\[0\]\[:", "configurator.py"),
    ("the uint16 limit", r"6553[56]|iinfo\(np\.uint16\)", "data.py"),
    ("a model built from a checkpoint's model_args", r'GPT\(GPTConfig\(\*\*\w*meta\["model_args"\]', "checkpoint.py"),
    ("GPT-2 ids as uint16", r"encode_ordinary\(|encode_to_numpy\(", "data.py"),
]


@pytest.mark.parametrize("what, pattern, home", ONE_PLACE)
def test_each_idea_is_written_once(what, pattern, home):
    having = [m for m in modules() if m not in BENCHMARKS and re.search(pattern, source(m))]
    assert having == [home], f"{what} is written in {having}, not only in {home}"


def test_the_readme_layout_lists_every_module():
    layout = source("README.md").split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert not [m for m in modules() if f"`{m}`" not in layout]
