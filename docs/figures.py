"""
Pictures of the ideas, drawn from the real code into docs/img (chapters 3, 5 and 6 show them):

    python docs/figures.py --ckpt out-shakespeare-char-cpu/ckpt.pt   # a trained CPU-recipe model
    python docs/figures.py                                           # no checkpoint: train the CPU recipe first
    python docs/figures.py --experiments                             # chapter 4's plots: run its commands
    python docs/figures.py --ckpt ... --record trained-recipe        # also records/trained-recipe.json

    block.png           the block and the residual stream, with the model's own parameter counts
    causal-mask.png     CausalSelfAttention.causal_mask and what it does to a head's weights
    attention-maps.png  a few heads on a line of Shakespeare, trained and at initialisation
    lr-schedules.png    train.get_lr for each training recipe in config/
    optimizer-step.png  one optimizer step: micro-batches, accumulate, unscale, clip, step, zero_grad
    kv-cache.png        the KV cache filling during generation

Chapter 4's pictures are plots of its experiments: `--experiments` runs that chapter's `bash runnable`
commands in order, the trainings and the `plot.py` calls that draw cpu-recipe.png, lr-sweep.png and the rest
(about 20 minutes on a 2-core CPU). Chapter 8's chart comes from docs/ablations.py, chapter 10's from
docs/buildup.py, and the lens's screenshots from its browser test (tests/test_lens.py says how).
"""

