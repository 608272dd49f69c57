"""The README and docs quote the code; these tests keep the quotes true.

The docs follow a few conventions so that they can be checked (docs/README.md states them too):
- every heading carries its number (`## 3.2 ...`), the same in both languages;
- code is referenced as `file.py: Symbol.attribute`, resolved here by reading the file's syntax tree;
- fenced blocks say what they are: `python excerpt FILE` (must still be in FILE), `python runnable`
  (executed here; a `text output` block right after it must be exactly what it prints),
  `bash runnable` (executed here with tiny settings), `bash` (checked: scripts, configs and keys exist),
  `text` (anything else: diagrams, sample output).
"""

import ast
import contextlib
import io
import math
import os
import re
import shlex
import tokenize
from functools import lru_cache

import pytest

from machinery.cli import UsageError
from machinery.configurator import load_config, parse_value, train_defaults
from conftest import CORPUS, run_script
from test_docs_figures import load_script

figures_script = load_script("figures")  # it runs chapter 4's commands: every chapter's shell blocks are read its way
commands_of, split_variables = figures_script.commands_of, figures_script.split_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGS = ("en", "zh")
CHAPTERS = ("00-knowledge-map.md", "01-configuration.md", "02-data.md", "03-training-loop.md",
            "04-experiments.md", "05-model.md", "06-generation.md", "07-scaling-out.md", "08-ablations.md",
            "09-machinery.md", "10-build-up.md", "11-quantization.md")
BLOCK_KINDS = ("python excerpt", "python runnable", "text output", "bash runnable", "bash", "text")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_readme_lists_every_config_key_with_its_default():
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", read("README.md"), flags=re.M)
    assert {key: parse_value(value) for key, value in rows} == train_defaults()


def test_readme_quick_start_has_two_one_line_commands():
    quick = read("README.md").split("## Quick start")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2 and all(block.count("\n") == 1 for block in blocks)
    assert "python train.py config/shakespeare_char_cpu.py" in blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command():
    ci = read(".ci/run")
    assert "requirements-dev.txt" in ci and "pytest -q" in ci


# ---------------------------------------------------------------------------------------------
# Reading the docs


def chapter(lang, name):
    return read(os.path.join("docs", lang, name))


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.M | re.S)


def blocks(text):
    """[(kind, argument, body, start, end)] of the fenced blocks, in order."""
    found = []
    for m in FENCE.finditer(text):
        info = m.group(1).strip()
        kind = next((k for k in BLOCK_KINDS if info == k or info.startswith(k + " ")), None)
        found.append((kind, info[len(kind):].strip() if kind else info, m.group(2), m.start(), m.end()))
    return found


def prose(text):
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def headings(text):
    return re.findall(r"^(#{1,6}) (.*)$", prose(text), flags=re.M)


def sections(text):
    """{heading number: text of that section up to the next heading}; fenced blocks included."""
    found, number, in_fence = {}, None, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else re.match(r"#{1,6} (\d+(?:\.\d+)*)[ .]", line)
        if m:
            number = m.group(1)
            found[number] = ""
        elif number is not None:
            found[number] += line
    return found


