"""
Machine faults handled like bad input: a full disk or a folder that cannot be written is one line that
names the path and the fix (not a traceback), and a write that fails or is interrupted leaves no
temporary file behind.
"""

import contextlib
import errno
import os
import re
import shutil

from machinery.cli import UsageError

WRITE_FAULTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some of your disk quota",
                errno.EROFS: "choose a folder you can write to", errno.EACCES: "choose a folder you can write to",
                errno.EPERM: "choose a folder you can write to",
                errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
                errno.EISDIR: "the path is a folder: name a file",
                errno.ENAMETOOLONG: "choose a shorter name", errno.ELOOP: "choose a path without a link loop",
                errno.EEXIST: "a file is where a folder must go: choose another path",
                errno.ENOENT: "a folder on the way cannot be made there: choose another path"}


@contextlib.contextmanager
def writing(path, kept=""):
    """Inside this block, a full disk or an unwritable folder is one UsageError naming the path and the
    fix, not a traceback. kept: what the failure leaves intact, said in the message ('the previous ...')."""
    try:
        yield
    except Exception as e:
        code = os_error_number(e)
        if code not in WRITE_FAULTS:
            raise
        filename = getattr(e, "filename", None)
        where = filename if filename and not re.search(r"\.tmp\d+", str(filename)) else path  # a temp file: its target
        raise UsageError(f"could not write {where} ({os.strerror(code)}){'; ' if kept else ''}{kept}; "
                         f"{WRITE_FAULTS[code]}") from e


def os_error_number(error):
    """The errno of an OSError, or of a library's own error that only quotes it (safetensors says
    'I/O error: No space left on device (os error 28)')."""
    if isinstance(error, OSError):
        return error.errno
    quoted = re.search(r"\(os error (\d+)\)", str(error))
    return int(quoted.group(1)) if quoted else None


@contextlib.contextmanager
def removed_on_failure(*paths):
    """Delete the temporary files at paths if the block fails or is interrupted (Ctrl-C, SIGTERM)."""
    try:
        yield
    except BaseException:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """A file object whose contents appear at path all at once, or not at all: it is written to a temp file
    beside path, flushed to disk (fsync) and renamed over path; if the block fails or is interrupted, the
    temp file is removed and path is as it was. Every file GlassGPT writes goes through here."""
    tmp = f"{path}.tmp{os.getpid()}"
    with removed_on_failure(tmp):
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder):
    """Make a rename in folder durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(out_dir, leftover):
    """Delete the temp files of atomic writes whose writing process is gone (killed mid-write): the files
    whose names `leftover` matches, its group 1 the writer's process id (run_folder.LEFTOVER for a run
    folder, preparation.DATA_LEFTOVER for a dataset, export.py's half-written export folder)."""
    import psutil
    removed = []
    for name in sorted(os.listdir(out_dir)):
        match = leftover.fullmatch(name)
        if match and not psutil.pid_exists(int(match.group(1))):
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)  # a folder: export.py's
            removed.append(name)
    if removed:
        print(f"removed {len(removed)} half-written file(s) of a killed run from {out_dir}: {', '.join(removed)}")