import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/figures.py`: the modules it draws live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import torch

from machinery import configurator
import model as model_py
import train
from record import write_record
from machinery.checkpoint import load_checkpoint
from machinery.cli import ArgumentParser, UsageError, run_cli
from data import load_split, tokenizer_from, windows_at
from model import GPT, GPTConfig

LINE = "Before we proceed any further, hear me speak."  # the second line of tiny Shakespeare
DPI = 100


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path)
    pyplot().close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# The models: the checkpoint's, and the same architecture at the initialisation its run began from


def load_trained(ckpt_path):
    tensors, meta = load_checkpoint(ckpt_path)
    trained = GPT(GPTConfig(**meta["model_args"]))
    trained.load_state_dict(tensors["model"])
    return trained.eval(), meta


def initial_model(meta):
    """train.py seeds torch with `seed` right before it builds the model: the same call gives the
    exact weights the run started from."""
    torch.manual_seed(meta["config"]["seed"])
    return GPT(GPTConfig(**meta["model_args"])).eval()


def encode_line(meta, line):
    ids = tokenizer_from(meta["tokenizer"]).encode(line)[:meta["model_args"]["block_size"]]
    return torch.tensor([ids], dtype=torch.long)  # (1, T)


@torch.no_grad()
def attention_weights(gpt, idx):
    """[(nh, T, T) per layer]: the softmax weights of the explicit path, caught where they pass through
    attn_dropout (an identity in eval mode)."""
    caught, hooks = [], []
    for block in gpt.transformer.h:
        block.attn.attention = "explicit"  # the path that forms the weights as a tensor
        hooks.append(block.attn.attn_dropout.register_forward_hook(lambda m, args, out: caught.append(out[0])))
    gpt(idx)
    for hook in hooks:
        hook.remove()
    for block in gpt.transformer.h:
        block.attn.attention = gpt.config.attention
    return caught


@torch.no_grad()
def stream_sizes(gpt, idx):
    """RMS of the residual stream entering each block, and of what attention and the MLP add to it."""
    t = gpt.transformer
    x = t.wte(idx) + t.wpe(torch.arange(idx.size(1)))
    rms = lambda v: v.pow(2).mean().sqrt().item()
    rows = []
    for block in t.h:
        attn = block.attn(block.ln_1(x))
        mlp = block.mlp(block.ln_2(x + attn))
        rows.append((rms(x), rms(attn), rms(mlp)))
        x = x + attn + mlp
    return rows


def mean_offset_weight(weights, offset):
    """weights (T, T) of one head -> the mean weight its queries put on the key `offset` places back."""
    return weights.diagonal(-offset).mean().item()


def trained_sizes(trained, idx, mask_chars=16):
    """The figures chapter 5 quotes from the pictures: the stream's sizes (block.png) and how much the first
    block's heads look back one and two characters (causal-mask.png on the first mask_chars characters,
    attention-maps.png on the whole line)."""
    t = trained.transformer
    rms = lambda v: v.pow(2).mean().sqrt().item()
    with torch.no_grad():
        embeddings = rms(t.wte(idx) + t.wpe(torch.arange(idx.size(1))))
    rows = stream_sizes(trained, idx)
    first = attention_weights(trained, idx)[0]  # (nh, T, T) of block 0 on the whole line
    short = attention_weights(trained, idx[:, :mask_chars])[0]  # (nh, n, n): causal-mask.png's corner
    sharpest = int(short.max(dim=-1).values.mean(dim=-1).argmax())  # the head causal_mask_figure shows
    r = lambda v: round(v, 3)
    return {"embeddings_rms": r(embeddings), "n_embd_sqrt": r(math.sqrt(trained.config.n_embd)),
            "blocks": [{"stream_in": r(a), "attn_adds": r(b), "mlp_adds": r(c)} for a, b, c in rows],
            "first_mlp": r(rows[0][2]), "later_mlp_min": r(min(c for _, _, c in rows[1:])),
            "later_mlp_max": r(max(c for _, _, c in rows[1:])), "stream_into_last": r(rows[-1][0]),
            "attn_min": r(min(b for _, b, _ in rows)), "attn_max": r(max(b for _, b, _ in rows)),
            "mask_head": sharpest, "mask_head_previous": r(mean_offset_weight(short[sharpest], 1)),
            "line_previous": [r(mean_offset_weight(w, 1)) for w in first],
            "line_two_back": [r(mean_offset_weight(w, 2)) for w in first]}


SIZES_QUOTED = [
    ("en", "this head (the sharpest\nof the four) puts {mask_head_previous:.2f} of each row, on average, on the previous "
           "character"),
    ("zh", "这个头（四个头中最尖锐的一个）平均把每一行的 {mask_head_previous:.2f} 放在前一个字符上"),
    ("en", "In the first block one head puts {line_previous_max:.2f} of each row, on average, on the previous "
           "character and another {line_two_back_max:.2f} on the character before that"),
    ("zh", "在第一个块里，一个头平均把每一行的 {line_previous_max:.2f} 放在前一个字符上，另一个头把 {line_two_back_max:.2f}\n"
           "放在再前面一个字符上"),
    ("en", "the embeddings enter the stream small (an RMS of {embeddings_rms:.2f}); the first block's MLP writes most "
           "of what the stream then holds (an RMS of {first_mlp:.1f}), each later MLP adds about as much again "
           "({later_mlp_min:.1f} to {later_mlp_max:.1f}), so the stream is about {stream_into_last:.0f} as it enters "
           "the last block, and attention's additions are the smallest of all ({attn_min:.1f} to {attn_max:.1f})"),
    ("en", "(`sqrt(C)`, about {n_embd_sqrt:.1f}, times the RMS of the picture)"),
    ("en", "(val loss {val_loss:.4f})"),
    ("zh", "嵌入进入残差流时很小（RMS 为 {embeddings_rms:.2f}）；第一个块的 MLP 写入了残差流此后的大部分内容"
           "（RMS {first_mlp:.1f}），后面每个 MLP 又加上差不多同样多的量（{later_mlp_min:.1f} 到 {later_mlp_max:.1f}），"
           "所以进入最后一个块时\n残差流已增长到约 {stream_into_last:.0f}；注意力添加的内容最小（{attn_min:.1f} 到 {attn_max:.1f}）"),
    ("zh", "约 {n_embd_sqrt:.1f} 倍"),
    ("zh", "（验证损失 {val_loss:.4f}）"),
]


def run_metrics(ckpt):
    """The figures chapters 3 and 4.2 quote from the run that wrote the checkpoint (its metrics.jsonl beside it):
    the last evaluation, the gradient norm after the first steps, and the update ratio at its first and last
    measurement."""
    path = os.path.join(os.path.dirname(ckpt), "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    steps = [e for e in lines if e["type"] == "train"]
    last_clipped = max((e["iter"] for e in steps if e["clipped"]), default=0)
    later = [e["grad_norm"] for e in steps if e["iter"] > last_clipped]
    updates = [(e["iter"], e["update_ratio_log10"]["all"]) for e in steps if e["update_ratio_log10"]]
    final = [e for e in lines if e["type"] == "eval"][-1]
    return {"final_iter": final["iter"], "final_train_loss": round(final["train_loss"], 4),
            "final_val_loss": round(final["val_loss"], 4), "last_clipped_step": last_clipped,
            "grad_norm_after_min": round(min(later), 3), "grad_norm_after_max": round(max(later), 3),
            "update_first_step": updates[0][0], "update_first": round(updates[0][1], 2),
            "update_last_step": updates[-1][0], "update_last": round(updates[-1][1], 2)}


RUN_QUOTED = [
    ("en", "04-experiments.md", "Rerun on the Zen 4 with Muon's steps in float32 (`docs/ablations.py none --without_bf16`), it ends "
           "with `eval {final_iter}: train loss {final_train_loss:.4f}, val loss {final_val_loss:.4f}`"),
    ("zh", "04-experiments.md", "在 Zen 4 上让 Muon 的迭代用 float32 重跑（`docs/ablations.py none --without_bf16`），它以 "
           "`eval {final_iter}: train loss {final_train_loss:.4f}, val loss {final_val_loss:.4f}` 结束"),
    ("en", "04-experiments.md", "and then stays between {grad_norm_after_min:.1f} and {grad_norm_after_max:.1f}"),
    ("zh", "04-experiments.md", "之后保持在 {grad_norm_after_min:.1f} 到 {grad_norm_after_max:.1f} 之间"),
    ("en", "04-experiments.md", "{update_first:.2f} at step {update_first_step}"),
    ("zh", "04-experiments.md", "第 {update_first_step} 步是 {update_first:.2f}"),
    ("en", "04-experiments.md", "falls to {update_last:.2f} as the rate"),
    ("zh", "04-experiments.md", "降到 {update_last:.2f}"),
    ("en", "03-training-loop.md", "its `update` was {update_first:.2f} at step {update_first_step} and fell to "
           "{update_last:.2f} at step {update_last_step}"),
    ("zh", "03-training-loop.md", "它的 `update` 在第 {update_first_step} 步是 {update_first:.2f}，到第 "
           "{update_last_step} 步降到 {update_last:.2f}"),
]


def record_sizes(name, ckpt, trained, meta, idx):
    data = trained_sizes(trained, idx)
    run = run_metrics(ckpt)
    data.update(run)
    data["line_previous_max"], data["line_two_back_max"] = max(data["line_previous"]), max(data["line_two_back"])
    data["val_loss"] = round(meta.get("best_val_loss", float("nan")), 4)
    print(json.dumps(data, indent=1))
    write_record(name, "chapter 5's figures read from the pictures: a trained CPU-recipe model's residual stream "
                 "sizes (RMS) and its first block's attention on the line of LINE", f"python docs/figures.py "
                 f"--ckpt {ckpt} --record {name}", data,
                 [{"doc": f"docs/{lang}/05-model.md", "text": text} for lang, text in SIZES_QUOTED] +
                 [{"doc": f"docs/{lang}/{doc}", "text": text} for lang, doc, text in (RUN_QUOTED if run else [])])


# ---------------------------------------------------------------------------------------------
# The figures


def block_figure(trained, idx, out_dir):
    plt = pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 5.6), dpi=DPI, gridspec_kw={"width_ratios": [1.3, 1]})
    cfg, t = trained.config, trained.transformer
    block = t.h[0]
    count = lambda module: f"{sum(p.numel() for p in module.parameters()):,}"
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 12.5)
    ax.axis("off")

    def box(x, y, text, colour, width):
        ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.4), width, 0.8, boxstyle="round,pad=0.05",
                                    facecolor=colour, edgecolor="black", linewidth=0.8))
        ax.text(x, y, text, ha="center", va="center", fontsize=8)

    def arrow(a, b, **kw):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, linewidth=1, **kw))

    stream = 2.8  # x of the residual stream
    ax.add_patch(FancyArrowPatch((stream, 1.3), (stream, 11.1), arrowstyle="-|>", mutation_scale=18,
                                 linewidth=5, color="tab:blue", alpha=0.35))
    ax.text(stream - 0.45, 6.2, f"residual stream x: (B, T, {cfg.n_embd})", rotation=90, ha="center", va="center",
            fontsize=8, color="tab:blue")
    box(stream, 0.8, f"wte(idx) + wpe(pos)  [{count(t.wte)} + {count(t.wpe)}]", "white", 5.4)
    for y, ln_name, ln, name, layer, colour in [(3.0, "ln_1", block.ln_1, "attn", block.attn, "#f4c28f"),
                                                (6.6, "ln_2", block.ln_2, "mlp", block.mlp, "#b9dfb1")]:
        box(6.0, y, f"{ln_name}  [{count(ln)}]", "#eeeeee", 2.0)
        box(9.6, y + 1.2, f"{name}  [{count(layer)}]", colour, 3.2)
        arrow((stream, y), (5.0, y))
        arrow((7.0, y), (9.0, y + 0.8))
        arrow((9.6, y + 1.6), (stream + 0.25, y + 2.2), connectionstyle="arc3,rad=0.25")
        ax.text(stream, y + 2.2, "+", ha="center", va="center", fontsize=16, fontweight="bold")
    ax.text(5.2, 10.2, f"block 0 of {cfg.n_layer} (Block.forward):\n  x = x + attn(ln_1(x))\n  x = x + mlp(ln_2(x))",
            fontsize=8, family="monospace", va="center")
    box(stream, 11.7, f"ln_f -> lm_head (wte, tied) -> logits (B, T, {cfg.vocab_size})", "white", 5.4)
    ax.set_title("The block: pre-LayerNorm; each sub-layer adds into the stream\n[parameter counts of this model]",
                 fontsize=10)

    rows = stream_sizes(trained, idx)
    layers = list(range(len(rows)))
    width = 0.27
    bars.bar([i - width for i in layers], [r[0] for r in rows], width, label="the stream entering the block",
             color="tab:blue", alpha=0.5)
    bars.bar(layers, [r[1] for r in rows], width, label="what attn adds", color="#e8964a")
    bars.bar([i + width for i in layers], [r[2] for r in rows], width, label="what mlp adds", color="#6cb35e")
    bars.set_xticks(layers, [f"block {i}" for i in layers])
    bars.set_ylabel("RMS over the line's positions and features")
    bars.set_title("The trained model on one line of Shakespeare", fontsize=10)
    bars.legend(fontsize=8)
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save(fig, out_dir, "block.png")


def causal_mask_figure(trained, initial, idx, meta, out_dir):
    plt = pyplot()
    n = min(16, idx.size(1))
    chars = list(tokenizer_from(meta["tokenizer"]).decode(idx[0, :n].tolist()).replace("\n", "\u21b5"))
    mask = trained.transformer.h[0].attn.causal_mask[:n, :n]
    trained_heads = attention_weights(trained, idx[:, :n])[0]  # (nh, n, n) of block 0
    head = int(trained_heads.max(dim=-1).values.mean(dim=-1).argmax())  # the sharpest head once trained
    panels = [(mask.float(), f"causal_mask[:{n}, :{n}]\n(True = may look)", "Greys"),
              (attention_weights(initial, idx[:, :n])[0][head], f"head {head} of block 0, at initialisation:\n"
               "nearly uniform over the past", "Blues"),
              (trained_heads[head], "the same head, trained:\nsharp, and still only the past", "Blues")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=DPI)
    for ax, (image, title, cmap) in zip(axes, panels):
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=1)
        ax.set_xticks(range(n), chars, fontsize=7)
        ax.set_yticks(range(n), chars, fontsize=7)
        ax.set_xlabel("key: the position looked at")
        ax.set_ylabel("query: the position looking")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, "causal-mask.png")


def attention_maps_figure(trained, initial, idx, meta, out_dir, heads=4):
    plt = pyplot()
    chars = list(tokenizer_from(meta["tokenizer"]).decode(idx[0].tolist()).replace("\n", "\u21b5"))
    layers = sorted({0, trained.config.n_layer - 1})
    heads = min(heads, trained.config.n_head)
    fig, axes = plt.subplots(2 * len(layers), heads, figsize=(3.2 * heads, 3.3 * 2 * len(layers)), dpi=DPI,
                             squeeze=False)
    weights = {"at initialisation": attention_weights(initial, idx), "trained": attention_weights(trained, idx)}
    row = 0
    for layer in layers:
        for label, per_layer in weights.items():
            for h in range(heads):
                ax = axes[row, h]
                ax.imshow(per_layer[layer][h].numpy(), cmap="Blues", vmin=0, vmax=1)
                ax.set_title(f"block {layer}, head {h}, {label}", fontsize=8)
                ax.set_xticks(range(len(chars)), chars, fontsize=5)
                ax.set_yticks(range(len(chars)), chars, fontsize=5)
            row += 1
    fig.suptitle("Attention weights on a line of Shakespeare (row: the character looking; column: the one looked at)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, "attention-maps.png")


def recipes():
    """(name, config) for each training recipe in config/ (evaluation-only configs left out)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
        c = configurator.load_config(train.DEFAULTS, [path])
        if not c["eval_only"] and c["max_iters"] > 0:
            found.append((os.path.basename(path), c))
    return found


def lr_schedules_figure(out_dir):
    plt = pyplot()
    found = recipes()
    columns = 3
    rows = math.ceil(len(found) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.7 * rows), dpi=DPI, squeeze=False)
    for ax, (name, c) in zip(axes.flat, found):
        steps = range(0, c["max_iters"] + 1, max(1, c["max_iters"] // 2000))  # 2000 points are plenty
        lrs = [train.get_lr(it, c["learning_rate"], c["warmup_iters"], c["lr_decay_iters"], c["min_lr"], c["decay_lr"])
               for it in steps]
        ax.plot(list(steps), lrs, color="tab:blue")
        schedule = (f"{c['learning_rate']:g} -> {c['min_lr']:g}, warmup {c['warmup_iters']}" if c["decay_lr"]
                    else f"constant {c['learning_rate']:g}")
        ax.text(0.98, 0.95, schedule, transform=ax.transAxes, ha="right", va="top", fontsize=8)
        if c["decay_lr"] and c["warmup_iters"]:
            ax.axvline(c["warmup_iters"], color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"config/{name}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-4, 4))
        ax.set_ylim(0, max(lrs) * 1.2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.suptitle("train.get_lr for each recipe: warmup (dotted line), cosine decay to min_lr", fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, "lr-schedules.png")


def optimizer_step_figure(initial, meta, data_dir, out_dir, micro_batches=4, batch_size=4, scale=1024.0):
    """One real step of the CPU-recipe model at initialisation, with a GradScaler at a fixed scale (what
    dtype=float16 turns on), measuring the global gradient norm after each stage."""
    plt = pyplot()
    gpt = initial.train()
    params = [p for p in gpt.parameters()]
    c = meta["config"]
    optimizers = gpt.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), "cpu",
                                          optimizer=c["optimizer"])  # the recipe's own: Muon and AdamW for the CPU one
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    data = load_split(data_dir, meta["dataset"], "train")
    block_size = meta["model_args"]["block_size"]
    rng = torch.Generator().manual_seed(0)
    norm = lambda: torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    stages = []
    for micro in range(micro_batches):
        X, Y = windows_at(data, torch.randint(len(data) - block_size, (batch_size,), generator=rng), block_size, "cpu")
        _, loss = gpt(X, Y)
        scaler.scale(loss / micro_batches).backward()  # adds into .grad
        stages.append((f"backward {micro + 1}\n(scaled)", norm()))
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    stages.append(("unscale_", norm()))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    stages.append(("clip to 1.0", norm()))
    before = [p.detach().clone() for p in params]
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    change = math.sqrt(sum((p.detach() - b).pow(2).sum().item() for p, b in zip(params, before)))
    size = math.sqrt(sum(b.pow(2).sum().item() for b in before))
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    gone = all(p.grad is None for p in params)

    fig, (flow, bars) = plt.subplots(2, 1, figsize=(12, 5.6), dpi=DPI, gridspec_kw={"height_ratios": [1, 1.6]})
    flow.axis("off")
    flow.set_xlim(0, 12)
    flow.set_ylim(0, 1)
    boxes = [f"{micro_batches} micro-batches\nforward, loss / {micro_batches}", "backward:\ngrads add up in .grad",
             f"scaler.unscale_\n(divide by {scale:.0f})", "clip_grad_norm_\n(max 1.0)",
             f"{' + '.join(type(o).__name__ for o in optimizers)}.step (lr {c['learning_rate']:g})\nlog10 |dw| / |w| = {math.log10(change / size):.2f}", "zero_grad\n" + ("grads -> None" if gone else "grads zeroed")]
    for i, text in enumerate(boxes):
        x = 1.0 + i * 2.0
        flow.text(x, 0.5, text, ha="center", va="center", fontsize=8,
                  bbox=dict(boxstyle="round,pad=0.4", facecolor="#f3f3f3", edgecolor="black", linewidth=0.8))
        if i:
            flow.annotate("", xy=(x - 0.92, 0.5), xytext=(x - 1.08, 0.5), arrowprops=dict(arrowstyle="-|>"))
    flow.set_title("One optimizer step in train.py: the order of the calls", fontsize=10)
    names, values = zip(*stages)
    bars.bar(range(len(values)), values, color=["#9ecae1"] * micro_batches + ["#e8964a", "#6cb35e"])
    for i, v in enumerate(values):
        bars.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    bars.set_yscale("log")
    bars.set_xticks(range(len(names)), names, fontsize=8)
    bars.set_ylabel("global gradient norm")
    bars.set_title(f"measured on the CPU recipe's model at initialisation, {micro_batches} micro-batches of "
                   f"{batch_size} windows (a scale of {scale:.0f}, as float16 would use)", fontsize=9)
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save(fig, out_dir, "optimizer-step.png")


def kv_cache_figure(out_dir, block_size=16, prompt=5, new_tokens=20):
    """Which cache slots each generation step writes, reads and leaves hidden, recorded from KVCache.write
    while GPT.generate runs a small random model."""
    plt = pyplot()
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=65, block_size=block_size, n_layer=1, n_head=1, n_embd=16)).eval()
    writes, original = [], model_py.KVCache.write

    def recording_write(cache, k, v, pos):
        writes.append(pos.tolist())
        return original(cache, k, v, pos)
    model_py.KVCache.write = recording_write
    try:
        gpt.generate(torch.zeros(1, prompt, dtype=torch.long), new_tokens, temperature=0)
    finally:
        model_py.KVCache.write = original
    grid = torch.zeros(len(writes), block_size)  # 0 empty, 1 hidden (stale), 2 read from the cache, 3 written now
    filled = torch.zeros(block_size, dtype=torch.bool)
    for step, positions in enumerate(writes):
        filled[positions] = True
        newest = max(positions)  # the last query sees keys 0..newest (the causal mask's row)
        grid[step] = torch.where(filled, 1.0, 0.0)
        grid[step, :newest + 1] = 2
        grid[step, positions] = 3
    from matplotlib.colors import ListedColormap
    fig, ax = plt.subplots(figsize=(8, 6), dpi=DPI)
    ax.imshow(grid.numpy(), cmap=ListedColormap(["white", "#dddddd", "#9ecae1", "#e8964a"]), vmin=0, vmax=3,
              aspect="auto")
    ax.set_xticks(range(block_size))
    labels = [f"position {p[0]}" if len(p) == 1 else ("prefill" if step == 0 else "refill") + f" 0..{p[-1]}"
              for step, p in enumerate(writes)]
    ax.set_yticks(range(len(writes)), labels, fontsize=7)
    ax.set_xlabel("cache slot = position (block_size = %d)" % block_size)
    ax.set_ylabel("forward call")
    ax.set_xticks([x - 0.5 for x in range(block_size + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(len(writes) + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#e8964a", label="keys/values written by this call"),
                       Patch(color="#9ecae1", label="read from the cache"),
                       Patch(color="#dddddd", label="left from before the refill, hidden by the mask")],
              fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)
    ax.set_title(f"KV cache of one layer while GPT.generate writes {new_tokens} tokens after a {prompt}-token "
                 "prompt", fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, "kv-cache.png")


# ---------------------------------------------------------------------------------------------
# Chapter 4's plots: its own commands, as a reader runs them

EXPERIMENTS = os.path.join(ROOT, "docs", "en", "04-experiments.md")
BASH_RUNNABLE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```", flags=re.M | re.S)