REFERENCE = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py): ([A-Za-z_][\w.]*)`")


def references(text):
    return REFERENCE.findall(prose(text))


def all_chapters():
    return [(lang, name) for lang in LANGS for name in CHAPTERS]


# ---------------------------------------------------------------------------------------------
# Structure: both languages, same chapters, same headings, same references, same commands


def test_every_chapter_exists_in_both_languages_and_the_index_links_them():
    index = read("docs/README.md")
    for lang, name in all_chapters():
        assert os.path.isfile(os.path.join(ROOT, "docs", lang, name)), f"docs/{lang}/{name} is missing"
        assert f"({lang}/{name})" in index, f"docs/README.md does not link {lang}/{name}"
    for lang in LANGS:
        extra = set(os.listdir(os.path.join(ROOT, "docs", lang))) - set(CHAPTERS)
        assert not extra, f"docs/{lang} has files that are not chapters: {sorted(extra)}"


def test_the_readme_links_the_docs():
    assert "(docs/README.md)" in read("README.md")


@pytest.mark.parametrize("lang, name", all_chapters())
def test_headings_are_numbered_by_chapter_and_depth(lang, name):
    number = str(int(name[:2]))
    found = headings(chapter(lang, name))
    assert found and found[0][0] == "#" and sum(level == "#" for level, _ in found) == 1, \
        f"{lang}/{name}: one '# {number}. Title' heading, first"
    for level, title in found:
        m = re.match(r"(\d+(?:\.\d+)*)[ .]", title)
        assert m, f"{lang}/{name}: heading '{title}' does not start with its number"
        parts = m.group(1).split(".")
        assert parts[0] == number and len(parts) == len(level), \
            f"{lang}/{name}: heading '{title}' should be numbered {number}.x with {len(level)} parts"


def structure(lang, name):
    text = chapter(lang, name)
    heads = [(level, re.match(r"[\d.]+", title).group().rstrip(".")) for level, title in headings(text)]
    refs = {number: sorted(set(references(body))) for number, body in sections(text).items()}
    kinds = [(kind, arg if kind in ("python excerpt",) else None) for kind, arg, *_ in blocks(text)
             if kind != "text"]
    commands = [(kind, commands_of(body)) for kind, _, body, *_ in blocks(text) if kind in ("bash runnable", "bash")]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    return heads, refs, kinds, commands, images


@pytest.mark.parametrize("name", CHAPTERS)
def test_both_languages_have_the_same_headings_references_blocks_and_commands(name):
    en, zh = structure("en", name), structure("zh", name)
    what = ("headings", "code references per section", "checked code blocks", "shell commands", "images")
    for label, a, b in zip(what, en, zh):
        assert a == b, f"{name}: en and zh differ in their {label}"


# ---------------------------------------------------------------------------------------------
# Code references resolve


@lru_cache(maxsize=None)
def syntax_tree(path):
    return ast.parse(read(path), filename=path)


def statements(body):
    """Statements of a body, looking into if/for/while/with/try blocks but not into nested defs."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from statements(getattr(node, field, []) or [])


def assigned_names(node):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    for target in targets:
        for t in ast.walk(target):
            if isinstance(t, ast.Name):
                yield t.id


def member(scope, name):
    """The def/class named `name` in scope (a module, class or function), or True for a variable,
    a class attribute, `self.name = ...` in a method, or a buffer registered under that name."""
    for node in statements(scope.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if name in assigned_names(node):
            return True
    if isinstance(scope, ast.ClassDef):
        for node in ast.walk(scope):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == name \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                return True
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register_buffer" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == name:
                return True
    return None


def resolve(path, dotted):
    if not os.path.isfile(os.path.join(ROOT, path)):
        return False
    scope = syntax_tree(path)
    for part in dotted.split("."):
        if not hasattr(scope, "body"):
            return False
        scope = member(scope, part)
        if scope is None:
            return False
    return True


def test_reference_resolver_finds_real_symbols_and_rejects_missing_ones():
    assert resolve("model.py", "CausalSelfAttention.forward")
    assert resolve("model.py", "CausalSelfAttention.causal_mask")  # a registered buffer
    assert resolve("model.py", "MLP.gelu") and resolve("train.py", "get_lr") and resolve("train.py", "run.scaler")
    assert resolve("config/shakespeare_char_cpu.py", "n_embd")
    assert not resolve("model.py", "CausalSelfAttention.nope") and not resolve("model.py", "GPT.forward.x.y")
    assert not resolve("nope.py", "GPT")


@pytest.mark.parametrize("lang, name", all_chapters())
def test_every_code_reference_resolves(lang, name):
    text = chapter(lang, name)
    missing = [f"{path}: {dotted}" for path, dotted in references(text) if not resolve(path, dotted)]
    assert not missing, f"{lang}/{name} references code that does not exist: {missing}"
    files = re.findall(r"`((?:[\w-]+/)*[\w-]+\.py)`", prose(text))
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), \
        f"{lang}/{name} names missing files: {[f for f in files if not os.path.isfile(os.path.join(ROOT, f))]}"


@pytest.mark.parametrize("lang, name", all_chapters())
def test_no_line_numbers_and_links_resolve(lang, name):
    text = chapter(lang, name)
    assert not re.search(r"\blines? \d+|第\s*\d+\s*(?:[-–~]\s*\d+\s*)?行|\.py:\d+|#L\d+", prose(text)), \
        f"{lang}/{name}: point at symbols, not line numbers"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(text)):
        if "://" in target:
            continue
        path = os.path.normpath(os.path.join(ROOT, "docs", lang, target))
        assert os.path.exists(path), f"{lang}/{name} links to {target}, which does not exist"
        if target.endswith(".png"):
            assert os.path.getsize(path) < 200_000, f"{target} is over 200 KB"


@pytest.mark.parametrize("lang, name", all_chapters())
def test_every_code_block_says_what_it_is(lang, name):
    text = chapter(lang, name)
    previous_end, previous_kind = None, None
    for kind, arg, body, start, end in blocks(text):
        assert kind, f"{lang}/{name}: a ```{arg} block; use one of {BLOCK_KINDS}"
        if kind == "text output":
            assert previous_kind == "python runnable" and not text[previous_end:start].strip(), \
                f"{lang}/{name}: a 'text output' block must follow a 'python runnable' block directly"
        previous_end, previous_kind = end, kind


