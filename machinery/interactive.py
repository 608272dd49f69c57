"""
generate.py --interactive: the model stays loaded, and each line read (from a terminal or a pipe) is a
prompt whose samples are printed as they are made. A line that starts with / changes a sampling setting
for the prompts after it. Ctrl-C ends the sample being printed and returns to the prompt; Ctrl-D (the
end of the input) exits, and so does Ctrl-C at the prompt.

    $ printf 'ROMEO:\n/temperature 0\nJULIET:\n' | python generate.py --ckpt out-shakespeare-char-cpu --interactive
"""

import sys

from machinery.cli import Interrupted, UsageError, closest

SETTINGS = ("temperature", "top_k", "top_p", "max_new_tokens", "num_samples", "stop")  # generate.py's flags
CAN_BE_OFF = ("top_k", "top_p", "stop")
COMMANDS = ("help", "settings", *SETTINGS)
HELP = """each line is a prompt (\\n in it is a newline; an empty line samples from a newline); commands:
  /temperature 0.5     0 = greedy; <1 sharper, >1 more random
  /top_k 50            sample among the k most likely tokens (/top_k off: all of them)
  /top_p 0.9           sample among the most likely tokens whose probability reaches p (/top_p off)
  /max_new_tokens 200  tokens per sample
  /num_samples 2       samples per prompt
  /stop TEXT           end a sample when TEXT appears (/stop off)
  /settings            the current settings
  /help                this text
Ctrl-C ends a sample; Ctrl-D (the end of the input) exits."""


def run(sample, settings, parse_args):
    """Read lines until the end of the input: commands change `settings` (generate.py's flags, each new
    value checked by its parse_args), anything else is a prompt for sample(prompt, settings)."""
    terminal = sys.stdin.isatty()
    if terminal:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
        print("type a prompt, or /help; Ctrl-C ends a sample, Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            line = input("> " if terminal else "")
        except EOFError:
            return
        if line.startswith("/"):
            say(lambda: change(settings, line[1:], parse_args))
        else:
            say(lambda: sample_until_interrupted(sample, line.replace("\\n", "\n") or "\n", settings))


def say(work):
    """Run work(); print what it returns, or its UsageError as one line, and carry on."""
    try:
        reply = work()
    except UsageError as e:
        reply = f"error: {e}".replace(" (see --help)", " (see /help)")
    if reply:
        print(reply, file=sys.stderr)


def sample_until_interrupted(sample, prompt, settings):
    try:
        sample(prompt, settings)
    except Interrupted:  # SIGTERM ends the program, not only the sample
        raise
    except KeyboardInterrupt:
        sys.stdout.write("\n---------------\n")
        sys.stdout.flush()
        return "(sample stopped)"


def change(settings, command, parse_args):
    """'/temperature 0.5' and the like: the new value, checked as generate.py checks its flag."""
    name, _, value = command.strip().partition(" ")
    value = value.strip()
    if name == "help":
        return HELP
    if name == "settings":
        return describe(settings)
    if name not in SETTINGS:
        suggestion = closest(name, COMMANDS).replace("mean '", "mean '/")
        raise UsageError(f"unknown command '/{name}'{suggestion}; /help lists them")
    if not value:
        raise UsageError(f"/{name} needs a value, e.g. /{name} {getattr(parse_args([]), name) or 'off'}")
    if name in CAN_BE_OFF and value.lower() in ("off", "none"):
        setattr(settings, name, None)
    else:
        setattr(settings, name, getattr(parse_args([f"--{name}={value}"]), name))
    return describe(settings)


def describe(settings):
    shown = {name: getattr(settings, name) for name in SETTINGS}
    return ", ".join(f"{name} {'off' if value is None else repr(value) if name == 'stop' else value}"
                     for name, value in shown.items())


def read_prompt(start):
    """--start text, FILE:path for a prompt kept in a file, or TEXT:text for a text taken as it is (a
    prompt that itself begins with FILE: or TEXT:)."""
    if start.startswith("TEXT:"):
        return start[len("TEXT:"):]
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the prompt file '{path}' ({e}); give a UTF-8 text file")
