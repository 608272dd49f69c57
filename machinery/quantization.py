"""
Weight-only quantization, written out (docs chapter 11): each weight matrix kept as small integers and one
float scale per group of columns in each row, turned back into floats when it is used.

    q = round(w / scale), clamped to [-qmax, qmax]      scale = max |w| of the group / qmax
    w ~ q * scale                                        off by at most scale / 2 per element

quantize.py writes a model quantized this way into a safetensors file (integers, scales and the float rest,
with JSON metadata saying how); generate.py's model_from_checkpoint reads one back (is_quantized,
load_quantized, quantized_into) and never unpickles anything. On a CPU an int8 layer quantized per row runs
through PyTorch's own int8 kernel (fbgemm/oneDNN), fed with the same integers and scales; every other case
dequantizes on use (QuantizedLinear.forward).
"""

import json
import os
import struct
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F

from machinery.checks import fields
from machinery.cli import UsageError, first_line

SCHEMES = {"int8": 8, "int4": 4}  # the name a user gives -> bits per weight
FORMAT = "glassgpt-quantized"
FORMAT_VERSION = 1
HEAD = "lm_head"  # the output layer, whose matrix is also the token embedding (weight tying, model.py: GPT)


# ---------------------------------------------------------------------------------------------
# The quantizer: a few plain lines


def quantize(w, bits, group_size):
    """w (out, in) float -> q (out, in) int8 in [-qmax, qmax] and scale (out, in // group_size) float32:
    one absmax scale per group of group_size columns in each row (a row is an output channel);
    group_size = in gives one scale per row."""
    qmax = 2 ** (bits - 1) - 1  # 127 for int8, 7 for int4; symmetric, so 0.0 is exactly 0: no zero point
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // group_size, group_size)  # (out, n_groups, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax  # (out, n_groups, 1): the largest |w| -> qmax
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)  # a group of zeros: any scale works, not 0
    q = torch.round(groups / scale).clamp(-qmax, qmax)  # the nearest step: at most half a step off
    return q.to(torch.int8).reshape(rows, cols), scale.squeeze(-1)


def dequantize(q, scale):
    """q (out, in) int8 and scale (out, n_groups) -> w (out, in) float32: each integer times its group's scale."""
    rows, cols = q.shape
    groups = q.float().reshape(rows, scale.size(1), -1)  # (out, n_groups, group_size)
    return (groups * scale.float().unsqueeze(-1)).reshape(rows, cols)


def pack_int4(q):
    """q (out, in) int8 in [-7, 7] -> (out, in // 2) uint8: two 4-bit numbers a byte, each stored plus 8."""
    u = (q + 8).to(torch.uint8)  # 1..15
    return u[:, 0::2] | (u[:, 1::2] << 4)  # columns 0, 2, 4, ... in the low half of each byte


def unpack_int4(packed):
    """The inverse of pack_int4: (out, in // 2) uint8 -> (out, in) int8."""
    low, high = packed & 15, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.size(0), -1).to(torch.int8) - 8  # (out, in)


class QuantizedLinear(nn.Module):
    """nn.Linear whose weight is stored quantized (q: int8, or int4 packed two a byte; scale: float32) and
    dequantized when used. weight is a property, so code that reads a Linear's weight still works."""

    def __init__(self, q, scale, bias, bits):
        super().__init__()
        self.bits = bits
        self.register_buffer("q", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.kernels = "auto"  # 'readable': always dequantize on use (use_kernels)
        self.packed = None  # PyTorch's int8 form of this layer, made on its first use on a CPU

    def rows(self, index):
        """The dequantized rows index (a tensor of row numbers, or a slice): only those are unpacked."""
        q = self.q[index]
        return dequantize(unpack_int4(q) if self.bits == 4 else q, self.scale[index])

    @property
    def weight(self):
        return self.rows(slice(None)).to(self.scale.dtype)  # (out, in)

    def forward(self, x):
        if self.kernels == "auto" and self.bits == 8 and self.scale.size(1) == 1 and x.device.type == "cpu":
            return self.library(x)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def library(self, x):
        """x @ W.T + b through PyTorch's int8 kernel: the same integers and scales; the activations are
        quantized to int8 on the fly too ('dynamic' quantization), which is what makes it fast."""
        if self.packed is None:
            self.packed = int8_kernel_weights(self.q, self.scale, self.bias)
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)  # reduce_range, as nn's own layer
        return y.to(x.dtype)


