"""
Reads training settings: train.py's defaults, then a config file, then --key=value overrides.

A config file is Python, but it is parsed, not run: each statement must be `name = literal`
(numbers, strings, booleans, None, lists/tuples/dicts of those). Overrides are parsed the same
way. So reading a config can never execute code, and every mistake is reported as one line.
"""

import ast
import io
import os
import tokenize

from machinery.checks import LARGEST_INT, SEED_RANGE, folder_name, number, read_utf8
from machinery import nanogpt
from machinery.cli import UsageError, closest


def literal_assignments(source, filename):
    """{name: value} for a source made only of `name = literal` statements."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise UsageError(f"{filename}:{e.lineno}: not valid Python ({e.msg})")
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UsageError(f"{filename}:{node.lineno}: only `name = value` lines are allowed in a config")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise UsageError(f"{filename}:{node.lineno}: the value of '{node.targets[0].id}' must be "
                             "a literal (a number, string, True/False/None, or a list of those)")
    return values


def parse_value(text):
    """'3e-4' -> 3e-4, 'True' -> True, 'out-x' -> 'out-x' (a bare word is a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(key, value, default, source):
    """Return value if it has the default's type (an int is accepted where a float is expected)."""
    if default is None or (default == "auto" and isinstance(value, bool)):
        return value  # an 'auto' setting also takes an explicit True/False
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(f"{source}: '{key}' must be {type(default).__name__} like {default!r}, "
                         f"got {value!r}")
    return value


def load_config(defaults, argv, base=None):
    """defaults + config files (arguments not starting with --) + flags, each on top of the last. A flag
    is --key=value or --key value; a bare --key means True for a boolean (or 'auto') setting. --help
    (or -h) prints every setting with its default and meaning, and exits. base: the values to start from
    instead of the defaults (a resumed run's own settings); keys and types are still the defaults'."""
    if "--help" in argv or "-h" in argv:
        print(train_help())
        raise SystemExit(0)
    config = dict(base or defaults)
    for source, updates in arguments(argv, defaults):
        for key, value in updates.items():
            if key not in defaults:
                raise UsageError(f"unknown config key '{key}' in {source}{closest(key, list(defaults))}")
            config[key] = check_type(key, value, defaults[key], source)
    return config


def load_train_config(defaults, argv):
    """train.py's settings: load_config, then the values that have the right type but cannot work. A resumed
    run (init_from='resume', read from the command first) starts from its checkpoint's own settings
    instead of the defaults (resumed_settings), so that --init_from=resume --out_dir=RUN alone continues
    it; config files and flags still go on top, and checkpoint.py: check_resumable refuses what cannot
    change."""
    config = load_config(defaults, argv)
    if config["init_from"] == "resume":
        config = load_config(defaults, argv, base=resumed_settings(defaults, config["out_dir"]))
    check_train_config(config)
    return config


# where and how this command runs, never taken from the checkpoint being resumed
NOT_RESUMED = ("out_dir", "init_from", "replace_earlier_run", "eval_only", "inspect")


def resumed_settings(defaults, out_dir):
    """The defaults, overlaid with the settings saved in out_dir/ckpt.pt (its JSON meta: the run's config, and
    the model's shape from model_args). Keys this code does not know, or of another type (a checkpoint of
    another version or program), are left at their defaults."""
    from machinery.checkpoint import load_checkpoint  # (reads the JSON; the tensors stay on disk)
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"cannot resume: checkpoint '{path}' not found; name the run's folder with "
                         "--out_dir=RUN (a folder holding ckpt.pt), or train first")
    _, meta = load_checkpoint(path)
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    shape = {k: v for k, v in meta["model_args"].items() if k != "vocab_size"}  # (the dataset gives the vocabulary)
    settings = dict(defaults)
    kept = NOT_RESUMED + (nanogpt.MACHINE_SETTINGS if meta.get("nanogpt") else ())
    for key, value in {**saved, **shape}.items():
        if key in defaults and key not in kept:
            try:
                settings[key] = check_type(key, value, defaults[key], path)
            except UsageError:
                pass
    return settings