# ---------------------------------------------------------------------------------------------
# Code excerpts are still in the code


def squeeze(text):
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("lang, name", all_chapters())
def test_code_excerpts_still_appear_in_the_code(lang, name):
    for kind, path, body, *_ in blocks(chapter(lang, name)):
        if kind != "python excerpt":
            continue
        source, position = squeeze(read(path)), 0
        for piece in re.split(r"^\s*\.\.\.\s*$", body, flags=re.M):  # a '...' line elides code
            if not piece.strip():
                continue
            found = source.find(squeeze(piece), position)
            assert found >= 0, f"{lang}/{name}: this excerpt is no longer in {path}:\n{piece}"
            position = found + len(squeeze(piece))


# ---------------------------------------------------------------------------------------------
# Python examples run, and print what the docs say they print


def python_examples(lang, name):
    """[(code, expected output or None)] of the chapter's 'python runnable' blocks."""
    found = blocks(chapter(lang, name))
    examples = []
    for i, (kind, _, body, *_) in enumerate(found):
        if kind == "python runnable":
            follows = found[i + 1] if i + 1 < len(found) else None
            expected = follows[2] if follows and follows[0] == "text output" else None
            examples.append((body, expected))
    return examples


def code_tokens(source):
    """The code without its comments, so the languages may comment their examples differently."""
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


def run_example(code):
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)
    return out.getvalue()


def normalise_output(text):
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("name", CHAPTERS)
def test_python_examples_run_and_print_what_the_docs_show(name):
    en, zh = python_examples("en", name), python_examples("zh", name)
    assert len(en) == len(zh), f"{name}: en has {len(en)} python examples, zh {len(zh)}"
    for (code, expected), (zh_code, zh_expected) in zip(en, zh):
        assert code_tokens(code) == code_tokens(zh_code), f"{name}: the zh example differs from en:\n{zh_code}"
        printed = normalise_output(run_example(code))
        for shown in (expected, zh_expected):
            if shown is not None:
                assert printed == normalise_output(shown), \
                    f"{name}: the example prints\n{printed}\nbut the docs show\n{shown}\nfor\n{code}"


# ---------------------------------------------------------------------------------------------
# Shell commands: every one is checked; the runnable ones are run with tiny settings


def script_and_args(argv):
    """('train.py', [args]) for `python train.py ...` or `torchrun ... train.py ...`, else (None, argv)."""
    _, argv = split_variables(argv)  # environment variables in front
    if argv and argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if argv and argv[0] == "torchrun":
        scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
        if scripts:
            return argv[scripts[0]], argv[scripts[0] + 1:]
    return None, argv


def check_command(argv):
    """Static checks for a command the tests do not run: its script, config and flags exist. In a pipeline
    (`printf ... | python generate.py ...`) each command is checked."""
    if "|" in argv:
        cut = argv.index("|")
        check_command(argv[:cut])
        check_command(argv[cut + 1:])
        return
    if argv[0] in ("printf", "echo"):
        return
    script, args = script_and_args(argv)
    if script is None:
        assert argv[0] in ("pip", "python", "python3", "torchrun", "nvidia-smi", "ls", "cat", "head", "du"), \
            f"unexpected command {argv}"
        return
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script} does not exist"
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        if script == "train.py":
            from machinery import configurator
            import train
            config = load_config(train.DEFAULTS, args)
            configurator.check_train_config(config)
            if argv[0] == "torchrun":  # train.py refuses accumulation steps that processes cannot share
                flags = dict(a[2:].split("=", 1) for a in argv[:argv.index(script)] if a.startswith("--") and "=" in a)
                processes = int(flags.get("nproc_per_node", 1)) * int(flags.get("nnodes", 1))
                assert config["gradient_accumulation_steps"] % processes == 0, \
                    f"`{shlex.join(argv)}`: gradient_accumulation_steps must be divisible by {processes} processes"
        elif script == "generate.py":
            import generate
            generate.parse_args(args)
        elif script == "lens.py":
            import lens
            lens.parse_args(args)
    except UsageError as e:
        raise AssertionError(f"`{shlex.join(argv)}` is wrong: {e}")
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("lang, name", all_chapters())
def test_shell_commands_name_existing_scripts_configs_and_keys(lang, name):
    for kind, _, body, *_ in blocks(chapter(lang, name)):
        if kind in ("bash", "bash runnable"):
            for argv in commands_of(body):
                check_command(argv)


