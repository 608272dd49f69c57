"""
See through a trained checkpoint: a local page that shows what the model does with a prompt.

    python lens.py --ckpt out-shakespeare-char-cpu       # a run folder (its best_model.pt) or a checkpoint file
    python lens.py --ckpt best_model.pt --port 8000      # the newest best_model.pt below this folder
    python lens.py --ckpt out-shakespeare-char-cpu --heads   # what each head does at each snapshot, as JSON
    python lens.py --ckpt out-shakespeare-char-cpu --compare out-shakespeare-char-cpu/best_model-int8.safetensors

The page (lens/index.html, lens.js, lens.css) only draws: every number it shows comes from here, and
here from the model's own code. An analysis is one traced forward (`lens.py: trace`, forward hooks on the model);
the sampling settings reshape the probabilities through `model.py: sampling_probs`, the function that
`sample_next` draws from; generation is `model.py: GPT.generate_stream`, seeded as `generate.py` seeds it.
A run folder with a training timeline (machinery/timeline.py) is replayed: every view can show the model as
it was at any snapshot (the request's `step`), the training view draws the run's curves, and the heads'
scores (machinery/heads.py) are read at every snapshot. With --compare, a second checkpoint of the same model
(quantize.py's output, say) has its next-token probabilities shown beside the first's.

The server is a local one that any web page could try to reach, so it defends itself (docs chapter 9.11):
it answers only requests addressed to it by name (`Handler.check_host`: DNS rebinding), reads no body larger
than BODY_LIMIT and waits no longer than SOCKET_TIMEOUT, checks every field (`request_fields`), and answers
whatever goes wrong as JSON: 4xx naming the problem, 500 (and one line in its terminal) for a fault of its own.
"""

from machinery.cli import quiet_interrupts
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import argparse
import ipaddress
import itertools
import json
import math
import os
import re
import shlex
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch
from torch.nn import functional as F

from data import load_split, windows_at
from generate import load_model, parse_args as generate_flags
from machinery import heads
from machinery.bands import band_for_run
from machinery.checkpoint import find_checkpoint
from machinery.checks import LARGEST_INT, PORT_RANGE, integer, pathname
from machinery.cli import ArgumentParser, UsageError, first_line, run_cli
from machinery.devices import pick_device
from machinery.metrics import metrics_entry
from machinery.quantization import load_weights
from machinery.timeline import run_folder_of, snapshots_of
from model import sampling_probs

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lens")
PAGE_FILES = {"/": ("index.html", "text/html"), "/lens.js": ("lens.js", "text/javascript"),
              "/lens.css": ("lens.css", "text/css")}
SETTINGS = ("temperature", "top_k", "top_p", "seed", "max_new_tokens")  # generate.py's flags, same names
FIELDS = ("prompt", "position", "step", "layer", "head") + SETTINGS  # all that a request may hold
TOP = 20  # tokens in the next-token view
CURVE_POINTS = 2000  # the most points of each training curve sent to the page (a long run's are thinned)
SAMPLE_WINDOWS = 16  # val windows in the heads' fixed sample (the knock-out's loss, the attention scores)
INDUCTION_BATCH = 8  # repeated random sequences for the induction score
STACK_TOP = 5  # predictions per layer at the chosen position
ATTENTION_LIMIT = 2_000_000  # the most weights (layers x heads x T x T) one answer carries to the page
BODY_LIMIT = 64 * 1024  # bytes in one request: a prompt of many thousand characters, never a flood of memory
SOCKET_TIMEOUT = 20  # seconds a connection may stay silent (before its request, inside its body): then it is dropped
GENERATE_LIMIT = 10_000  # the most new tokens one generation on the page may ask for
NUMBER_TEXT_LIMIT = 100  # characters in a number given as a string
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # the names this machine has for itself


