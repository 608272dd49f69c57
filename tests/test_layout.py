"""The layout a learner reads, measured as a reader pays for it: four core files at the root (model.py,
data.py, train.py, generate.py) within a budget of code tokens, names and line width, a training loop
that shows the textbook step, the machinery in one package that never imports the core, no import
circles, and each duplicated idea written once."""

import ast
import io
import os
import re
import subprocess
import sys
import tokenize

import pytest

from conftest import ROOT

CORE = ("model.py", "data.py", "train.py", "generate.py")
PROGRAMS = ("lens.py", "export.py", "quantize.py", "plot.py", "bench.py")
# the reading budget of issue 28 (nanoGPT's core, read the same way, is 5,075 tokens; its loop 354 tokens)
CORE_TOKENS, TRAIN_TOKENS, LOOP_TOKENS, LOOP_NAMES, WIDTH = 6600, 2100, 450, 85, 100


def source(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def code_tokens(text):
    """Python tokens without comments, docstrings, indentation and line ends: what a reader must parse."""
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    return [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in skip and t.start[0] not in docstrings]


def training_loop():
    """(the longest loop of train.py, its source)"""
    text = source("train.py")
    loops = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.While, ast.For))]
    loop = max(loops, key=lambda n: n.end_lineno - n.lineno)
    return loop, text


def test_the_root_holds_the_core_and_the_programs_only():
    assert sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) == sorted(CORE + PROGRAMS)


def test_code_tokens_count_code_not_comments_or_docstrings():
    assert len(code_tokens('"""a docstring"""\nx = 1  # a comment\n')) == 3  # x, =, 1


def test_the_core_fits_its_reading_budget():
    tokens = {name: len(code_tokens(source(name))) for name in CORE}
    assert sum(tokens.values()) <= CORE_TOKENS, tokens
    assert tokens["train.py"] <= TRAIN_TOKENS, tokens


@pytest.mark.parametrize("name", CORE)
def test_no_core_line_is_wider_than_100_characters(name):
    wide = [i for i, line in enumerate(source(name).splitlines(), 1) if len(line) > WIDTH]
    assert not wide, f"{name}: lines {wide} are over {WIDTH} characters"


def test_the_training_loop_is_short_and_shows_the_textbook_step():
    loop, text = training_loop()
    tokens = [t for t in code_tokens(text) if loop.lineno <= t.start[0] <= loop.end_lineno]
    names = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(loop) if isinstance(n, ast.Attribute)}
    assert len(tokens) <= LOOP_TOKENS and len(names) <= LOOP_NAMES, (len(tokens), len(names))
    body = ast.get_source_segment(text, loop)
    for step in (r"\.backward\(", r"scaler\.unscale_\(opt\)", r"clip_grad_norm_\(", r"scaler\.step\(opt\)",
                 r"scaler\.update\(\)", r"opt\.zero_grad\("):
        assert re.search(step, body), f"the loop does not show {step}"
    # the step itself, in the textbook's order: backward, unscale, clip, step, zero_grad
    order = [body.index(s) for s in ("backward(", "unscale_(", "clip_grad_norm_(", "scaler.step(", "zero_grad(")]
    assert order == sorted(order)


def imports_of(path):
    """The project modules (dotted, e.g. 'machinery.health' or 'model') that the file at path imports."""
    found = set()
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in project_modules()}


def project_modules():
    """{dotted name: path} of every module outside tests/ and docs/."""
    modules = {f[:-3]: f for f in os.listdir(ROOT) if f.endswith(".py")}
    package = os.path.join(ROOT, "machinery")
    modules |= {f"machinery.{f[:-3]}": f"machinery/{f}" for f in os.listdir(package)
                if f.endswith(".py") and f != "__init__.py"}
    return modules


def test_there_are_no_import_circles():
    graph = {name: imports_of(path) - {name} for name, path in project_modules().items()}

    def reaches(start, goal, seen):
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in graph.get(start, ()))
    circles = [name for name in graph if reaches(name, name, {name})]
    assert not circles, f"modules in an import circle: {circles}"


def test_dependencies_point_one_way_programs_core_machinery():
    core = {m[:-3] for m in CORE}
    programs = {m[:-3] for m in PROGRAMS}
    for name, path in project_modules().items():
        imported = imports_of(path)
        if name.startswith("machinery."):
            assert not imported & (core | programs), f"{path} imports {imported & (core | programs)}"
        if name in core:
            assert not imported & programs and "train" not in imported, f"{path} imports {imported}"