def arguments(argv, defaults):
    """(source, {key: value}) for each config file and flag of argv, in order."""
    i = 0
    while i < len(argv):
        arg, following = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        i += 1
        if not arg.startswith("--"):
            yield arg, read_config_file(arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if sep:
            yield f"--{key}", {key: parse_value(text)}
        elif key not in defaults:
            raise UsageError(f"unknown config key '{key}' in {arg}{closest(key, list(defaults))}")
        elif takes_value(defaults[key], following):
            yield f"--{key}", {key: parse_value(following)}
            i += 1
        elif isinstance(defaults[key], bool) or defaults[key] == "auto":
            yield f"--{key}", {key: True}  # a bare switch
        else:
            raise UsageError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE (default {defaults[key]!r})")


def takes_value(default, following):
    """Whether the argument after a bare --key is its value: not when there is none, or it is another
    flag, or the key is a boolean and it is no boolean (then it is a config file after a switch)."""
    if following is None or following.startswith("--"):
        return False
    return not isinstance(default, bool) or isinstance(parse_value(following), bool)


def read_config_file(path):
    if os.path.isdir(path):
        raise UsageError(f"'{path}' is a folder, not a config file; name one file in it, such as "
                         "config/shakespeare_char_cpu.py")
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found (see config/ for the shipped ones){nanogpt.instead(path)}")
    return literal_assignments(read_utf8(path, "config file"), path)


TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def defaults_block():
    """The source of train.py's defaults block, from '# -- defaults --' to '# -- end of defaults --'."""
    with open(TRAIN_PY, encoding="utf-8") as f:
        source = f.read()
    return source[source.index("# -- defaults --"):source.index("# -- end of defaults --")]


def train_defaults():
    """train.py's defaults, read from its source without running it (for docs, tests, bench.py)."""
    return literal_assignments(defaults_block(), "train.py")


def documented_defaults():
    """[(heading, key, default, meaning)] of train.py's defaults block, in its order: the `# heading` lines
    and the comment after each value are the help text, so that --help and the block never disagree. An
    indented comment line continues the meaning above it (the block keeps to 100 characters a line)."""
    source = defaults_block()
    values = train_defaults()
    keys = {node.lineno: node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)}
    comments = {token.start[0]: (token.string.lstrip("#").strip(), token.start[1] > 0)
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    rows, heading = [], ""
    for line in sorted(set(keys) | set(comments)):
        text, indented = comments.get(line, ("", False))
        if line in keys:
            rows.append((heading, keys[line], values[keys[line]], text))
        elif indented and rows:  # a continuation of the meaning above
            rows[-1] = (*rows[-1][:3], f"{rows[-1][3]} {text}")
        elif not text.startswith("--"):  # (not the block's own marker)
            heading = text
    return rows


def train_help():
    """What train.py --help prints: how to pass settings, then every setting, its default and meaning."""
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value | --key value | --switch ...]", "",
             "Train a GPT. Settings: the defaults below, then each config file (config/*.py, `name = value`",
             "lines), then each flag. A bare --switch means True for a True/False setting.", ""]
    heading = None
    for section, key, default, meaning in documented_defaults():
        if section != heading:
            title = section if ":" in section else f"{section}:"
            lines += ["", title] if heading is not None else [title]
            heading = section
        lines.append(f"  --{key:<28} {default!r:<20} {meaning}".rstrip())
    return "\n".join(lines)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INIT_CHOICES = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def check_train_config(c):
    """Values that have the right type but cannot work, reported before anything is built."""
    number("'seed'", c["seed"], *SEED_RANGE, integer=True)
    for key, value in c.items():  # every number finite, and a size PyTorch could be asked for
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number(f"'{key}'", value, -LARGEST_INT, LARGEST_INT, integer=isinstance(value, int))
        if isinstance(value, str) and "\x00" in value:  # no path or name can hold one
            raise UsageError(f"'{key}' holds a NUL character: {value!r}")
    folder_name(c["dataset"], "dataset")
    positive = ("eval_interval", "log_interval", "monitor_interval", "eval_iters", "gradient_accumulation_steps",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_bad_steps")
    for key in positive:
        if c[key] < 1:
            raise UsageError(f"'{key}' must be at least 1, got {c[key]}")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "patience", "weight_decay", "grad_clip", "min_lr",
                "keep_last_n"):
        if c[key] < 0:
            raise UsageError(f"'{key}' must not be negative, got {c[key]}")
    if c["n_embd"] % c["n_head"]:
        raise UsageError(f"n_embd ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")
    if not 0.0 <= c["dropout"] < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {c['dropout']}")
    if c["learning_rate"] <= 0:
        raise UsageError(f"learning_rate must be positive, got {c['learning_rate']}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= c[key] < 1.0:
            raise UsageError(f"{key} must be in [0, 1), got {c[key]}")
    if c["optimizer"] not in ("adamw", "muon"):
        raise UsageError(f"optimizer must be 'adamw' or 'muon', got {c['optimizer']!r}"
                         f"{closest(c['optimizer'], ['adamw', 'muon'])}")
    if c["attention"] not in ("sdpa", "explicit"):
        raise UsageError(f"attention must be 'sdpa' or 'explicit', got {c['attention']!r}")
    if c["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
    if c["compile_mode"] not in COMPILE_MODES:
        raise UsageError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {c['compile_mode']!r}"
                         f"{closest(c['compile_mode'], COMPILE_MODES)}")
    for key in ("compile", "snapshots"):
        if c[key] not in (True, False, "auto"):
            raise UsageError(f"{key} must be True, False or 'auto', got {c[key]!r}")
    if c["backend"] not in ("auto", "nccl", "gloo"):
        raise UsageError(f"backend must be 'auto', 'nccl' or 'gloo', got {c['backend']!r}")
    init = c["init_from"]
    if init not in INIT_CHOICES and not os.path.isdir(init):
        raise UsageError(f"init_from must be one of {', '.join(INIT_CHOICES)} or a Hugging Face model "
                         f"directory, got {init!r}{closest(init, INIT_CHOICES)}")