def int8_kernel_weights(q, scale, bias):
    """q (out, in) int8 and its per-row scale (out, 1) as the packed weights of PyTorch's int8 linear kernel.
    PyTorch 2.13 marks its quantized tensors deprecated in favour of torchao, whose CPU int8 path measured
    slower here (docs 11.5); torch is pinned, and the tests fail when this kernel goes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the deprecation, said once in the docs instead
        zero = torch.zeros(q.size(0), dtype=torch.long)
        w = torch.quantize_per_channel(dequantize(q, scale), scale.flatten().double(), zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float()
        return torch.ops.quantized.linear_prepack(w, b)


class QuantizedEmbedding(nn.Module):
    """The token embedding tied to a quantized head: token i's vector is row i of the head's matrix, so a
    lookup dequantizes only the rows it needs."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    @property
    def weight(self):
        return self.head.weight

    def forward(self, idx):
        return self.head.rows(idx.flatten()).to(self.head.scale.dtype).view(*idx.shape, -1)  # (B, T, C)


def use_kernels(model, kernels):
    """'auto' (PyTorch's int8 kernel where it applies) or 'readable' (always dequantize on use)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernels = kernels
    return model


# ---------------------------------------------------------------------------------------------
# Quantizing a model: which layers, checked first


def quantizable(model, keep_head=False):
    """{name: nn.Linear} of the layers to quantize: the blocks' matrices, and the head (whose matrix is the
    token embedding too) unless keep_head. LayerNorms, biases and the position embeddings stay float: a
    tiny share of the bytes."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (keep_head and name == HEAD)}


def check_scheme(scheme, group_size, layers):
    """(bits, {name: group size}) or one UsageError: the scheme exists, the group size divides every width."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    bits = SCHEMES[scheme]
    sizes = {}
    for name, layer in layers.items():
        width = layer.in_features
        size = group_size or width  # 0 / None: one group per row
        if size < 1 or width % size:
            raise UsageError(f"group size {group_size} does not divide the width {width} of {name}; use a divisor "
                             f"of {width} such as {max(d for d in (32, 64, 128, width) if width % d == 0)}")
        if bits == 4 and size % 2:
            raise UsageError(f"int4 packs two numbers a byte, so its group size must be even, not {size} ({name}); "
                             "use 32 or 128")
        sizes[name] = size
    return bits, sizes


def quantize_model(model, scheme, group_size=None, keep_head=False):
    """Replace model's Linear layers by QuantizedLinear in place (the tied embedding follows the head) and return
    (model, info): info says how, as saved in the file's metadata. group_size None: one scale per row."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise UsageError("this model is already quantized; quantize the float model it came from")
    layers = quantizable(model, keep_head)
    bits, sizes = check_scheme(scheme, group_size, layers)
    for name, layer in layers.items():
        q, scale = quantize(layer.weight.detach(), bits, sizes[name])
        replace(model, name, QuantizedLinear(q, scale, layer.bias, bits))
    info = {"scheme": scheme, "bits": bits, "group_size": group_size or None, "quantized": sorted(layers)}
    return model.eval(), info