# What the runnable commands get appended, so that each takes seconds: real configs and scripts,
# a tiny corpus, a few iterations.
TINY_TAIL = {
    "train.py": ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--device=cpu",
                 "--dtype=float32", "--compile=False", "--data_dir=data"],
    "generate.py": ["--max_new_tokens=12", "--device=cpu"],
}


def sandbox(tmp_path):
    """A folder like a fresh checkout: config/, a tiny data/shakespeare_char and my.txt."""
    from data import prepare
    os.symlink(os.path.join(ROOT, "config"), tmp_path / "config")
    (tmp_path / "my.txt").write_text(CORPUS, encoding="utf-8")
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text(CORPUS, encoding="utf-8")
    prepare(str(folder / "input.txt"), str(folder), "char", "input.txt")
    return tmp_path


def runnable_commands(lang, name):
    return [argv for kind, _, body, *_ in blocks(chapter(lang, name)) if kind == "bash runnable"
            for argv in commands_of(body)]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CHAPTERS if runnable_commands("en", name)])
def test_runnable_commands_run(name, tmp_path):
    """Every `bash runnable` command of a chapter, in order, in one sandbox (zh has the same ones)."""
    folder = sandbox(tmp_path)
    for argv in runnable_commands("en", name):
        variables, command = split_variables(argv)
        launcher = command[0] if command else None
        script, args = script_and_args(argv)
        assert script and launcher in ("python", "python3"), f"{name}: only `python script.py` commands can be runnable"
        result = run_script(script, *args, *TINY_TAIL.get(script, []), cwd=folder, env=variables)
        assert result.returncode == 0, f"{name}: `{shlex.join(argv)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_runnable_commands_are_tinied_not_rewritten():
    """The sandbox changes only what the tail overrides; the rest of each command runs as written."""
    tail_keys = {arg.split("=")[0] for arg in TINY_TAIL["train.py"]}
    assert tail_keys <= {f"--{k}" for k in train_defaults()}
    assert not tail_keys & {"--learning_rate", "--n_layer", "--n_embd", "--dropout", "--batch_size"}


@pytest.mark.parametrize("name", CHAPTERS)
def test_plotted_experiments_show_the_image_their_command_writes(name):
    for lang in LANGS:
        text = chapter(lang, name)
        for number, body in sections(text).items():
            for kind, _, block, *_ in blocks(body):
                if kind != "bash runnable":
                    continue
                for argv in commands_of(block):
                    script, args = script_and_args(argv)
                    if script != "plot.py":
                        continue
                    out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
                    if out is None:
                        continue  # a plot next to its run, not shown in the docs
                    assert out.startswith("docs/img/"), f"{lang}/{name} {number}: plot into docs/img/"
                    assert os.path.isfile(os.path.join(ROOT, out)), f"{out} is missing: run the experiment"
                    assert f"](../{out[len('docs/'):]})" in body, f"{lang}/{name} {number} does not show {out}"


# ---------------------------------------------------------------------------------------------
# Numbers the docs state, recomputed from the code

TINY_SHAKESPEARE_CHARS = 65  # the vocabulary of the char recipes on tiny Shakespeare


@pytest.mark.parametrize("lang", LANGS)
def test_configuration_chapter_lists_every_key_with_its_default(lang):
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", chapter(lang, "01-configuration.md"), flags=re.M)
    documented = {key: parse_value(value) for key, value in rows}
    defaults = train_defaults()
    assert len(rows) == len(documented), f"{lang}: a key is listed twice"
    assert not defaults.keys() - documented.keys(), \
        f"docs/{lang}/01-configuration.md 1.2 lacks {sorted(defaults.keys() - documented.keys())}: add a row in both languages"
    assert documented == defaults


def recipe_model(path):
    """The GPT a shipped recipe builds (on the meta device: shapes only, no memory), and its config."""
    import torch

    import train
    from machinery.sources import KNOWN_DATASETS
    from model import GPT, GPTConfig
    config = load_config(train.DEFAULTS, [os.path.join(ROOT, path)])
    vocab = TINY_SHAKESPEARE_CHARS if KNOWN_DATASETS[config["dataset"]] == "char" else 50257
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                              block_size=config["block_size"], vocab_size=vocab, bias=config["bias"]))
    return model, config, vocab