def test_the_cli_error_type_pulls_in_nothing_of_the_project():
    assert imports_of("machinery/cli.py") == set()


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "machinery")) if f.endswith(".py")))
def test_every_machinery_module_says_what_it_is_for_and_reads_in_one_sitting(name):
    text = source(f"machinery/{name}")
    assert ast.get_docstring(ast.parse(text)), f"machinery/{name} does not say what it is for"
    assert len(text.splitlines()) <= 400 and not [line for line in text.splitlines() if len(line) > 120]


def test_model_py_holds_the_model_and_nothing_that_only_makes_it_fast_or_connects_it():
    text = source("model.py")
    defined = {node.name for node in ast.parse(text).body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert not defined & {"Muon", "orthogonalise", "DecodeStep", "measure_matmul_flops", "published_peak_flops",
                          "hf_to_ours", "ours_to_hf", "refuse_gpt2_variants"}
    assert "CUDAGraph" not in text and "PEAK_FLOPS" not in text and "HF_TRANSPOSED" not in text
    assert "trace" not in text  # the lens reads the model's insides with forward hooks (lens.py: trace)


def test_sampling_loads_no_training_code(trained_run):
    out, _ = trained_run
    code = ("import sys, generate; generate.load_model(sys.argv[1], 'cpu'); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code, str(out / "best_model.pt")], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split())
    assert "model" in loaded
    assert not loaded & {"train", "machinery.optimizers", "machinery.health", "machinery.metrics",
                         "machinery.speed", "machinery.run_folder", "machinery.distributed", "machinery.setup",
                         "filelock"}


def test_run_never_assigns_a_config_name_and_no_other_function_reads_one():
    """run() turns the settings into module globals (globals().update): a name it assigned would be local
    in all of run(), and every earlier read of that setting would fail. Other functions take settings as
    arguments, never as globals that exist only once run() has run. And run() defines no closures."""
    import train
    keys = set(train.DEFAULTS)
    tree = ast.parse(source("train.py"))
    run = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    stored = {n.id for n in ast.walk(run) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    stored |= {a.arg for n in ast.walk(run) if isinstance(n, (ast.FunctionDef, ast.Lambda)) for a in n.args.args}
    assert not stored & keys, f"run() assigns the config names {sorted(stored & keys)}"
    assert not [n for n in ast.walk(run) if isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not run]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name != "run":
            own = {a.arg for a in node.args.args} | {n.id for n in ast.walk(node)
                                                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            assert not (read - own) & keys, f"{node.name} reads the settings {sorted((read - own) & keys)} as globals"


BENCHMARKS = {"bench.py"}  # its reference path are other code's way, on purpose
ONE_PLACE = [  # (what, a pattern that finds it, the one module allowed to have it)
    ("the device-type rule", r'"cuda" if \w+\.startswith\("cuda"\)|\.split\(":"\)\[0\]', "machinery/devices.py"),
    ("a temp file beside its target, renamed into place", r'f"\{\w+\}\.tmp\{os\.getpid\(\)\}',
     "machinery/faults.py"),
    ("an exception's first line", r"splitlines\(\)\[0\]\[:", "machinery/cli.py"),
    ("the uint16 limit", r"6553[56]|iinfo\(np\.uint16\)", "machinery/preparation.py"),
    ("a model built from a checkpoint's model_args", r'GPT\(GPTConfig\(\*\*\w*meta\["model_args"\]', "generate.py"),
    ("GPT-2 ids as uint16", r"encode_to_numpy\(", "machinery/preparation.py"),
]


@pytest.mark.parametrize("what, pattern, home", ONE_PLACE)
def test_each_idea_is_written_once(what, pattern, home):
    having = [path for path in project_modules().values()
              if path not in BENCHMARKS and re.search(pattern, source(path))]
    assert having == [home], f"{what} is written in {having}, not only in {home}"


def test_the_readme_shows_the_layout_on_its_first_screen_and_lists_every_module():
    readme = source("README.md")
    first_screen = "\n".join(readme.splitlines()[:60])
    assert all(f"{name}" in first_screen for name in CORE + ("machinery/",))
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [path for path in project_modules().values() if f"`{os.path.basename(path)}`" not in layout]
    assert not missing, f"README's Layout does not list {missing}"