def commands_of(body):
    """A shell block's commands as argv lists: one per line, '\\' continues a line, '#' starts a comment
    (tests/test_docs.py reads every chapter's shell blocks with it too)."""
    joined = re.sub(r"\\\n", " ", body)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def split_variables(argv):
    """({name: value} of the `NAME=value` words in front, the command after them)."""
    count = next((i for i, word in enumerate(argv) if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word)), len(argv))
    return dict(word.split("=", 1) for word in argv[:count]), argv[count:]


def experiment_commands(chapter=EXPERIMENTS):
    """The chapter's `bash runnable` commands, in order (the zh chapter has the same ones: the docs tests check)."""
    with open(chapter, encoding="utf-8") as f:
        text = f.read()
    return [argv for block in BASH_RUNNABLE.findall(text) for argv in commands_of(block)]


def run_command(argv):
    """One command such as `OMP_NUM_THREADS=1 python train.py ...`, run from the repository root with this Python."""
    variables, command = split_variables(argv)
    if command[:1] == ["python"]:
        command = [sys.executable, *command[1:]]
    print("running:", shlex.join(argv), flush=True)
    if subprocess.run(command, cwd=ROOT, env={**os.environ, **variables}).returncode:
        raise UsageError(f"this command of chapter 4 failed (see above): {shlex.join(argv)}")