def replace(model, name, quantized):
    """Put quantized in the place of the submodule name; the head's tied embedding becomes its view."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, quantized)
    if name == HEAD:
        model.transformer.wte = QuantizedEmbedding(quantized)


# ---------------------------------------------------------------------------------------------
# The file: safetensors (tensors and a JSON header; nothing in it is ever unpickled)


def state_to_save(model):
    """{name: tensor} of a quantized model: q and scale of each quantized layer, every float tensor once (the tied
    embedding is the head's)."""
    full = model.state_dict()
    tied = HEAD + ".weight" in full  # a float head: the embedding's weight is the same tensor
    return {name: t.detach().contiguous() for name, t in full.items()
            if not name.startswith("transformer.wte.head.") and not (tied and name == "transformer.wte.weight")}


def save_quantized(path, model, meta):
    """Write model's tensors and meta (model_args, tokenizer, quantization, ...) to path as safetensors, atomically."""
    from safetensors.torch import save
    from machinery.faults import atomic_write, writing
    data = save(state_to_save(model), metadata={FORMAT: json.dumps(meta)})
    with writing(path), atomic_write(path, "wb") as f:
        f.write(data)


def header(path):
    """The JSON header of a safetensors file, or None if path is not one (a torch.save zip starts with 'PK')."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if not 2 <= size <= min(100_000_000, os.path.getsize(path) - 8):
                return None
            return json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return None


def is_quantized(path):
    """Whether path is a file quantize.py wrote (a safetensors file with our metadata)."""
    found = os.path.isfile(path) and header(path)
    return bool(found) and isinstance(found.get("__metadata__"), dict) and FORMAT in found["__metadata__"]


QUANTIZATION_FIELDS = {"scheme": (str, None, None), "bits": (int, 4, 8), "quantized": (list, 1, 10_000)}


def load_quantized(path, map_location="cpu"):
    """({'model': tensors}, meta) from a file quantize.py wrote, its metadata checked like a checkpoint's
    (machinery/checkpoint.py), or one UsageError."""
    from safetensors.torch import load_file
    from machinery.checkpoint import META_FIELDS, MODEL_ARGS_FIELDS
    fix = "quantize the float checkpoint again (python quantize.py --ckpt <run folder>)"
    try:
        tensors = load_file(path, device=str(map_location))
        meta = json.loads(header(path)["__metadata__"][FORMAT])
    except Exception as e:  # a truncated or foreign file: safetensors' own error, in one line
        raise UsageError(f"'{path}' is not a readable quantized checkpoint ({first_line(e, 100)}); {fix}")
    fields(meta, {**META_FIELDS, "quantization": (dict, None, None)}, f"'{path}'", fix)
    fields(meta["model_args"], MODEL_ARGS_FIELDS, f"'{path}' model_args", fix)
    info = fields(meta["quantization"], QUANTIZATION_FIELDS, f"'{path}' quantization", fix)
    if SCHEMES.get(info["scheme"]) != info["bits"] or not all(isinstance(n, str) for n in info["quantized"]):
        raise UsageError(f"'{path}' quantization: scheme {info['scheme']!r} with {info['bits']} bits is not one "
                         f"this code reads; {fix}")
    return {"model": tensors}, meta


def load_weights(path, map_location="cpu"):
    """(tensors, meta, quantized) of any checkpoint a script reads: a file quantize.py wrote, or one that
    train.py (or nanoGPT) wrote; the one place that tells them apart."""
    from machinery.checkpoint import load_checkpoint
    quantized = is_quantized(path)
    return (*(load_quantized if quantized else load_checkpoint)(path, map_location), quantized)


def quantized_into(model, tensors, meta):
    """Load a quantized file's tensors into model, a freshly built float GPT of the file's model_args: the
    layers its meta names become QuantizedLinear (their shapes checked), the float tensors load as usual."""
    info = meta["quantization"]
    bits = info["bits"]
    for name in info["quantized"]:
        try:
            layer = model.get_submodule(name)
            q, scale = tensors[f"{name}.q"], tensors[f"{name}.scale"]
        except (AttributeError, KeyError) as e:
            raise UsageError(f"the quantized file lacks the layer {name} ({first_line(e, 60)}); quantize again")
        out, width = layer.weight.shape
        packed = width // 2 if bits == 4 else width
        dtype = torch.uint8 if bits == 4 else torch.int8
        if (q.dtype, tuple(q.shape), scale.dtype) != (dtype, (out, packed), torch.float32) or scale.dim() != 2 \
                or scale.size(0) != out or scale.size(1) < 1 or width % scale.size(1) \
                or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise UsageError(f"the quantized file's {name} has integers {q.dtype} {tuple(q.shape)} and scales "
                             f"{scale.dtype} {tuple(scale.shape)}, which do not fit a {out}x{width} layer; "
                             "quantize again")
        unpacked = unpack_int4(q) if bits == 4 else q
        replace(model, name, QuantizedLinear(unpacked, scale, layer.bias, bits))
    floats = {k: v for k, v in tensors.items() if not k.endswith((".q", ".scale"))}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if not k.endswith((".q", ".scale")) and not k.startswith("transformer.wte.head.")]
    if HEAD not in info["quantized"]:
        missing = [k for k in missing if k != "transformer.wte.weight"]  # tied to lm_head.weight, loaded
    if missing or unexpected:
        raise UsageError(f"the quantized file does not fit the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; quantize again")
    return model.eval()