def request_fields(body):
    """The page's fields from a request body (a JSON object, in UTF-8), each checked: the prompt a string of
    text, every number a JSON number or a string of one, finite (its range is generate.py's flag parser's).
    Anything else is a UsageError that names the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        fields = json.loads(text or "{}", parse_int=lambda digits: int(digits) if len(digits) <= NUMBER_TEXT_LIMIT
                            else LongNumber(digits))
    except RecursionError:
        raise UsageError("the request is JSON nested too deeply to read")
    except ValueError as e:
        raise UsageError(f"the request is not JSON ({first_line(e)})")
    if not isinstance(fields, dict):
        raise UsageError(f"the request must be a JSON object of the page's fields, got {json_kind(fields)}")
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        raise UsageError(f"the request has a field the lens does not know, {shorten(unknown[0])!r}; "
                         f"it takes {', '.join(FIELDS)}")
    prompt = fields.get("prompt", "")
    if not isinstance(prompt, str):
        raise UsageError(f"the field 'prompt' must be a string, got {json_kind(prompt)}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, which JSON's \ud800 escapes can spell
        raise UsageError(f"the field 'prompt' is not text: {prompt[e.start]!r} at character {e.start} is half "
                         "of a UTF-16 pair")
    checked = {"prompt": prompt}
    for key in ("position", "step", "layer", "head") + SETTINGS:
        if fields.get(key) is not None:
            checked[key] = number_text(key, fields[key])
    for key in ("position", "step", "layer", "head"):
        whole_number(key, checked.get(key))  # for every question, even one that does not use it
    return checked


def number_text(key, value):
    """A number field's value as the text of its flag: from a JSON number, or a string (the page sends the text
    of its inputs). A float that JSON could spell but a double cannot hold (1e400) is infinite: refused here."""
    if isinstance(value, str):
        if len(value) > NUMBER_TEXT_LIMIT:
            raise UsageError(f"the field '{key}' is {len(value)} characters long, too long for a number")
        return value.strip()
    if isinstance(value, LongNumber) or (isinstance(value, int) and len(str(abs(value))) > NUMBER_TEXT_LIMIT):
        digits = len(str(value).lstrip("-"))
        raise UsageError(f"the field '{key}' is a number of {digits} digits, too long for any setting")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"the field '{key}' must be a number (or a string of one), got {json_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"the field '{key}' must be a finite number, got {value}")
    return str(value) if isinstance(value, int) else repr(value)


class LongNumber:
    """A JSON whole number of more than NUMBER_TEXT_LIMIT digits, kept as its text: Python would convert up to 4300
    digits (slowly) and refuse more, and no setting is that large."""

    def __init__(self, digits):
        self.digits = digits

    def __str__(self):
        return self.digits


def json_kind(value):
    """What a JSON value is, in JSON's words."""
    kinds = ((bool, "true or false"), (type(None), "null"), (str, "a string"), ((int, float, LongNumber), "a number"),
             (list, "a list"), (dict, "an object"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def shorten(text, width=40):
    text = str(text)
    return text if len(text) <= width else text[:width] + "..."


def sampling_settings(fields):
    """The page's settings, checked by generate.py's own flag parser (so the same values are refused with
    the same words), then by the lens's own limits; a missing field takes generate.py's default, an empty
    top_k or top_p means off."""
    given = {key: number_text(key, fields[key]) for key in SETTINGS if fields.get(key) is not None}
    flags = vars(generate_flags([f"--{key}={value}" for key, value in given.items() if value]))
    if flags["max_new_tokens"] > GENERATE_LIMIT:
        raise UsageError(f"--max_new_tokens must be at most {GENERATE_LIMIT} on the lens's page, "
                         f"got {flags['max_new_tokens']}; generate.py takes more")
    return {key: None if given.get(key) == "" and key in ("top_k", "top_p") else flags[key] for key in SETTINGS}


def trace(model, idx):
    """One forward of idx (B, T) with the model's insides kept: (its logits, {"residual": the stream after
    the embeddings and after each block, each (B, T, C); "attention": each layer's weights (B, nh, T, T)}).
    Forward hooks read them where the model computes them; the weights exist only on the explicit attention
    path (the same result as the fused one), which this forward takes."""
    kept = {"residual": [], "attention": []}
    keep_output = lambda module, inputs, output: kept["residual"].append(output)
    keep_weights = lambda module, inputs, output: kept["attention"].append(inputs[0])  # what dropout is given
    blocks = model.transformer.h
    hooks = [model.transformer.drop.register_forward_hook(keep_output)]
    hooks += [block.register_forward_hook(keep_output) for block in blocks]
    hooks += [block.attn.attn_dropout.register_forward_hook(keep_weights) for block in blocks]
    paths = [block.attn.attention for block in blocks]
    try:
        for block in blocks:
            block.attn.attention = "explicit"
        logits, _ = model(idx)
    finally:
        for hook in hooks:
            hook.remove()
        for block, path in zip(blocks, paths):
            block.attn.attention = path
    return logits, kept


def rounded(tensor, digits=6):
    """A tensor as nested lists of short decimals: JSON stays small and the sums still hold to 1e-5."""
    return tensor.double().round(decimals=digits).tolist()


class Lens:
    """A loaded model and its tokenizer, and the questions the page asks of them. One request uses the model
    at a time; a generation takes the lock for each of its steps, so the page stays answerable meanwhile."""

    def __init__(self, model, tokenizer, path, device, compare=None):
        self.model, self.tokenizer, self.path, self.device = model, tokenizer, path, device
        self.compare = compare  # (model, path) whose next-token probabilities the page shows beside the model's
        self.lock = threading.Lock()
        self.run_folder = run_folder_of(path)
        self.snapshots = {entry["step"]: (entry, file) for entry, file in snapshots_of(self.run_folder)}
        self.loaded, self.heads_report = {}, None  # snapshot models by step; the heads' report, once made

    def describe(self):
        config = self.model.config
        return {"checkpoint": self.path, "device": self.device, "dtype": self.dtype(),
                "tokenizer": self.tokenizer.describe()["kind"], "n_layer": config.n_layer, "n_head": config.n_head,
                "n_embd": config.n_embd, "block_size": config.block_size, "vocab_size": config.vocab_size,
                "defaults": sampling_settings({}), "example": self.example_prompt(), "top": TOP,
                "body_limit": BODY_LIMIT, "compare": self.compare and self.compare[1],
                "snapshots": self.snapshot_list()}

    def snapshot_list(self):
        return [{k: e[k] for k in ("step", "lr", "loss")} for e, _ in self.snapshots.values()]

    def dtype(self):
        return str(self.model.lm_head.weight.dtype).removeprefix("torch.")

    def model_at(self, step):
        """The model as it was at a snapshot's step (the request's field 'step'), or the checkpoint's when none
        is asked for. Each snapshot is loaded once, in the checkpoint's dtype, then kept."""
        step = whole_number("step", step)
        if step is None:
            return self.model, self.path
        if step not in self.snapshots:
            have = ", ".join(map(str, self.snapshots)) or "none (it has no timeline)"
            raise UsageError(f"the run has no snapshot at step {step}; its snapshots are at steps {shorten(have, 80)}")
        path = self.snapshots[step][1]
        if step not in self.loaded:
            self.loaded[step] = load_model(path, self.device, self.dtype())[0]
        return self.loaded[step], path

    def example_prompt(self):
        try:
            self.tokenizer.encode("ROMEO:")
            return "ROMEO:"
        except UsageError:  # a char model of another text: the learner types its own
            return ""

    def token(self, i, p=None):
        """{id, text} of token id i, with its probability p when given."""
        # a model's vocabulary can be padded past the tokenizer's (GPT-2's 50257 to 50304): ids never seen
        text = self.tokenizer.decode([i]) if i < self.tokenizer.vocab_size else f"<unused {i}>"
        return {"id": i, "text": text} if p is None else {"id": i, "text": text, "p": round(p, 6)}

    def prompt_ids(self, prompt):
        """(ids the model sees, a note when the prompt was cut to block_size or None)."""
        ids = self.tokenizer.encode(prompt) if prompt else []  # an unknown character is a UsageError
        if not ids:
            raise UsageError("the prompt is empty; type some text")
        block_size = self.model.config.block_size  # the same at every snapshot
        if len(ids) <= block_size:
            return ids, None
        return ids[-block_size:], (f"the prompt is {len(ids)} tokens long; the model sees at most block_size = "
                                   f"{block_size} at once, so this shows its last {block_size}")

    def analyse(self, fields):
        """Everything the page shows about a prompt, from one forward of the model."""
        ids, note = self.prompt_ids(fields.get("prompt", ""))
        settings = sampling_settings(fields)
        position = chosen_position(fields.get("position"), len(ids))
        with self.lock, torch.no_grad():
            model, _ = self.model_at(fields.get("step"))
            _, inside = trace(model, torch.tensor([ids], device=self.device))  # the one forward
            stages = []
            for layer, x in enumerate(inside["residual"]):
                summary, logits = self.stage(model, layer, x[0], position)
                stages.append(summary)
            # the second model's prediction after the same position, beside the checkpoint's (not a snapshot's)
            other = None if self.compare is None or fields.get("step") not in (None, "") else \
                self.compare[0](torch.tensor([ids[:position + 1]], device=self.device))[0][0, -1].float()
            # the lens of the last block's stream is the model's own prediction, at every position
            return {"tokens": [self.token(i) for i in ids], "note": note, "position": position,
                    "settings": settings, "next": self.next_token(logits[position], settings, other),
                    "stack": stages, **self.attention(inside["attention"], len(ids))}

    def stage(self, model, layer, x, position):
        """(summary, logits (T, V)) of the residual stream x (T, C) after `layer` blocks: its size, and what the
        model would predict if it stopped here (the final LayerNorm and the head applied to it: the logit lens)."""
        logits = model.lm_head(model.transformer.ln_f(x)).float()  # (T, V)
        probs = F.softmax(logits, dim=-1)
        top_p, top_id = probs.max(dim=-1)  # (T,)
        detail = torch.topk(probs[position], STACK_TOP)
        return {"name": "embeddings" if layer == 0 else f"block {layer}", "norm": rounded(x.float().norm(dim=-1), 3),
                "top": [self.token(i, p) for i, p in zip(top_id.tolist(), top_p.tolist())],
                "detail": [self.token(i, p) for i, p in zip(detail.indices.tolist(), detail.values.tolist())]}, logits

    def next_token(self, logits, settings, other=None):
        """The model's top tokens after one position, and what the sampling settings make of them; with other
        (the compared model's logits there), each token's probability under it too, and how far apart they are."""
        probs = F.softmax(logits, dim=-1)  # (V,)
        sampled = sampling_probs(logits[None], settings["temperature"], settings["top_k"], settings["top_p"])[0]
        top = torch.topk(probs, min(TOP, probs.numel()))
        rows = [dict(self.token(i, p), sampled=round(sampled[i].item(), 6))
                for i, p in zip(top.indices.tolist(), top.values.tolist())]
        answer = {"top": rows, "kept": int((sampled > 0).sum()), "vocab_size": probs.numel(),
                  "rest": round(1 - top.values.sum().item(), 6),
                  "rest_sampled": round(1 - sampled[top.indices].sum().item(), 6), "compare": None}
        if other is not None:
            q = F.softmax(other, dim=-1)
            for row in rows:
                row["p_compare"] = round(q[row["id"]].item(), 6)
            kl = (probs * (F.log_softmax(logits, dim=-1) - F.log_softmax(other, dim=-1))).sum().item()
            answer["compare"] = {"path": self.compare[1], "kl": round(kl, 6), "top": self.token(int(q.argmax()),
                                                                                                q.max().item())}
        return answer

    def attention(self, weights, T):
        """Every layer's and head's weights (nh, T, T), unless there are too many to send to a page."""
        config = self.model.config
        if config.n_layer * config.n_head * T * T <= ATTENTION_LIMIT:
            return {"attention": [rounded(w[0], 5) for w in weights], "attention_note": None}
        most = math.isqrt(ATTENTION_LIMIT // (config.n_layer * config.n_head))
        return {"attention": None, "attention_note": f"attention is shown for prompts of up to {most} tokens "
                                                     f"with this model's {config.n_layer} x {config.n_head} heads"}

    def generate(self, fields):
        """An iterator of the new tokens ({id, text, p, p_model}) of model.generate_stream, seeded as generate.py
        seeds: p is the probability each had under the sampling settings, p_model under the model alone. The
        prompt and the settings are checked here, before the first token (a UsageError)."""
        prompt = fields.get("prompt", "")
        ids = self.tokenizer.encode(prompt) if prompt else []
        if not ids:
            raise UsageError("the prompt is empty; type some text")
        settings = sampling_settings(fields)
        with self.lock:
            model, _ = self.model_at(fields.get("step"))
        return self.new_tokens(model, ids, settings)

    def new_tokens(self, model, ids, s):
        generator = torch.Generator(device=self.device).manual_seed(s["seed"])  # as generate.py: same seed, same text
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        fired, replayed, me = [], {}, threading.current_thread()

        def keep_logits(module, args, output):  # generate_stream's own forwards, not other requests'
            if threading.current_thread() is me:
                fired.append(output[0])  # (1, 1, V)
                if output[0].is_cuda and torch.cuda.is_current_stream_capturing():
                    replayed["logits"] = output[0]  # the buffer that each replay of the recorded step rewrites

        hook = model.register_forward_hook(keep_logits)
        try:
            stream = model.generate_stream(x, s["max_new_tokens"], s["temperature"], s["top_k"], s["top_p"],
                                                generator=generator)
            while True:
                with self.lock:
                    fired.clear()
                    token = next(stream, None)
                    if token is None:
                        return
                    # the step's own forward; none fired when it was a replay of a CUDA graph (DecodeStep)
                    logits = (fired[-1] if fired else replayed["logits"])[:, -1, :].float()  # (1, V)
                    i = token.item()
                    p = sampling_probs(logits, s["temperature"], s["top_k"], s["top_p"])[0, i].item()
                    p_model = F.softmax(logits, dim=-1)[0, i].item()
                yield dict(self.token(i, p), p_model=round(p_model, 6))
        finally:
            hook.remove()

    def generate_command(self, fields):
        """The generate.py command that prints the same text. Every value is given in the --flag=value form, so
        that a prompt that begins with '-' is not read as a flag; a prompt that begins with FILE: (or TEXT:) is
        given as TEXT:prompt, which generate.py reads as the text itself, not as a file to open."""
        s = sampling_settings(fields)
        prompt = fields.get("prompt", "")
        with self.lock:
            _, path = self.model_at(fields.get("step"))  # a snapshot is a checkpoint generate.py opens too
        flags = {"ckpt": path, "start": f"TEXT:{prompt}" if prompt.startswith(("FILE:", "TEXT:")) else prompt,
                 "seed": s["seed"], "temperature": s["temperature"],
                 "top_k": s["top_k"] or self.model.config.vocab_size,  # keeping every token is what "off" does
                 "top_p": s["top_p"], "max_new_tokens": s["max_new_tokens"], "device": self.device,
                 "dtype": self.dtype()}
        return shlex.join(["python", "generate.py", *(f"--{key}={value}" for key, value in flags.items()
                                                      if value is not None)])

    # ---- the training replay ---------------------------------------------------------------------------

    def training(self):
        """The run's curves for the training view: train losses and evals from its metrics.jsonl (a long run's
        thinned to CURVE_POINTS), the snapshots with their own losses, and its recipe's band."""
        train, evals = [], []
        path = os.path.join(self.run_folder, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for entry in filter(None, map(metrics_entry, f)):
                    if entry.get("type") == "train" and finite(entry.get("loss")):
                        train.append([entry["iter"], entry["loss"]])
                    elif entry.get("type") == "eval" and finite(entry.get("val_loss")):
                        evals.append([entry["iter"], entry.get("train_loss"), entry["val_loss"]])
        every = max(1, math.ceil(len(train) / CURVE_POINTS))
        return {"train": train[::every], "eval": evals[-CURVE_POINTS:], "snapshots": self.snapshot_list(),
                "band": band_for_run(self.run_folder, warn=print)}  # the recipe's reference band, if it has one

    def strip(self, fields):
        """One head's attention to the prompt at every snapshot: {steps, maps (each T x T)}."""
        ids, _ = self.prompt_ids(fields.get("prompt", ""))
        layer, head = whole_number("layer", fields.get("layer")), whole_number("head", fields.get("head"))
        config = self.model.config
        if layer is None or not 0 <= layer < config.n_layer or head is None or not 0 <= head < config.n_head:
            raise UsageError(f"choose a layer from 0 to {config.n_layer - 1} and a head from 0 to "
                             f"{config.n_head - 1}")
        if len(self.snapshots) * len(ids) ** 2 > ATTENTION_LIMIT:
            raise UsageError(f"the strip is drawn for prompts of up to "
                             f"{math.isqrt(ATTENTION_LIMIT // max(1, len(self.snapshots)))} tokens")
        maps = []
        for step in self.snapshots:
            with self.lock, torch.no_grad():
                model, _ = self.model_at(step)
                _, inside = trace(model, torch.tensor([ids], device=self.device))
            maps.append(rounded(inside["attention"][layer][0, head], 4))
        return {"steps": list(self.snapshots), "layer": layer, "head": head, "maps": maps}

    def heads(self):
        """What each head does at each snapshot (and in the checkpoint): machinery/heads.py's scores, made once."""
        if self.heads_report is None:
            sample, note = self.val_sample()
            half = self.model.config.block_size // 2
            repeated = heads.repeated_random_tokens(INDUCTION_BATCH, half, self.tokenizer.vocab_size).to(self.device)
            rows = []
            for step in [*self.snapshots, None]:
                with self.lock, torch.no_grad():
                    model, path = self.model_at(step)
                    rows.append({"step": step, "checkpoint": path, **head_scores(model, sample, repeated, half)})
            self.heads_report = {"checkpoint": self.path, "sample": note, "induction_half": half,
                                 "n_layer": self.model.config.n_layer, "n_head": self.model.config.n_head,
                                 "snapshots": rows}
        return self.heads_report

    def val_sample(self):
        """((X, Y), what it is) of the fixed sample the heads are scored on: SAMPLE_WINDOWS windows spread
        evenly over the run's val split; (None, why not) when the split is not on this machine."""
        meta = load_weights(self.path)[1]
        data_dir, dataset = meta.get("config", {}).get("data_dir", "data"), meta.get("dataset", "")
        block_size = self.model.config.block_size
        try:
            val = load_split(data_dir, dataset, "val")
        except (OSError, ValueError, TypeError) as e:
            return None, f"no knock-out: the val split {data_dir}/{dataset}/val.bin is not readable here ({e})"
        if len(val) <= block_size:
            return None, f"no knock-out: the val split of {dataset} is shorter than one window"
        ix = torch.linspace(0, len(val) - block_size - 1, SAMPLE_WINDOWS).long()
        return (windows_at(val, ix, block_size, self.device),
                f"{SAMPLE_WINDOWS} windows of {block_size} tokens spread over {data_dir}/{dataset}/val.bin")


def head_scores(model, sample, repeated, half):
    """{loss, heads: [layer][head] -> {previous, induction, first, knockout}} of one model. The previous- and
    first-token scores are read on the val sample (on the repeated random tokens without one), the induction
    score on the repeated random tokens (B, 2 * half)."""
    _, on_repeat = trace(model, repeated)
    text = on_repeat if sample is None else trace(model, sample[0])[1]
    loss, knockout = heads.knockout_effects(model, *sample) if sample else (None, None)
    table = []
    for layer in range(model.config.n_layer):
        weights = text["attention"][layer].float()
        scores = zip(heads.previous_token_scores(weights).tolist(),
                     heads.induction_scores(on_repeat["attention"][layer].float(), half).tolist(),
                     heads.first_token_scores(weights).tolist())
        table.append([{"previous": round(p, 4), "induction": round(i, 4), "first": round(f, 4),
                       "knockout": None if knockout is None else round(knockout[layer][h], 5)}
                      for h, (p, i, f) in enumerate(scores)])
    return {"loss": None if loss is None else round(loss, 5), "heads": table}


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def chosen_position(value, T):
    """The position the page asks about; none (or one past the prompt, after an edit) means the last."""
    position = whole_number("position", value)
    return position if position is not None and 0 <= position < T else T - 1


def whole_number(key, value):
    """A field that is a whole number (position, step, layer, head), or None when it is empty."""
    text = "" if value is None else number_text(key, value)
    if text == "":
        return None
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"the field '{key}' must be a whole number, got {shorten(text)!r}")
    if abs(number) > LARGEST_INT:
        raise UsageError(f"the field '{key}' must be a whole number of at most {LARGEST_INT}, got {shorten(text)}")
    return number


class Refused(UsageError):
    """A request answered with an HTTP status other than 400: the problem, and that status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """The page's files, and its questions: /api/model, /api/training and /api/heads (GET), /api/analyze,
    /api/strip and /api/generate (POST, the page's fields as a JSON body; generate answers with a stream of
    server-sent events). Every answer is JSON
    (or the page, or the stream): a request with another Host, a body too large or not JSON, a field of the
    wrong type is a 4xx naming it; a fault of the lens is a 500 and one line in its terminal."""

    timeout = SOCKET_TIMEOUT  # on every socket operation: a client that sends nothing is dropped, not waited for
    server_version = "GlassGPT-lens"
    default_request_version = "HTTP/1.0"  # so that even an answer to a request line that is not HTTP has a status

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def get(self, path):
        if path in PAGE_FILES:
            self.send_page_file(*PAGE_FILES[path])
        elif path == "/api/model":
            self.send_json(self.server.lens.describe())
        elif path == "/api/training":
            self.send_json(self.server.lens.training())
        elif path == "/api/heads":
            self.send_json(self.server.lens.heads())
        elif path in ("/api/analyze", "/api/generate", "/api/strip"):
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes a POST of the page's fields as JSON")
        else:
            raise Refused(HTTPStatus.NOT_FOUND, f"nothing at {shorten(path)}")

    def post(self, path):
        if path not in ("/api/analyze", "/api/generate", "/api/strip"):
            raise Refused(HTTPStatus.NOT_FOUND, f"nothing to post to at {shorten(path)}")
        fields = request_fields(self.read_body())
        if path == "/api/analyze":
            self.send_json(self.server.lens.analyse(fields))
        elif path == "/api/strip":
            self.send_json(self.server.lens.strip(fields))
        else:
            self.stream_generation(fields)

    def answer(self, respond):
        """respond(path) once the Host is checked. A UsageError is a 4xx answer naming the problem; any other
        exception a 500 and one line on stderr, never a traceback: the server goes on with the next request."""
        self.streaming = False  # true once a stream's 200 has gone out: then a failure is an event of it
        try:
            self.check_host()
            respond(urlsplit(self.path).path)
        except Refused as e:
            self.refuse(e.status, str(e))
        except UsageError as e:
            self.refuse(HTTPStatus.BAD_REQUEST, str(e))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the page stopped listening (its Stop button, a closed tab), or fell silent
        except Exception as e:
            answered = "its stream's failure event" if self.streaming else "500"
            print(f"lens: {self.command} {shorten(self.path)!r} failed: {type(e).__name__}: {first_line(e)} "
                  f"(answered {answered}; the lens goes on)", file=sys.stderr, flush=True)
            self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"the lens failed on this request ({type(e).__name__}: "
                                                          f"{first_line(e)}); its terminal has the line")

    def refuse(self, status, message):
        """The error as the answer, or as the stream's `failure` event once the stream has begun."""
        self.close_connection = True
        try:
            if self.streaming:
                self.send_event("failure", {"error": message})
            else:
                self.send_json({"error": message}, status)
        except OSError:
            pass  # the client is gone: nobody to tell

    def check_host(self):
        """Only a request addressed to this server by one of its own names is answered. A web page can make the
        browser send requests to a name of its own site that it then points at 127.0.0.1 (DNS rebinding): those
        carry the page's name in Host, and are refused here. A page of another site that posts to 127.0.0.1
        directly (it cannot read the answer, but it would drive the model) is named by the browser in Origin."""
        hosts = self.headers.get_all("Host") or []
        host = hosts[0].strip().lower() if len(hosts) == 1 else None
        local = self.connection.getsockname()[0]  # the address the client connected to, which it may name
        allowed = self.server.allowed_hosts | names_with_port([local], self.server.server_address[1])
        if host not in allowed:
            given = "one without a Host header" if not hosts else f"one for Host {shorten(', '.join(hosts))!r}"
            raise Refused(HTTPStatus.FORBIDDEN, f"this lens answers only requests for {self.server.served}, not "
                                                f"{given}: another site's page may be trying to reach it")
        origin = self.headers.get("Origin")  # sent by browsers with a page's POSTs and cross-site requests
        if origin is not None and origin.strip().lower() not in {f"http://{name}" for name in allowed}:
            raise Refused(HTTPStatus.FORBIDDEN, f"this lens answers only its own page, not one from "
                                                f"{shorten(origin)!r}")

    def read_body(self):
        """The request's body, if its Content-Length says it fits in BODY_LIMIT: checked before a byte is read."""
        if self.headers.get("Transfer-Encoding"):
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not in chunks")
        lengths = self.headers.get_all("Content-Length") or ["0"]
        text = lengths[0].strip()
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,20}", text):
            raise Refused(HTTPStatus.BAD_REQUEST, f"the Content-Length must be one whole number of bytes, got "
                                                  f"{shorten(', '.join(lengths))!r}")
        length = int(text)
        if length > BODY_LIMIT:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body would be {length} bytes; the "
                                                               f"lens reads at most {BODY_LIMIT}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within {self.timeout:g} s")
        if len(body) < length:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the request body ended after {len(body)} of its {length} bytes")
        return body

    def stream_generation(self, fields):
        """Server-sent events: one `token` event per new token, then `done` (or `failure` with a message). The
        fields and the first step come before the 200: a failure there is an ordinary answer."""
        lens = self.server.lens
        tokens = lens.generate(fields)
        first = next(tokens, None)
        command = lens.generate_command(fields)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.streaming = True
        ids = []
        for token in itertools.chain([first] if first else [], tokens):
            ids.append(token["id"])
            self.send_event("token", token)
        self.send_event("done", {"text": lens.tokenizer.decode(ids), "command": command})

    def send_event(self, name, data):
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode("utf-8"))
        self.wfile.flush()

    def send_json(self, data, status=HTTPStatus.OK):
        self.send_bytes(json.dumps(data, allow_nan=False).encode("utf-8"), "application/json", status)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a request line too long, a malformed header, an unknown
        method) as JSON too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        message = f"{phrase}: {shorten(message, 200)}" if message and message != phrase else phrase
        self.send_json({"error": message}, code)

    def send_page_file(self, name, content_type):
        with open(os.path.join(PAGE_DIR, name), "rb") as f:
            self.send_bytes(f.read(), f"{content_type}; charset=utf-8")

    def send_bytes(self, body, content_type, status=HTTPStatus.OK):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # the terminal keeps only the link (and a fault's one line); what goes wrong is said on the page