@pytest.mark.parametrize("lang", LANGS)
def test_parameter_and_memory_table_matches_the_code(lang):
    rows = re.findall(r"^\| `(config/\w+\.py)` \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) MB \| ([\d.]+) MB \|$",
                      chapter(lang, "01-configuration.md"), flags=re.M)
    assert {path for path, *_ in rows} == {"config/shakespeare_char_cpu.py", "config/shakespeare_char.py",
                                           "config/shakespeare.py"}
    for path, params, tensors, state_mb, activation_mb in rows:
        model, c, vocab = recipe_model(path)
        total = sum(p.numel() for p in model.parameters())
        activations = 4 * c["batch_size"] * c["block_size"] * (16 * c["n_layer"] * c["n_embd"] + 2 * c["n_embd"] + vocab)
        # weights and grads, 4 bytes each, plus the optimizer's state: Muon keeps one buffer, AdamW two
        optimizers = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "meta", optimizer=c["optimizer"])
        state = sum((4 if type(o).__name__ == "Muon" else 8) * p.numel()
                    for o in optimizers for g in o.param_groups for p in g["params"])
        assert (params, tensors) == (f"{model.num_params():,}", f"{total:,}"), path
        assert (state_mb, activation_mb) == (f"{(8 * total + state) / 1e6:.1f}", f"{activations / 1e6:.1f}"), path


@pytest.mark.parametrize("lang", LANGS)
def test_recipe_table_matches_the_config_files(lang):
    text = sections(chapter(lang, "01-configuration.md"))["1.3"]
    cells = {re.sub(r"`", "", row[0]).strip(): [c.strip() for c in row[1:]]
             for row in (line.strip("|").split("|") for line in text.splitlines() if line.startswith("| "))}
    header = next(v for k, v in cells.items() if "shakespeare_char_cpu" in "".join(v))
    paths = [re.sub(r"`", "", h) for h in header]
    for i, path in enumerate(paths):
        _, c, _ = recipe_model(path)
        shape = next(v for k, v in cells.items() if k.startswith("n_layer"))[i]
        assert shape == f"{c['n_layer']} x {c['n_head']} x {c['n_embd']}", path
        for key in ("block_size", "batch_size", "dropout", "beta2"):
            assert parse_value(next(v for k, v in cells.items() if k == key)[i]) == c[key], (path, key)
        lr = next(v for k, v in cells.items() if k.startswith("learning_rate"))[i].split("->")
        assert [float(x) for x in lr] == [c["learning_rate"], c["min_lr"]], path
        steps = next(v for k, v in cells.items() if k.startswith("warmup_iters"))[i].split(",")
        assert [int(x) for x in steps] == [c["warmup_iters"], c["max_iters"]], path
        evals = next(v for k, v in cells.items() if k.startswith("eval_interval"))[i].split(",")
        assert [int(x) for x in evals] == [c["eval_interval"], c["eval_iters"]], path


@pytest.mark.parametrize("lang", LANGS)
def test_dataset_split_figures_follow_the_train_fraction(lang):
    """The measured token counts of tiny Shakespeare are consistent with data.py's 90/10 split."""
    from machinery.preparation import TRAIN_FRACTION
    rows = re.findall(r"^\| `(char|gpt2)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", chapter(lang, "02-data.md"), flags=re.M)
    assert [kind for kind, *_ in rows] == ["char", "gpt2"]
    for kind, total, train, val in rows:
        total, train, val = (int(n.replace(",", "")) for n in (total, train, val))
        assert train == int(total * TRAIN_FRACTION) and train + val == total, kind


def test_the_uniform_guess_losses_the_docs_quote_are_ln_v():
    assert f"{math.log(65):.2f}" == "4.17" and f"{math.log(50257):.2f}" == "10.82"
    for lang in LANGS:
        text = chapter(lang, "00-knowledge-map.md") + chapter(lang, "02-data.md")
        assert "`ln 65 = 4.17`" in text and "`ln 50257 = 10.82`" in text and "| 4.17 | 10.82 |" in text


# ---------------------------------------------------------------------------------------------
# Exercises, and the lines of train.py's output that the docs quote

EXERCISES = {"en": "Exercises", "zh": "练习"}


