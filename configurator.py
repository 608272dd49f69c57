"""
Reads training settings: train.py's defaults, then a config file, then --key=value overrides.

A config file is Python, but it is parsed, not run: each statement must be `name = literal`
(numbers, strings, booleans, None, lists/tuples/dicts of those). Overrides are parsed the same
way. So reading a config can never execute code, and every mistake is reported as one line.
"""

import argparse
import ast
import difflib
import os


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line and exit with status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_cli(main, interrupted_hint=""):
    """Run main() as a command-line tool: a UsageError is one line on stderr and exit status 2; Ctrl-C
    (SIGINT) or SIGTERM is one line and exit status 130 or 143, after the `finally` blocks on the way
    have removed what was half-written. interrupted_hint: what to do next, said on that line."""
    import signal
    import sys
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        newline = "\n" if sys.stderr.isatty() else ""  # after the ^C (or a progress bar) on the terminal
        print(f"{newline}interrupted by {signal.Signals(signum).name}{'; ' if interrupted_hint else ''}"
              f"{interrupted_hint}", file=sys.stderr)
        sys.exit(128 + signum)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one UsageError line rather than usage text plus an error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


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


def closest(name, names):
    """' (did you mean 'x'?)' for the nearest valid spelling, or '' when nothing is close."""
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_type(key, value, default, source):
    """Return value if it has the default's type (an int is accepted where a float is expected)."""
    if default is None or value is None or (default == "auto" and isinstance(value, bool)):
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


def load_config(defaults, argv):
    """defaults + optional config file (first argument not starting with --) + --key=value."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if os.path.isdir(arg):
                raise UsageError(f"'{arg}' is a folder, not a config file; name one file in it, such as "
                                 "config/shakespeare_char_cpu.py")
            if not os.path.isfile(arg):
                raise UsageError(f"config file '{arg}' not found (see config/ for the shipped ones)")
            with open(arg, encoding="utf-8") as f:
                updates = literal_assignments(f.read(), arg)
            source = arg
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UsageError(f"argument '{arg}' must look like --{key}=value")
            updates, source = {key: parse_value(text)}, f"--{key}"
        for key, value in updates.items():
            if key not in defaults:
                raise UsageError(f"unknown config key '{key}' in {source}{closest(key, list(defaults))}")
            config[key] = check_type(key, value, defaults[key], source)
    return config


def train_defaults():
    """train.py's defaults, read from its source without running it (for docs, tests, bench.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    start = source.index("# -- defaults --")
    end = source.index("# -- end of defaults --")
    return literal_assignments(source[start:end], "train.py")
