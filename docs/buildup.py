"""
Chapter 10's build-up: from a bigram model to the CPU recipe's GPT, one piece added per stage. Each
stage is the full model with the pieces of the later stages taken away, trained at the CPU recipe's
budget through docs/ablations.py's mechanism (a subclass of GPT that train.py builds; model.py stays as
it is), and scored on the whole val split.

    python docs/buildup.py bigram                   # the first stage; STAGES lists them in order
    python docs/buildup.py heads --max_iters=200    # any other flag goes to train.py, after the recipe
    python docs/buildup.py --report out-buildup/* --out docs/img/buildup.png   # table and line chart
    python docs/buildup.py --head out-buildup/position     # one head's q . k scores and weights on a real line
    python docs/buildup.py --unigram data/shakespeare_char/input.txt   # the loss of character frequencies alone
    python docs/buildup.py position --without_bf16      # as on a CPU without bfloat16 instructions (chapter 10's)
    python docs/buildup.py --report out-buildup/* --record buildup-zen4   # and that record
    python docs/buildup.py --bigram out-buildup/bigram  # what the bigram stage learnt (records/bigram.json)

Each run writes its folder (out-buildup/<stage> unless --out_dir says otherwise) with train.py's usual
files plus stage.json: the stage, the final val loss, the parameter count, the command and a sample.
"""

import collections
import json
import math
import os
import string
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ablations.py sits beside this file

import torch
import torch.nn as nn

import ablations
from ablations import UsageError, run_cli
from machinery.preparation import TRAIN_FRACTION
from record import write_record

# stage -> what it adds; each stage has every piece of the stages above it
STAGES = {
    "bigram": "a table of next-token scores per token (no blocks)",
    "mean_of_past": "one block: the mean of the past, by a lower-triangular matrix",
    "one_head": "learned attention scores: one head of 128",
    "heads": "four heads of 32",
    "mlp": "the MLP after attention",
    "depth": "four blocks instead of one",
    "residual": "residual connections",
    "layernorm": "LayerNorm before each sub-layer (pre-norm) and at the top",
    "position": "position embeddings: the CPU recipe's model",
    "dropout": "dropout 0.1",
}
DROPOUT = 0.1
# what chapter 10 says of a rerun of its table (python docs/buildup.py --report ... --record buildup-zen4)
RERUN_QUOTED = [("docs/en/10-build-up.md", "every loss came out within {largest_difference:.3f} of the table's"),
                ("docs/zh/10-build-up.md", "每个损失与表中的相差都不超过 {largest_difference:.3f}")]
LINE = "Before we proceed any further, hear me speak."  # the second line of tiny Shakespeare


def has(stage, piece):
    """Whether `stage` includes the piece `piece` adds: the stages are cumulative, in STAGES' order."""
    order = list(STAGES)
    return order.index(stage) >= order.index(piece)


def mean_of_past_forward(self, x, cache=None, pos=None):
    """Attention with no learned scores: position t takes the plain mean of the values at 0..t."""
    B, T, C = x.size()
    v = self.c_attn(x).view(B, 1, T, C)  # (B, 1, T, C): one 'head' as wide as the stream
    mask = self.causal_mask[:T, :T]  # (T, T) lower-triangular
    if cache is not None:
        _, v = cache.write(v, v, pos)  # (B, 1, block_size, C)
        mask = self.causal_mask[pos]  # (T, block_size)
    weights = mask.float() / mask.sum(dim=-1, keepdim=True)  # each row 1/(t+1) over the past, 0 after it
    y = (weights @ v).view(B, T, C)  # (T, S) @ (B, 1, S, C) -> (B, 1, T, C)
    return self.resid_dropout(self.c_proj(y))


def mean_of_past(model):
    """Each attention keeps only a value matrix (C, C) and its output projection."""
    for block in model.transformer.h:
        attn = block.attn
        attn.c_attn = nn.Linear(attn.n_embd, attn.n_embd, bias=attn.c_attn.bias is not None)
        nn.init.normal_(attn.c_attn.weight, mean=0.0, std=0.02)
        if attn.c_attn.bias is not None:
            nn.init.zeros_(attn.c_attn.bias)
        attn.forward = types.MethodType(mean_of_past_forward, attn)


def block_forward(residual, mlp):
    """A Block.forward with or without the residual additions and with or without the MLP."""
    def forward(self, x, *cache_args):
        a = self.attn(self.ln_1(x), *cache_args)
        x = x + a if residual else a
        if mlp:
            m = self.mlp(self.ln_2(x))
            x = x + m if residual else m
        return x
    return forward


def stage_switch(stage):
    """The edit that turns a fresh recipe GPT into `stage`: every piece of the later stages taken away."""
    if stage == "bigram":
        return ablations.bigram

    def switch(model):
        if not has(stage, "one_head"):
            mean_of_past(model)
        if not has(stage, "mlp"):
            ablations.no_mlp(model)
        if not has(stage, "layernorm"):
            ablations.no_layernorm(model)
        if not has(stage, "position"):
            ablations.no_pos_emb(model)
        for block in model.transformer.h:
            block.forward = types.MethodType(block_forward(has(stage, "residual"), has(stage, "mlp")), block)
    return switch


