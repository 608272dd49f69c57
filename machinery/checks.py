"""
Hostile input, checked at the boundary, one place per kind, each failure one UsageError that names the
input and the fix:

- numbers: finite and within the range that PyTorch and the OS accept (argparse types for flags:
  `integer`, `real`; `number` for a value from a config file or a request);
- names: a dataset name is one folder name that cannot climb out of data_dir (`folder_name`);
- text files: UTF-8, or one line naming the file (`read_utf8`);
- metadata read from disk (meta.json, a checkpoint's JSON): each field's type and range checked before use
  (`fields`).

Paths that cannot be written (a full disk, a read-only folder, a parent that is a file) are faults.py's.
"""

import argparse
import math
import os

from machinery.cli import UsageError

SEED_RANGE = (0, 2 ** 64 - 1)  # torch.manual_seed and torch.Generator.manual_seed take these (and negatives)
PORT_RANGE = (0, 2 ** 16 - 1)  # 0: the OS picks a free port
LARGEST_INT = 2 ** 63 - 1  # a size beyond PyTorch's int64 cannot even be asked for
MIN_TEMPERATURE = 1e-6  # above 0 (greedy) but below this, logits / temperature overflow: NaN probabilities


def number(name, value, low=None, high=None, integer=False):
    """value, if it is a finite number (an int when integer) within [low, high]; else one UsageError."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UsageError(f"{name} must be {kind}{within(low, high)}, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number{within(low, high)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{name} must be {kind}{within(low, high)}, got {value!r}")
    return value


def within(low, high):
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" of at least {low}"
    return f" of at most {high}" if high is not None else ""


def integer(low=None, high=None):
    """An argparse type: a whole number within [low, high] (its error is one line naming the flag); no
    more than LARGEST_INT in any case."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number{within(low, high)}, got {text!r}")
        if high is None and value > LARGEST_INT:
            raise argparse.ArgumentTypeError(f"must be a whole number of at most {LARGEST_INT}, got {text!r}")
        return checked(value, low, high, integer=True)
    parse.__name__ = "integer"
    return parse


def real(low=None, high=None, low_open=False):
    """An argparse type: a finite number within [low, high] ((low, high] with low_open)."""
    span = f" in ({low}, {high}]" if low_open else within(low, high)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number{span}, got {text!r}")
        if not math.isfinite(value) or (low_open and value <= low) or (low is not None and value < low) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number{span}, got {text!r}")
        return value
    parse.__name__ = "real"
    return parse


def temperature(text):
    """An argparse type: 0 (greedy), or a finite number of at least MIN_TEMPERATURE."""
    value = real(0)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {text!r}: the "
                                         "logits divided by less overflow")
    return value


def checked(value, low, high, integer=False):
    try:
        return number("it", value, low, high, integer)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("it "))


def pathname(text):
    """An argparse type for a path: not empty, and no NUL character (which no file name can hold)."""
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"must be a path (not empty, no NUL character), got {text!r}")
    return text


def writable_folder(folder, what):
    """folder, if it is a folder that can be written, or one that can be made: its nearest existing ancestor
    is a folder this process may write into. (A write that still fails, a full disk say, is faults.py's.)"""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{what} '{folder}' cannot be made: '{existing}' is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} '{folder}' cannot be written ('{existing}' is not writable); choose another path")
    return folder


def folder_name(name, what="--name"):
    """A name that is one folder inside its parent: not empty, no path separator, not '.' or '..', no
    control characters, at most 255 bytes: so parent/name can never be somewhere else."""
    separators = {"/", os.sep, os.altsep} - {None}
    if (not name or name in (".", "..") or any(s in name for s in separators)
            or any(ord(c) < 32 for c in name) or len(os.fsencode(name)) > 255):
        raise UsageError(f"{what} must be a plain folder name (letters, digits, '-', '_' ...; no '/', not '..', "
                         f"not empty), got {name!r}; the dataset goes to <data_dir>/<name>/")
    return name


def shown(path):
    """A path as UTF-8 text: the same string when it is UTF-8, else with its other bytes replaced (Linux
    allows any bytes in a name; PyTorch, the Hugging Face libraries and fonts take only UTF-8)."""
    return os.fsencode(path).decode("utf-8", "replace")


def read_utf8(path, what):
    """The text of a file that must be UTF-8, or one UsageError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    except OSError as e:
        raise UsageError(f"cannot read {what} '{path}' ({e.strerror or e})")


def fields(record, spec, what, fix):
    """record (a dict read from disk), if every field of spec has the type and range spec gives:
    {field: (type or tuple of types, low, high)}; low/high apply to numbers and to the length of a list."""
    if not isinstance(record, dict):
        raise UsageError(f"{what} is not a JSON object; {fix}")
    for field, (kind, low, high) in spec.items():
        value = record.get(field)
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in as_tuple(kind))
        size = len(value) if isinstance(value, (list, str)) else value
        if ok and isinstance(size, (int, float)) and not isinstance(size, bool):
            ok = math.isfinite(size) and (low is None or size >= low) and (high is None or size <= high)
        if not ok:
            raise UsageError(f"{what}: '{field}' is {value!r}, not {describe(kind)}{within(low, high)}; {fix}")
    return record


def as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def describe(kind):
    return " or ".join({int: "a whole number", float: "a number", str: "a string", bool: "true/false",
                        list: "a list", dict: "an object"}.get(k, k.__name__) for k in as_tuple(kind))