@pytest.mark.parametrize("lang, name", all_chapters())
def test_each_chapter_ends_with_three_to_five_exercises_with_answers(lang, name):
    text = chapter(lang, name)
    last = [title for level, title in headings(text) if level == "##"][-1]
    assert last.endswith(EXERCISES[lang]), f"{lang}/{name}: the last section should be '{EXERCISES[lang]}'"
    number = last.split()[0]
    exercises = {n: body for n, body in sections(text).items() if n.startswith(number + ".")}
    assert 3 <= len(exercises) <= 5, f"{lang}/{name}: {len(exercises)} exercises"
    for n, body in exercises.items():
        answer = re.search(r"<details><summary>[^<]+</summary>\n(.*?)</details>", body, flags=re.S)
        assert answer and answer.group(1).strip(), f"{lang}/{name} {n}: no answer in a <details> block"
        assert body[:answer.start()].strip(), f"{lang}/{name} {n}: the question comes before the answer"


FURTHER_READING = {"en": "Further reading", "zh": "延伸阅读"}


@pytest.mark.parametrize("lang, name", all_chapters())
def test_each_chapter_has_further_reading_with_links_just_before_its_exercises(lang, name):
    text = chapter(lang, name)
    titles = [title for level, title in headings(text) if level == "##"]
    assert titles[-2].endswith(FURTHER_READING[lang]), f"{lang}/{name}: the section before the exercises should be " \
                                                       f"'{FURTHER_READING[lang]}', not {titles[-2]!r}"
    reading = sections(text)[titles[-2].split()[0]]
    links = re.findall(r"\]\((https?://[^)\s]+)\)", reading)
    assert len(links) >= 2, f"{lang}/{name}: further reading lists {len(links)} linked works"


NUMBER = r"-?(?:\d[\d,]*)?\.?\d+(?:e[+-]\d+)?"


TRAIN_SPEAKERS = ("train.py", "machinery/health.py", "machinery/metrics.py", "machinery/speed.py",
                  "machinery/evaluation.py", "machinery/run_folder.py", "machinery/checkpoint.py", "machinery/bands.py")


def train_output_patterns():
    """Regexes of the lines train.py prints: its log line (metrics.py: format_log) in every variant, with any
    numbers, and each other f-string that starts with words, in train.py and the modules that speak for it."""
    import itertools

    from machinery import metrics
    patterns = []
    for mfu, clipped, ratio, scale in itertools.product((None, 0.5), (False, True), (None, -2.5), (None, 1024.0)):
        entry = {"iter": 10, "loss": 2.5, "lr": 1e-3, "ms_per_iter": 50.0, "tokens_per_s": 15000.0, "mfu": mfu,
                 "grad_norm": 1.5, "clipped": clipped, "update_ratio_log10": None if ratio is None else {"all": ratio},
                 "skipped_steps": 0, "loss_scale": scale}
        pieces = re.split(f"({NUMBER})", metrics.format_log(entry))
        patterns.append("".join(NUMBER if i % 2 else re.escape(p) for i, p in enumerate(pieces)))
    for node in (n for f in TRAIN_SPEAKERS for n in ast.walk(syntax_tree(f))):
        if isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):  # lines that start with words
            patterns.append("".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".+?" for v in node.values))
    return patterns


QUOTED_OUTPUT = re.compile(r"(iter \d+:|eval \d+:|warning: |loss [\d.]+ on one batch|done: )")


def test_the_output_pattern_tells_real_lines_from_wrong_ones():
    patterns = train_output_patterns()
    matches = lambda line: any(re.fullmatch(p, line) for p in patterns)
    assert matches("iter 50: loss 2.9617, lr 4.95e-04, 51.3 ms/iter, 14,979 tok/s, mfu 72.4% | grad norm 1.552 (clipped), update -2.50")
    assert matches("eval 300: train loss 2.3693, val loss 2.3870")
    assert not matches("iter 50: loss 2.9617, lr 4.95e-04 | grad norm 1.552, ratio -2.50")
    assert not matches("eval 300: loss 2.3693")


@pytest.mark.parametrize("lang, name", all_chapters())
def test_quoted_train_output_has_a_format_train_py_prints(lang, name):
    patterns = train_output_patterns()
    for kind, _, body, *_ in blocks(chapter(lang, name)):
        if kind != "text":
            continue
        for line in body.splitlines():
            if QUOTED_OUTPUT.match(line):
                assert any(re.fullmatch(p, line) for p in patterns), \
                    f"{lang}/{name}: train.py prints no line like this one:\n{line}"