def stage_flags(stage):
    """The train.py flags of `stage`, before the command line's own."""
    if stage == "bigram":
        return ["--optimizer=adamw"]  # no block matrices: nothing for Muon
    flags = [] if has(stage, "depth") else ["--n_layer=1"]
    flags += [] if has(stage, "heads") else ["--n_head=1"]
    return flags + ([f"--dropout={DROPOUT}"] if has(stage, "dropout") else [])


def load_stage(stage, out_dir):
    """The run's final model, rebuilt as its stage, and its tokenizer."""
    tensors, meta = ablations.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = ablations.ablated_gpt(stage_switch(stage))(ablations.GPTConfig(**meta["model_args"]))
    model.load_state_dict(tensors["model"])
    return model.eval(), ablations.tokenizer_from(meta["tokenizer"])


def run_stage(stage, train_args, shown_args):
    """Train one stage and write its stage.json; shown_args: its command's words after the stage."""
    config = ablations.train_switched(stage_switch(stage), stage_flags(stage), train_args, f"out-buildup/{stage}")
    model, tokenizer = load_stage(stage, config["out_dir"])
    ablations.record_run("stage", stage, model, tokenizer, config["out_dir"], "buildup.py", shown_args)


def read_stages(folders):
    results = ablations.read_records(folders, "stage", "buildup.py", "stage")
    return sorted(results, key=lambda r: list(STAGES).index(r["stage"]))


