"""
Chapter 11's table: bytes on disk, the val loss over the whole val split and decoding speed with the KV cache,
for float32, bfloat16, int8 and int4 weights side by side in one run, for the CPU recipe's model and for a
GPT-2-sized model (124M) built from Hugging Face's GPT2Config with random weights (the trained ones need a
download; speed and bytes do not depend on the values, the loss does, so it is measured on the recipe only).

    python train.py config/shakespeare_char_cpu.py        # the recipe's model, if you have none yet
    python docs/quantization.py --ckpt out-shakespeare-char-cpu --record   # writes records/quantization.json

Decoding speed is new tokens per second at batch 1, greedy, after an 8-token prompt, the median of --repeats
rounds that take every row in turn (so that a busy moment hits them all alike). It writes the record the
chapter quotes (records/quantization.json).
"""

import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/quantization.py`: the modules it uses live one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import torch
from safetensors.torch import save

from generate import model_from_checkpoint
from machinery.checkpoint import find_checkpoint
from machinery.checks import integer, pathname
from machinery.cli import ArgumentParser, run_cli
from machinery.quantization import quantize_model, state_to_save, use_kernels
from model import GPT, GPTConfig
from quantize import val_loss, val_split
from record import machine as record_machine, write_record  # docs/record.py: commit, machine, date

# (row, scheme, group size, keep the head in float, kernels): every row but float32/bfloat16 is quantize_model's
QUANTIZED = [("int8", "int8", None, False, "auto"), ("int8_readable", "int8", None, False, "readable"),
             ("int4_g128", "int4", 128, False, "auto"), ("int4_g32", "int4", 32, False, "auto"),
             ("int4_g32_head_float", "int4", 32, True, "auto")]
PRUNED = (0.3, 0.5)  # magnitude pruning of the blocks' matrices: the share of weights set to zero
WHAT = ("bytes on disk, whole-split val loss and KV-cache decoding tokens/s of float and quantized weights, side "
        "by side: the CPU recipe's model and GPT-2 (124M) with random weights")
# the table's rows as the chapter shows them, English and Chinese (tests/test_records.py finds each, formatted)
ROWS = [("float32", "float32", "float32"), ("bfloat16", "bfloat16", "bfloat16"),
        ("int8", "int8, PyTorch's int8 kernel", "int8，PyTorch 的 int8 内核"),
        ("int8_readable", "int8, dequantized on use", "int8，用时反量化"),
        ("int4_g128", "int4, groups of 128", "int4，每组 128 列"),
        ("int4_g32", "int4, groups of 32", "int4，每组 32 列"),
        ("int4_g32_head_float", "int4, groups of 32, head in float32", "int4，每组 32 列，输出层用 float32")]
ROW = ("| {label} | {{recipe[{k}][bytes]:,}} | {{recipe[{k}][val_loss]:.4f}} | {{recipe[{k}][tokens_per_s]:.0f}} | "
       "{{gpt2[{k}][bytes]:,}} | {{gpt2[{k}][tokens_per_s]:.1f}} |")
SENTENCES = {  # (English, Chinese)
    "delta": ("int8 moves the recipe's val loss by {int8_delta:+.4f}",
              "int8 让配方模型的验证损失变化 {int8_delta:+.4f}"),
    "torchao": ("torchao 0.18's int8 dynamic quantization decoded {gpt2[int8_torchao][tokens_per_s]:.1f} tokens/s",
                "torchao 0.18 的 int8 动态量化每秒解码 {gpt2[int8_torchao][tokens_per_s]:.1f} 个词元"),
    "pruned": ("| {recipe[pruned_30][val_loss]:.4f} | {recipe[pruned_50][val_loss]:.4f} |",) * 2,
}


def quoted(data):
    """The record's quoted texts: every row of the table and each sentence, in both languages (torchao's only
    where it was measured)."""
    texts = [(ROW.format(label=en, k=k), ROW.format(label=zh, k=k)) for k, en, zh in ROWS]
    sentences = [pair for key, pair in SENTENCES.items() if key != "torchao" or "int8_torchao" in data.get("gpt2", {})]
    return [{"doc": f"docs/{lang}/11-quantization.md", "text": pair[i]}
            for pair in texts + sentences for i, lang in enumerate(("en", "zh"))]


def float_bytes(model):
    """The bytes of the model's weights as a safetensors file (each tied tensor once)."""
    return len(save(state_to_save(model)))


def quantized_bytes(model, info):
    """The bytes of the file quantize.py writes (the metadata included)."""
    return len(save(state_to_save(model), metadata={"glassgpt-quantized": json.dumps({"quantization": info})}))


def pruned(model, share):
    """A copy with the smallest share of each block matrix's weights (by magnitude) set to zero."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".h." in f".{name}":
                cut = p.abs().flatten().kthvalue(max(1, int(share * p.numel()))).values
                p.masked_fill_(p.abs() <= cut, 0.0)
    return model


def variants(model):
    """{row: model} for one float32 model: its float copies and every quantized row."""
    rows = {"float32": (model, float_bytes(model))}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    rows["bfloat16"] = (bf16, float_bytes(bf16))
    for row, scheme, group_size, keep_head, kernels in QUANTIZED:
        q, info = quantize_model(copy.deepcopy(model), scheme, group_size, keep_head)
        rows[row] = (use_kernels(q, kernels), quantized_bytes(q, info))
    return rows


def tokens_per_s(model, new_tokens, vocab):
    idx = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for token in model.generate_stream(idx, new_tokens, temperature=0):
        token.tolist()  # generate.py reads each token back to print it
    return new_tokens / (time.perf_counter() - t0)


def decode_speeds(rows, new_tokens, repeats, vocab):
    """{row: median tokens/s}, measured round-robin over the rows, each warmed up first."""
    times = {name: [] for name in rows}
    for name, model in rows.items():
        tokens_per_s(model, min(new_tokens, 8), vocab)  # warm-up: kernel choices, the int8 packing
    for _ in range(repeats):
        for name, model in rows.items():
            times[name].append(tokens_per_s(model, new_tokens, vocab))
            print(f"  {name}: {times[name][-1]:.1f} tokens/s", file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_recipe(ckpt, data_dir, new_tokens, repeats):
    model, _, meta = model_from_checkpoint(find_checkpoint(ckpt))
    model.eval()
    val, block_size = val_split(meta, data_dir), meta["model_args"]["block_size"]
    rows = variants(model)
    table = {name: {"bytes": size} for name, (_, size) in rows.items()}
    speeds = decode_speeds({name: m for name, (m, _) in rows.items()}, new_tokens, repeats,
                           meta["model_args"]["vocab_size"])
    for name, (m, _) in rows.items():
        table[name]["tokens_per_s"] = speeds[name]
        if val is not None:
            table[name]["val_loss"] = val_loss(m, val, block_size)
    if val is not None:
        for share in PRUNED:
            table[f"pruned_{int(share * 100)}"] = {"val_loss": val_loss(pruned(model, share), val, block_size)}
    return table


def gpt2_model(n_layer=12, n_head=12, n_embd=768):
    """GPT-2 (124M by default) from Hugging Face's GPT2Config, with the random weights GPT2LMHeadModel
    starts from, converted to ours key by key (machinery/hf.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from machinery.hf import hf_to_ours
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    c = hf.config
    model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                          vocab_size=c.vocab_size))
    model.load_state_dict(hf_to_ours(hf.state_dict()))
    return model.eval()


def measure_gpt2(new_tokens, repeats, sizes):
    model = gpt2_model(*sizes)
    rows = variants(model)
    try:  # torchao's int8 dynamic quantization, the other library path (not a requirement: measured if installed)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        ao = copy.deepcopy(model)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
        rows["int8_torchao"] = (ao, None)
    except ImportError:
        pass
    table = {name: {"bytes": size} for name, (_, size) in rows.items()}
    speeds = decode_speeds({name: m for name, (m, _) in rows.items()}, new_tokens, repeats, model.config.vocab_size)
    for name in rows:
        table[name]["tokens_per_s"] = speeds[name]
    table["params"] = sum(p.numel() for p in model.parameters())
    return table


def main(argv=None):
    p = ArgumentParser(description="Measure chapter 11's table of float and quantized models.")
    p.add_argument("--ckpt", required=True, type=pathname, help="the CPU recipe's checkpoint or run folder")
    p.add_argument("--data_dir", type=pathname, default="data")
    p.add_argument("--record", action="store_true", help="write records/quantization.json (else print only)")
    p.add_argument("--recipe_tokens", type=integer(1), default=200, help="new tokens per timed run, recipe")
    p.add_argument("--gpt2_tokens", type=integer(0), default=24, help="new tokens per timed run, GPT-2; 0: skip")
    p.add_argument("--gpt2_sizes", default="12,12,768", help="n_layer,n_head,n_embd of the GPT-2 model")
    p.add_argument("--repeats", type=integer(1), default=3)
    args = p.parse_args(argv)
    data = {"recipe": measure_recipe(args.ckpt, args.data_dir, args.recipe_tokens, args.repeats)}
    if args.gpt2_tokens:
        sizes = tuple(int(s) for s in args.gpt2_sizes.split(","))
        data["gpt2"] = measure_gpt2(args.gpt2_tokens, args.repeats, sizes)
    recipe = data["recipe"]
    if "val_loss" in recipe["float32"]:
        data["int8_delta"] = recipe["int8_readable"]["val_loss"] - recipe["float32"]["val_loss"]
    print(json.dumps(data, indent=1))
    if "gpt2" in data and "int8_delta" in data:  # the chapter's lines, as the record fills them in
        print("\n".join(q["text"].format(**data) for q in quoted(data)))
    if args.record:
        command = "python docs/quantization.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_record("quantization", WHAT, command, data, quoted(data),
                     f"{record_machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    run_cli(main)