def names_with_port(names, port):
    """{name:port} for each host name or address (an IPv6 one in brackets); the bare name too on port 80."""
    names = [bracketed(name).lower() for name in names]
    return {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())


def bracketed(address):
    """An IPv6 address as a URL writes it, [::1]; anything else as it is."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def is_unspecified(address):
    """0.0.0.0 or ::, which listen on every address of the machine."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def make_server(lens, host, port):
    """A threading HTTP server for the page on host:port (port 0: a free one), not yet serving. It answers
    requests addressed to host:port, to localhost:port and 127.0.0.1:port, and to the address a client
    connected to (a server bound to 0.0.0.0 is reached by one of the machine's addresses)."""
    kind = type("LensServer", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}) if ":" in host \
        else ThreadingHTTPServer
    try:
        server = kind((host, port), Handler)
    except (OSError, OverflowError, ValueError, UnicodeError) as e:
        raise UsageError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); choose another "
                         "--host or --port, or leave them out (this machine, a free port)")
    bound = server.server_address[1]
    server.allowed_hosts = names_with_port([*LOOPBACK_NAMES, host, server.server_address[0]], bound)
    server.served = (f"{bracketed(host)}:{bound} or localhost:{bound}" if host and not is_unspecified(host)
                     else f"this machine's addresses or localhost, port {bound}")
    server.lens = lens
    return server