def run_experiments():
    for argv in experiment_commands():
        run_command(argv)


# ---------------------------------------------------------------------------------------------


def train_recipe(iters, data_dir, train_dir):
    """No checkpoint given: train the CPU recipe as it is, or for `iters` steps (its schedule squeezed to fit)."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "shakespeare_char_cpu.py"),
               f"--data_dir={data_dir}", f"--out_dir={train_dir}", "--replace_earlier_run=True"]
    if iters:
        command += [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"]
    print("training:", " ".join(command[1:]))
    if subprocess.run(command).returncode:
        raise UsageError("the training run for the figures failed (see above)")
    return os.path.join(train_dir, "ckpt.pt")


def main():
    parser = ArgumentParser(description="Draw the docs' pictures of the ideas from the real code.")
    parser.add_argument("--ckpt", help="a trained CPU-recipe checkpoint (default: train one with --iters steps)")
    parser.add_argument("--iters", type=int, help="when --ckpt is not given, train the CPU recipe for this many steps "
                        "instead of its own max_iters (a quick look; the docs' pictures use the whole recipe)")
    parser.add_argument("--train_dir", default="out-figures", help="where that training run is written")
    parser.add_argument("--data_dir", default="data", help="datasets folder (the optimizer-step figure draws batches)")
    parser.add_argument("--line", default=LINE, help="the text the attention figures look at")
    parser.add_argument("--out_dir", default=os.path.join("docs", "img"))
    parser.add_argument("--record", metavar="name", help="also write records/<name>.json: the sizes chapter 5 quotes")
    parser.add_argument("--experiments", action="store_true",
                        help="instead: run chapter 4's commands, which train its experiments and plot them")
    args = parser.parse_args()
    if args.experiments:
        return run_experiments()
    if args.iters is not None and args.iters < 1:
        raise UsageError(f"--iters must be at least 1, got {args.iters}")
    ckpt = args.ckpt or train_recipe(args.iters, args.data_dir, args.train_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    trained, meta = load_trained(ckpt)
    initial = initial_model(meta)
    idx = encode_line(meta, args.line)
    if args.record:
        record_sizes(args.record, ckpt, trained, meta, idx)
    block_figure(trained, idx, args.out_dir)
    causal_mask_figure(trained, initial, idx, meta, args.out_dir)
    attention_maps_figure(trained, initial, idx, meta, args.out_dir)
    lr_schedules_figure(args.out_dir)
    optimizer_step_figure(initial_model(meta), meta, args.data_dir, args.out_dir)
    kv_cache_figure(args.out_dir)


if __name__ == "__main__":
    run_cli(main)