def report(folders, out, record=None):
    """A markdown table on stdout and a line chart in `out`: the val loss after each stage; with `record`, also
    records/<record>.json, whose rows chapter 10's table quotes (EN and ZH)."""
    results = read_stages(folders)
    if record:
        ablations.write_table_record(record, "stage", results, "buildup", RERUN_QUOTED, "buildup.py", folders,
                                     "chapter 10's stages rerun, from a bigram to the CPU recipe's GPT, whole-split "
                                     "val loss, against the table of records/buildup.json")
    print("| stage | adds | parameters | val loss | change |")
    print("|---|---|---|---|---|")
    previous = None
    for r in results:
        change = f"{r['val_loss'] - previous:+.3f}" if previous is not None else ""
        print(f"| `{r['stage']}` | {STAGES[r['stage']]} | {r['params']:,} | {r['val_loss']:.3f} | {change} |")
        previous = r["val_loss"]
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=100)
    losses = [r["val_loss"] for r in results]
    ax.plot(range(len(results)), losses, marker="o", color="tab:blue")
    for i, loss in enumerate(losses):
        ax.annotate(f"{loss:.3f}", (i, loss), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xticks(range(len(results)), [r["stage"] for r in results], rotation=30, ha="right")
    ax.set_ylabel("val loss, whole split (nats per character)")
    ax.set_title("From a bigram to the CPU recipe's GPT, one piece per stage", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def unigram_loss(text, train_fraction=TRAIN_FRACTION):
    """The val loss of predicting every character by its frequency in the train split, context ignored."""
    n = int(train_fraction * len(text))  # data.py's split: the first part is train, the rest val
    train, val = text[:n], text[n:]
    counts = collections.Counter(train)
    return -sum(math.log(counts[c] / len(train)) for c in val) / len(val)


def show_head(out_dir, line, query, head=0):
    """Print, for one head of the first block of a stage's model, which keys the query at `query` attends to
    and what makes it: the scaled scores q . k / sqrt(hs), their softmax, and the same head on positions alone."""
    model, tokenizer = load_stage(read_stages([out_dir])[0]["stage"], out_dir)
    idx = torch.tensor([tokenizer.encode(line)])  # (1, T)
    T, C = idx.size(1), model.config.n_embd
    hs = C // model.config.n_head
    block, causal = model.transformer.h[0], torch.tril(torch.ones(T, T, dtype=torch.bool))

    @torch.no_grad()
    def scores_and_weights(x):  # x (1, T, C): the stream entering the first block
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)  # each (1, T, C)
        q, k = q[0, :, head * hs:(head + 1) * hs], k[0, :, head * hs:(head + 1) * hs]  # (T, hs): this head's part
        scores = (q @ k.T / math.sqrt(hs)).masked_fill(~causal, float("-inf"))  # (T, T)
        return scores, torch.softmax(scores, dim=-1)  # row t: how much the query at t takes from each key

    positions = model.transformer.wpe(torch.arange(T)).unsqueeze(0)  # (1, T, C)
    scores, weights = scores_and_weights(model.transformer.wte(idx) + positions)
    t = query
    if not 0 <= t < T:
        raise UsageError(f"--query must be a position of --line, 0 to {T - 1}, got {t}")
    print(f"query at {t} {line[t]!r}; its keys with the largest weights:")
    for s in weights[t].argsort(descending=True)[:5].tolist():
        print(f"  key {s:2d} {line[s]!r}  offset {t - s:2d}  q.k/sqrt(hs) {scores[t, s]:6.2f}  weight {weights[t, s]:.3f}")
    for offset in range(4):
        print(f"offset {offset}: mean weight {weights.diagonal(-offset).mean():.3f} over {T - offset} queries")
    _, alone = scores_and_weights(positions)  # the same head fed the positions alone, every character taken out
    print(f"positions alone: mean weight at offset 1 {alone.diagonal(-1).mean():.3f}")


@torch.no_grad()
def bigram_probabilities(out_dir, record=None):
    """What the bigram stage's table says follows a character (10.3.1): its next-character probabilities,
    the same at every position since its logits depend on the current character alone."""
    model, tokenizer = load_stage("bigram", out_dir)
    vocab = model.config.vocab_size
    probs = torch.softmax(model(torch.arange(vocab).view(vocab, 1))[0][:, -1, :], dim=-1)  # (V, V): row = current
    p = lambda a, chars: sum(probs[tokenizer.encode(a)[0], tokenizer.encode(c)[0]].item() for c in chars)
    top = lambda a: tokenizer.decode([int(probs[tokenizer.encode(a)[0]].argmax())])
    vowels = {c: round(p(c, "aeiou"), 4) for c in "bhv"}
    data = {"newline_capital": p("\n", string.ascii_uppercase), "newline_newline": p("\n", "\n"),
            "q_u": p("q", "u"), "vowel_after": vowels, "vowel_min": min(vowels.values()),
            "vowel_max": max(vowels.values()), "first_guess": {c: top(c) for c in "dr"}}
    print(json.dumps(data, indent=1))
    if not all(guess == " " for guess in data["first_guess"].values()):
        print("note: after d or r the first guess is not a space")
    if record:
        quoted = [{"doc": f"docs/{lang}/10-build-up.md", "text": text} for lang, text in (
            ("en", "it puts {newline_capital:.2f} of the probability on a capital (and {newline_newline:.2f} on a "
                   "second newline), after `q` {q_u:.2f} on `u`, after `b`, `h` or `v` from {vowel_min:.2f} to "
                   "{vowel_max:.2f} on a vowel"),
            ("zh", "它把 {newline_capital:.2f} 的概率给大写字母（另有 {newline_newline:.2f} 给又一个换行）；`q` 之后，"
                   "{q_u:.2f} 给 `u`；`b`、`h` 或 `v` 之后，{vowel_min:.2f} 到 {vowel_max:.2f} 给元音"))]
        write_record(record, "10.3.1: the bigram stage's next-character probabilities",
                     f"python docs/buildup.py bigram --without_bf16; python docs/buildup.py --bigram {out_dir} "
                     f"--record {record}", {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()},
                     quoted)


def main():
    parser = ablations.ArgumentParser(description="Train one stage of the build-up from a bigram to the GPT; "
                                      "score the whole val split.", allow_abbrev=False)
    parser.add_argument("stage", nargs="?", help=f"one of: {', '.join(STAGES)}")
    parser.add_argument("--report", nargs="+", metavar="run_folder", help="table and chart of finished stages")
    parser.add_argument("--out", default="buildup.png", help="the chart --report writes (a .png)")
    parser.add_argument("--head", metavar="run_folder", help="show head 0 of block 0 of a finished stage on --line")
    parser.add_argument("--line", default=LINE, help="the text --head reads")
    parser.add_argument("--query", type=int, default=LINE.index("speak") + 2, help="the position --head explains")
    parser.add_argument("--unigram", metavar="input.txt", help="the val loss of the character frequencies alone")
    parser.add_argument("--bigram", metavar="run_folder", help="the bigram stage's next-character probabilities")
    parser.add_argument("--record", metavar="name", help="with --report or --bigram: also write records/<name>.json")
    parser.add_argument("--without_bf16", action="store_true",
                        help="Muon's Newton-Schulz steps in float32, as on a CPU without bfloat16 instructions")
    args, train_args = parser.parse_known_args()
    if args.bigram:
        bigram_probabilities(args.bigram, args.record)
    elif args.unigram:
        with open(args.unigram, encoding="utf-8") as f:
            print(f"unigram loss on val: {unigram_loss(f.read()):.3f} nats per character")
    elif args.head:
        show_head(args.head, args.line, args.query)
    elif args.report:
        ablations.check_png(args.out)
        report(args.report, args.out, args.record)
    elif args.stage in STAGES:
        if args.without_bf16:
            ablations.without_bf16()
        run_stage(args.stage, train_args, (["--without_bf16"] if args.without_bf16 else []) + train_args)
    else:
        raise ablations.unknown("stage", args.stage, STAGES)


if __name__ == "__main__":
    run_cli(main)