def parse_args(argv=None):
    p = ArgumentParser(description="A local page that shows what a GlassGPT checkpoint does with a prompt.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="best_model.pt",
                   help="a run folder (its best_model.pt) or a checkpoint file; a bare name is the newest one here")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to serve on (the default is this machine only; any other opens the page, "
                        "which has no password, to the network)")
    p.add_argument("--port", type=integer(*PORT_RANGE), default=0, help="the port; 0 = a free one")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compare", type=pathname, default=None,
                   help="a second checkpoint of the same model (e.g. quantize.py's output): its next-token "
                        "probabilities are shown beside the first's")
    p.add_argument("--heads", action="store_true",
                   help="print what each head does at each snapshot of the run (JSON) and exit: previous-token, "
                        "induction and first-token scores, knock-out effect on the val loss")
    return p.parse_args(argv)


def compared_model(model, tokenizer, path, device, dtype):
    """(model, path) of --compare, which must read the same tokens as the first model."""
    other, other_tokenizer = load_model(path, device, dtype)
    if other_tokenizer.describe() != tokenizer.describe() or other.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--compare {path} reads other tokens than the checkpoint (its tokenizer or vocabulary "
                         "differs); compare two checkpoints of the same model, e.g. one and its quantize.py output")
    return other, path


def main():
    args = parse_args()
    device = pick_device(args.device)
    path = find_checkpoint(args.ckpt)
    model, tokenizer = load_model(path, device, args.dtype)
    compare = args.compare and compared_model(model, tokenizer, find_checkpoint(args.compare), device, args.dtype)
    lens = Lens(model, tokenizer, path, device, compare)
    if args.heads:
        print(json.dumps(lens.heads(), indent=1))
        return
    with make_server(lens, args.host, args.port) as server:
        host, port = server.server_address[:2]
        if not is_loopback(host):
            print(f"warning: the lens listens on {host}:{port}, beyond this machine: it has no password, and "
                  "anyone who can reach it can drive the model and read the checkpoint's path (leave out --host "
                  "to serve this machine only)", file=sys.stderr, flush=True)
        print(f"GlassGPT lens of {path}: http://{bracketed(host)}:{port}/  (Ctrl-C stops it)", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    run_cli(main, interrupted_hint="the lens has stopped")
