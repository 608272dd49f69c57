"""
The records behind the docs' measured figures (records/README.md says the format): one small JSON file per
measurement, with the command, commit, machine and date that made it, its values ("data") and where the
docs quote them ("quoted": format strings over data, each to appear verbatim in its doc).

    write_record(name, what, command, data, quoted)   # what a measuring script calls at its end
    python docs/record.py                             # check every record against the docs, count the figures

tests/test_records.py runs the same check.
"""

import datetime
import json
import os
import platform
import re
import string
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "records")
FIELDS = ("what", "command", "commit", "machine", "date", "data", "quoted")


def machine():
    """This machine in words: the CPU's model name and family, its logical cores and whether it has bfloat16
    instructions (the distinction the docs' CPU figures turn on)."""
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    bf16 = "AVX512-BF16" if "avx512_bf16" in info.get("flags", "").split() else "no AVX512-BF16"
    return f"{os.cpu_count()}-core {info.get('model name', '?')} (family {info.get('cpu family', '?')}, " \
           f"model {info.get('model', '?')}, {bf16})"


def commit():
    """The commit the measurement ran at; a copy of the tree that is not a git checkout (an unpacked archive) says so."""
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "not a git checkout"


def write_record(name, what, command, data, quoted, machine_text=None):
    """records/<name>.json, written atomically, after checking that every quoted text is in its doc now:
    a measuring script fails here, loudly, when the docs quote something other than what it measured."""
    sys.path.insert(0, ROOT)
    from machinery.faults import atomic_write
    record = {"what": what, "command": command, "commit": commit(), "machine": machine_text or machine(),
              "date": datetime.date.today().isoformat(), "data": data, "quoted": quoted}
    path = os.path.join(RECORDS, f"{name}.json")
    os.makedirs(RECORDS, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")
    problems = check_record(record)
    print(f"wrote {os.path.relpath(path, ROOT)}" + "".join(f"\n  not in the docs: {p}" for p in problems))
    return problems


def fields_of(text):
    """The format fields of a quoted text: each one a figure taken from the record's data."""
    return [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]


def normalise(text):
    """Line breaks are not content: a line break between two CJK characters is dropped (Chinese has no spaces
    between words), every other run of white space becomes one space."""
    text = re.sub(r"(?<=[^\x00-\x7f])[ \t]*\n[ \t]*(?=[^\x00-\x7f])", "", text)
    return re.sub(r"\s+", " ", text)


def read_doc(doc, root=ROOT):
    with open(os.path.join(root, doc), encoding="utf-8") as f:
        return f.read()


def check_record(record, read=read_doc):
    """The problems of one record, as lines (none: every field is there and every quoted text, formatted
    with the record's data, is in its doc)."""
    if not isinstance(record, dict) or tuple(sorted(record)) != tuple(sorted(FIELDS)):
        return [f"the fields must be exactly {', '.join(FIELDS)}"]
    problems = [f"'{key}' must be a non-empty string" for key in FIELDS[:5]
                if not isinstance(record[key], str) or not record[key].strip()]
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", str(record["date"])):
        problems.append(f"date {record['date']!r} is not YYYY-MM-DD")
    if not re.fullmatch(r"[0-9a-f]{7,40}", str(record["commit"])):
        problems.append(f"commit {record['commit']!r} is not a git commit")
    if not isinstance(record["data"], dict) or not record["data"]:
        problems.append("'data' must be a non-empty object")
    if not isinstance(record["quoted"], list) or not record["quoted"]:
        return problems + ["'quoted' must be a non-empty list"]
    docs = {}  # each doc read and normalised once per record, however many figures it quotes
    for quote in record["quoted"]:
        if not isinstance(quote, dict) or sorted(quote) != ["doc", "text"]:
            problems.append(f"each quoted entry has exactly 'doc' and 'text': {quote!r}")
            continue
        if not fields_of(quote["text"]):
            problems.append(f"quotes no figure of the data: {quote['text']!r}")
        try:
            text = quote["text"].format(**record["data"])
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            problems.append(f"{quote['text']!r} cannot be formatted with the data: {e!r}")
            continue
        try:
            if quote["doc"] not in docs:
                docs[quote["doc"]] = normalise(read(quote["doc"]))
        except OSError:
            problems.append(f"{quote['doc']} cannot be read")
            continue
        if normalise(text) not in docs[quote["doc"]]:
            problems.append(f"{quote['doc']} does not say {text!r}")
    return problems


def record_paths(folder=RECORDS):
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".json"))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main():
    problems, figures = 0, 0
    for path in record_paths():
        record = load(path)
        found = check_record(record)
        figures += sum(len(fields_of(q["text"])) for q in record.get("quoted", []) if isinstance(q, dict))
        problems += len(found)
        for line in found:
            print(f"{os.path.relpath(path, ROOT)}: {line}")
    print(f"{len(record_paths())} records, {figures} quoted figures, {problems} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
