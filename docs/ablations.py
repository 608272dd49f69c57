"""
Chapter 8's ablations: train the CPU recipe with one piece of the model taken away and compare the val
losses. model.py stays as it is: each switch here edits a freshly built GPT (through a subclass that
train.py builds in place of GPT), and train.py's own loop trains and evaluates it.

    python docs/ablations.py none                      # the full model, as a reference
    python docs/ablations.py no_pos_emb                # one piece taken away; see ABLATIONS for the names
    python docs/ablations.py no_mlp --max_iters=200    # any other flag goes to train.py, after the recipe
    python docs/ablations.py bigram                    # the floor: the next token from the current one alone
    python docs/ablations.py --report out-ablations/* --out docs/img/ablations.png   # table and bar chart
    python docs/ablations.py none --without_bf16       # as on a CPU without bfloat16 instructions (chapter 8's)
    python docs/ablations.py --report out-ablations/* --record ablations-zen4   # and that record

Each run writes its folder (out-ablations/<name> unless --out_dir says otherwise) with train.py's usual
files plus ablation.json: the name, the final val loss, the parameter count, the command and a sample.
"""

import json
import math
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/ablations.py`: the modules it uses live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import torch
import torch.nn as nn

from machinery import configurator, devices
import train
from machinery.checkpoint import load_checkpoint
from machinery.cli import ArgumentParser, UsageError, run_cli
from data import tokenizer_from
from machinery.faults import atomic_write
from model import GPT, GPTConfig
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # record.py sits beside this file
from record import write_record  # noqa: E402

RECIPE = os.path.join(ROOT, "config", "shakespeare_char_cpu.py")


# ---------------------------------------------------------------------------------------------
# The switches: each takes a freshly initialised GPT and takes one piece away


def no_pos_emb(model):
    """Position embeddings held at zero and never trained: no learned position signal is left, only what
    causal attention can infer (a position sees as many tokens as it is far from the start)."""
    nn.init.zeros_(model.transformer.wpe.weight)
    model.transformer.wpe.weight.requires_grad_(False)


def forward_without_residual(self, x, *cache_args):
    x = self.attn(self.ln_1(x), *cache_args)  # each sub-layer replaces the stream instead of adding to it
    return self.mlp(self.ln_2(x))


def no_residual(model):
    for block in model.transformer.h:
        block.forward = types.MethodType(forward_without_residual, block)


def no_layernorm(model):
    """Every LayerNorm (ln_1, ln_2 in each block, ln_f at the top) replaced by the identity."""
    for block in model.transformer.h:
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    model.transformer.ln_f = nn.Identity()


def forward_without_mlp(self, x, *cache_args):
    return x + self.attn(self.ln_1(x), *cache_args)


def no_mlp(model):
    """Blocks of attention only: the MLP and the LayerNorm in front of it are gone."""
    for block in model.transformer.h:
        del block.mlp, block.ln_2
        block.forward = types.MethodType(forward_without_mlp, block)


def no_attention_scale(model):
    """Attention scores q . k without the 1/sqrt(hs): the queries leave c_attn sqrt(hs) times larger,
    which the attention's own 1/sqrt(hs) then cancels exactly."""
    C, hs = model.config.n_embd, model.config.n_embd // model.config.n_head

    def unscale_queries(module, inputs, qkv):  # qkv (B, T, 3C): queries first
        q, kv = qkv.split([C, 2 * C], dim=-1)
        return torch.cat([q * math.sqrt(hs), kv], dim=-1)
    for block in model.transformer.h:
        block.attn.c_attn.register_forward_hook(unscale_queries)


def no_weight_tying(model):
    """lm_head gets its own (V, C) matrix, drawn like every other weight; wte keeps the original."""
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight).normal_(0.0, 0.02))


def no_scaled_init(model):
    """The residual projections drawn with std 0.02 like every other matrix, not 0.02 / sqrt(2 n_layer)."""
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02)


def no_causal_mask(model):
    """Every position may look at every other, the future included (with --attention=explicit, the path
    that reads the mask buffer). Training can then copy the answer; generation cannot."""
    for block in model.transformer.h:
        block.attn.causal_mask.fill_(True)


def bigram(model):
    """The floor: no blocks, no position embeddings and an untied head, so the logits at a position
    depend on its own token only: a table of next-token scores per token, trained like the rest."""
    model.transformer.h = nn.ModuleList()
    no_pos_emb(model)
    no_weight_tying(model)


# name -> (what it takes away, the switch or None, extra train.py flags)
ABLATIONS = {
    "none": ("nothing: the full model", None, []),
    "no_pos_emb": ("position embeddings", no_pos_emb, []),
    "no_residual": ("residual connections", no_residual, []),
    "no_layernorm": ("LayerNorm", no_layernorm, []),
    "no_mlp": ("the MLP", no_mlp, []),
    "one_head": ("multi-head attention (one head of 128)", None, ["--n_head=1"]),
    "no_attention_scale": ("the 1/sqrt(hs) scale", no_attention_scale, []),
    "no_weight_tying": ("weight tying", no_weight_tying, []),
    "no_scaled_init": ("the scaled init of residual projections", no_scaled_init, []),
    "no_causal_mask": ("the causal mask (a cheat, for chapter 8's exercise)", no_causal_mask, ["--attention=explicit"]),
    "bigram": ("all but the current token (a bigram model)", bigram, ["--optimizer=adamw"]),  # no blocks: nothing for Muon
}


# what chapter 8 says of a rerun of its table (python docs/ablations.py --report ... --record ablations-zen4)
RERUN_QUOTED = [("docs/en/08-ablations.md", "every loss but `{largest_at}`'s came out within {next_largest_difference:.3f} of "
                 "the table's"),
                ("docs/zh/08-ablations.md", "除 `{largest_at}` 外，每个损失与表中的相差都不超过 {next_largest_difference:.3f}"),
                ("docs/en/08-ablations.md", "ending at {rows[no_residual][val_loss]:.3f}"),
                ("docs/zh/08-ablations.md", "最终为 {rows[no_residual][val_loss]:.3f}")]


def ablated_gpt(switch):
    """A GPT class that applies `switch` to each model it builds; train.py builds it in place of GPT."""
    class AblatedGPT(GPT):
        def __init__(self, config):
            super().__init__(config)
            if switch is not None:
                switch(self)
    return AblatedGPT


# ---------------------------------------------------------------------------------------------
# Runs and the report


def train_ablation(name, train_args):
    """Train the recipe with one switch through train.py's own loop; return the run's settings."""
    _, switch, flags = ABLATIONS[name]
    return train_switched(switch, flags, train_args, f"out-ablations/{name}")


def train_switched(switch, flags, train_args, out_dir):
    """Train the recipe, `flags` and then `train_args`, on GPTs that `switch` edits (docs/buildup.py too)."""
    argv = [RECIPE, *flags, *train_args]
    if not any(a.startswith("--out_dir=") for a in argv):
        argv.append(f"--out_dir={out_dir}")
    train.GPT = ablated_gpt(switch)
    sys.argv = ["train.py", *argv]  # train.run reads its settings from the command line
    train.run()
    return configurator.load_config(train.DEFAULTS, argv)


def final_val_loss(out_dir):
    """The val loss of the run's last evaluation; for the CPU recipe train.py scores the whole val split
    (evaluation.py: whole_split_starts), so ablations are compared on exactly the same 111,540 characters."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [e for e in map(json.loads, f) if e["type"] == "eval"]
    return evals[-1]["val_loss"]


def load_ablated(name, out_dir):
    """The run's final model, rebuilt with the same switch, and its tokenizer."""
    tensors, meta = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = ablated_gpt(ABLATIONS[name][1])(GPTConfig(**meta["model_args"]))
    model.load_state_dict(tensors["model"])
    return model.eval(), tokenizer_from(meta["tokenizer"])


def sample(model, tokenizer, prompt="ROMEO:", tokens=200, seed=1337):
    """What the ablated model writes: temperature 0.8, a fixed seed."""
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    out = model.generate(idx, tokens, temperature=0.8, generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0].tolist())


def run_one(name, train_args, shown_args):
    """Train one ablation and write its ablation.json; shown_args: its command's words after the name."""
    config = train_ablation(name, train_args)
    model, tokenizer = load_ablated(name, config["out_dir"])
    record_run("ablation", name, model, tokenizer, config["out_dir"], "ablations.py", shown_args)


def record_run(kind, name, model, tokenizer, out_dir, script, train_args):
    """out_dir/<kind>.json (kind 'ablation' here, 'stage' for docs/buildup.py): the run's name, final val loss,
    parameter count, command and a sample; also said in two lines."""
    result = {kind: name, "val_loss": final_val_loss(out_dir), "params": model.num_params(),
              "command": " ".join([f"python docs/{script}", name, *train_args]), "sample": sample(model, tokenizer)}
    with atomic_write(os.path.join(out_dir, f"{kind}.json")) as f:
        json.dump(result, f, indent=1)
    print(f"{name}: val loss {result['val_loss']:.4f} ({result['params']:,} parameters)\n{result['sample']}")


def read_records(folders, kind, script, argument):
    """The <kind>.json records of the run folders, in their order."""
    results = []
    for folder in folders:
        path = os.path.join(folder, f"{kind}.json")
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found; run python docs/{script} <{argument}> first")
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    return results


def report(folders, out, record=None):
    """A markdown table on stdout and a bar chart in `out`: each ablation's loss against the full model's;
    with `record`, also records/<record>.json: the runs against chapter 8's table (records/ablations.json)."""
    results = read_records(folders, "ablation", "ablations.py", "name")
    full = next((r["val_loss"] for r in results if r["ablation"] == "none"), None)
    if record:
        write_table_record(record, "ablation", results, "ablations", RERUN_QUOTED, "ablations.py", folders,
                           "chapter 8's ablations rerun: the CPU recipe with one piece taken away, whole-split val "
                           "loss, against the table of records/ablations.json")
    print("| taken away | parameters | val loss | change |")
    print("|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["val_loss"]):
        change = f"{r['val_loss'] - full:+.3f}" if full is not None else ""
        print(f"| {ABLATIONS[r['ablation']][0]} | {r['params']:,} | {r['val_loss']:.3f} | {change} |")
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    shown = sorted(results, key=lambda r: r["val_loss"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.2), dpi=100)
    colours = ["tab:green" if r["ablation"] == "none" else "tab:grey" if r["ablation"] == "bigram" else "tab:blue"
               for r in shown]
    ax.barh([ABLATIONS[r["ablation"]][0] for r in shown], [r["val_loss"] for r in shown], color=colours)
    for i, r in enumerate(shown):
        ax.text(r["val_loss"], i, f" {r['val_loss']:.3f}", va="center", fontsize=8)
    if full is not None:
        ax.axvline(full, color="tab:green", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel("val loss at the last evaluation (nats per character)")
    ax.set_title("CPU recipe with one piece taken away", fontsize=10)
    ax.set_xlim(min(r["val_loss"] for r in shown) * 0.9, max(r["val_loss"] for r in shown) * 1.08)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def write_table_record(record, kind, results, against, quoted, script, folders, what):
    """records/<record>.json from finished runs: each run's parameters and val loss, and the largest difference
    from the table that records/<against>.json holds (the docs' table, measured on another machine), which
    the `quoted` texts [(doc, text)] quote (docs/buildup.py too). The command names the runs' own commands."""
    with open(os.path.join(ROOT, "records", f"{against}.json"), encoding="utf-8") as f:
        table = json.load(f)["data"]["rows"]
    rows = {r[kind]: {"params": r["params"], "val_loss": round(r["val_loss"], 4)} for r in results}
    missing = sorted(set(table) - set(rows))
    if missing:
        raise UsageError(f"no run folder for {', '.join(missing)} of records/{against}.json; run them first")
    differences = {name: abs(rows[name]["val_loss"] - table[name]["val_loss"]) for name in table}
    order = sorted(differences, key=differences.get, reverse=True)
    data = {"rows": rows, "against": against, "differences": {name: round(differences[name], 4) for name in order},
            "largest_at": order[0], "largest_difference": round(differences[order[0]], 4),
            "next_largest_difference": round(differences[order[1]], 4) if len(order) > 1 else 0.0,
            "same_params": all(rows[name]["params"] == table[name]["params"] for name in table)}
    runs = "; ".join(r["command"] for r in results)
    write_record(record, what, f"{runs}; python docs/{script} --report {' '.join(folders)} --record {record}",
                 data, [{"doc": doc, "text": text} for doc, text in quoted])


def without_bf16():
    """Run as a CPU without bfloat16 instructions does: Muon's Newton-Schulz steps in float32 (the model is
    float32 at 128 wide on any CPU). The docs' ablations and stages were measured on such a CPU (a Zen 3);
    this reproduces their losses on one with bfloat16 instructions."""
    devices.cpu_has_bf16 = lambda: False


def check_png(out):
    """--report's chart is a picture file: say so before any run is read (docs/buildup.py too)."""
    if not out.endswith(".png"):
        raise UsageError(f"--out must name a .png file, got '{out}'")


def unknown(kind, name, choices):
    """The one-line error for a name that is none of choices, with the closest one (docs/buildup.py too)."""
    return UsageError(f"unknown {kind} {name!r}{configurator.closest(name or '', list(choices))}; "
                      f"use one of {', '.join(choices)}")


def main():
    parser = ArgumentParser(description="Train the CPU recipe with one piece taken away; score the whole val split.",
                            allow_abbrev=False)
    parser.add_argument("ablation", nargs="?", help=f"one of: {', '.join(ABLATIONS)}")
    parser.add_argument("--report", nargs="+", metavar="run_folder", help="table and chart of finished runs")
    parser.add_argument("--out", default="ablations.png", help="the chart --report writes (a .png)")
    parser.add_argument("--record", metavar="name", help="with --report: also write records/<name>.json")
    parser.add_argument("--without_bf16", action="store_true",
                        help="Muon's Newton-Schulz steps in float32, as on a CPU without bfloat16 instructions")
    args, train_args = parser.parse_known_args()
    if args.report:
        check_png(args.out)
        report(args.report, args.out, args.record)
    elif args.ablation in ABLATIONS:
        if args.without_bf16:
            without_bf16()
        run_one(args.ablation, train_args, (["--without_bf16"] if args.without_bf16 else []) + train_args)
    else:
        raise unknown("ablation", args.ablation, ABLATIONS)


if __name__ == "__main__":
    run_cli(main)
