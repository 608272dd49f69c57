"""
The command line, shared by every script: the one error type for bad input (UsageError, importable from
anywhere: this module imports nothing of the project), run_cli (a bad input is one line and exit 2, Ctrl-C
or SIGTERM one line and 128 + the signal), an ArgumentParser whose errors are one line, and did-you-mean.
"""

import argparse
import difflib
import re


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line and exit with status 2. The values it
    quotes may hold anything (a newline in a file name, say): control characters are shown escaped, so the
    message stays one line."""

    def __init__(self, message):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def quiet_interrupts(name):
    """The first call of every script (name: its __name__; nothing happens on import): until run_cli takes
    over, Ctrl-C or SIGTERM while the slow imports load (PyTorch takes seconds) is one line and exit status
    130 or 143, not a traceback from inside them."""
    if name != "__main__":
        return
    import signal
    import sys

    def stop(signum, frame):
        sys.stderr.write(f"\ninterrupted by {signal.Signals(signum).name}\n")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


class ReaderSafe:
    """stdout that outlives its reader: once a pipe's reader is gone (`python train.py ... | head`), what
    is written goes nowhere and the run goes on (it still saves its checkpoint), instead of dying of a
    BrokenPipeError at its next line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self):
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # the rest, and the final flush

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_cli(main, interrupted_hint=""):
    """Run main() as a command-line tool: a UsageError is one line on stderr and exit status 2; running out
    of memory is one line and exit status 1; Ctrl-C (SIGINT) or SIGTERM is one line and exit status 130 or
    143, after the `finally` blocks on the way have removed what was half-written. interrupted_hint: what to
    do next, said on that line. Output never fails on a name that is not UTF-8 (it is shown escaped), and
    a closed stdout (ReaderSafe) stops nothing."""
    import signal
    import sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (quiet_interrupts' handler until now)
    signal.signal(signal.SIGTERM, raise_interrupted)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if not isinstance(sys.stdout, ReaderSafe):
        sys.stdout = ReaderSafe(sys.stdout)
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except UnicodeEncodeError as e:  # a file name that is not UTF-8 (Linux allows it) met a library that needs it
        print(f"error: a file or folder name is not UTF-8 ({first_line(e, 100)}); rename it, or choose "
              "another path", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "allocate" not in str(e):
            raise
        print(f"error: out of memory ({first_line(e, 100)}); use a smaller model, batch_size or block_size",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        newline = "\n" if sys.stderr.isatty() else ""  # after the ^C (or a progress bar) on the terminal
        print(f"{newline}interrupted by {signal.Signals(signum).name}{'; ' if interrupted_hint else ''}"
              f"{interrupted_hint}", file=sys.stderr)
        sys.exit(128 + signum)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one UsageError line rather than usage text plus an error, and --help
    shows every flag's default. renamed: {flag: what to give instead}, for the flags another program spells
    otherwise (machinery/nanogpt.py: SAMPLE_FLAGS), said when the error names one."""

    def __init__(self, *args, renamed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = renamed or {}

    def add_argument(self, *args, **kwargs):
        default, text = kwargs.get("default"), kwargs.get("help")
        shown = default is not None and default is not False and default != argparse.SUPPRESS  # not 0 == False
        if shown and "%(default)" not in (text or "") and "(default" not in (text or ""):
            kwargs["help"] = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        for flag in re.findall(r"--\w+", message):
            if flag in self.renamed:
                raise UsageError(f"{message}; {self.renamed[flag]}")
        raise UsageError(f"{message} (see --help)")


def closest(name, names):
    """' (did you mean 'x'?)' for the nearest valid spelling, or '' when nothing is close."""
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(error, width=120):
    """An exception's message cut to its first line and at most `width` characters, for one-line errors; a
    longer line is cut at the end of a word (a single word longer than width, at width) and ends in '...'."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0][:width + 1]  # (one more: a line longer than width is cut)
    if len(line) <= width:
        return line
    cut = line[:width - 3]
    if line[width - 3] != " " and " " in cut:  # not at a word's end: go back to the last one
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:([{") + "..."
