"""The training maths, checked against independent calculations (accumulation as train.py's loop does
it is in test_step.py): the learning-rate schedule, weight tying and parameter counts, AdamW's groups, and autograd itself."""

import math
import os

import pytest
import torch

from conftest import ROOT
from machinery.configurator import load_config, train_defaults
from model import GPT, GPTConfig
from train import get_lr


def tiny_model(**overrides):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    args.update(overrides)
    return GPT(GPTConfig(**args))


# ---- learning-rate schedule --------------------------------------------------------------------

LR, MIN_LR, WARMUP, DECAY_END = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize("it, expected", [
    (0, LR * 1 / 11),  # warmup starts above zero: (it + 1) / (warmup_iters + 1)
    (9, LR * 10 / 11),  # the last warmup step
    (10, LR),  # end of warmup: the peak, where the cosine starts
    (60, MIN_LR + 0.5 * (LR - MIN_LR)),  # halfway through the decay: halfway between the two
    (110, MIN_LR),  # the end of the decay
    (5000, MIN_LR),  # and flat after it
])
def test_lr_schedule_values(it, expected):
    assert get_lr(it, LR, WARMUP, DECAY_END, MIN_LR) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_lr_schedule_shape_and_constant_mode():
    lrs = [get_lr(it, LR, WARMUP, DECAY_END, MIN_LR) for it in range(200)]
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP + 1]))  # rises through warmup
    assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))  # then never rises again
    assert get_lr(85, LR, WARMUP, DECAY_END, MIN_LR) == pytest.approx(
        MIN_LR + 0.5 * (1 + math.cos(math.pi * 0.75)) * (LR - MIN_LR))
    assert {get_lr(it, LR, WARMUP, DECAY_END, MIN_LR, decay_lr=False) for it in (0, 10, 60, 5000)} == {LR}


# ---- weight tying and parameter counts ----------------------------------------------------------


def test_head_and_token_embedding_are_one_tensor_through_training():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1  # listed (and decayed) once
    [opt] = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    x = torch.randint(0, 37, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight


def parameter_count(n_layer, n_embd, block_size, vocab_size, bias=True):
    """The closed formula: (total, without the position embeddings), lm_head tied to wte."""
    C = n_embd
    b = 1 if bias else 0
    block = (C + b * C  # ln_1: gain (+ bias)
             + C * 3 * C + b * 3 * C  # attn.c_attn: q, k, v
             + C * C + b * C  # attn.c_proj
             + C + b * C  # ln_2
             + C * 4 * C + b * 4 * C  # mlp.c_fc
             + 4 * C * C + b * C)  # mlp.c_proj
    assert block == 12 * C * C + (13 if bias else 2) * C
    non_embedding = vocab_size * C + n_layer * block + C + b * C  # wte (= lm_head), blocks, ln_f
    return non_embedding + block_size * C, non_embedding


def shipped(name, vocab_size):
    c = load_config(train_defaults(), [os.path.join(ROOT, "config", name)])
    return dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                vocab_size=vocab_size, bias=c["bias"])


# (total, num_params()) of the shipped recipes: the docs quote these
SHIPPED_COUNTS = [
    ("shakespeare_char.py", 65, 10_770_816, 10_672_512),  # 6 x 6 x 384, block 256
    ("shakespeare_char_cpu.py", 65, 809_856, 801_664),  # 4 x 4 x 128, block 64
    ("shakespeare.py", 50257, 30_044_544, 29_946_240),  # 6 x 6 x 384, block 256, GPT-2 BPE
]


@pytest.mark.parametrize("config_file, vocab_size, total, non_embedding", SHIPPED_COUNTS)
def test_shipped_recipes_have_the_quoted_parameter_counts(config_file, vocab_size, total, non_embedding):
    args = shipped(config_file, vocab_size)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        model = GPT(GPTConfig(**args))
    assert parameter_count(args["n_layer"], args["n_embd"], args["block_size"], vocab_size) == (total, non_embedding)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == non_embedding


@pytest.mark.parametrize("args", [
    dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=3),
    dict(n_layer=3, n_head=4, n_embd=48, block_size=20, vocab_size=101, bias=False),
    dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),  # GPT-2 small: 124M
])
def test_parameter_count_matches_the_closed_formula(args):
    with torch.device("meta"):
        model = GPT(GPTConfig(**args))
    total, non_embedding = parameter_count(args["n_layer"], args["n_embd"], args["block_size"],
                                           args["vocab_size"], args.get("bias", True))
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.num_params() == non_embedding
    if args["n_embd"] == 768:
        assert total == 124_439_808  # the published size of GPT-2 small


# ---- AdamW parameter groups -------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_adamw_decays_matrices_and_embeddings_but_not_biases_or_gains(bias):
    model = tiny_model(bias=bias)
    [opt] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    matrices = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    decayed = ["transformer.wpe.weight", "transformer.wte.weight"] + [
        f"transformer.h.{i}.{m}" for i in range(2) for m in matrices]
    kept = [f"transformer.h.{i}.{ln}.weight" for i in range(2) for ln in ("ln_1", "ln_2")] + ["transformer.ln_f.weight"]
    if bias:
        kept += [n for n in names.values() if n.endswith(".bias")]
    assert groups == {0.1: sorted(decayed), 0.0: sorted(kept)}
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # each parameter exactly once


# ---- Muon --------------------------------------------------------------------------------------


def muon_runs(make_optimizer, steps=4):
    """Three block-shaped matrices after `steps` updates from the same random gradients."""
    torch.manual_seed(0)
    weights = [torch.randn(96, 32, requires_grad=True), torch.randn(32, 128, requires_grad=True),
               torch.randn(32, 32, requires_grad=True)]
    opt = make_optimizer(weights)
    for _ in range(steps):
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
    return [w.detach() for w in weights]


def test_muon_in_bfloat16_is_torch_optim_muon_step_for_step():
    from machinery.optimizers import Muon
    ours = muon_runs(lambda ws: Muon(ws, lr=4e-3, weight_decay=0.1, ns_dtype=torch.bfloat16))
    torchs = muon_runs(lambda ws: torch.optim.Muon(ws, lr=4e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalise_brings_every_singular_value_near_one(dtype):
    from machinery.optimizers import orthogonalise
    torch.manual_seed(0)
    for shape in ((96, 32), (32, 128)):
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 0.1 to 10
        s = torch.linalg.svdvals(orthogonalise(g, dtype).float())
        assert orthogonalise(g, dtype).shape == shape and s.min() > 0.5 and s.max() < 1.3, s


def test_muon_group_holds_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    adamw, muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n)
    assert muon.ns_dtype == torch.float32
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert len(in_muon) + len(in_adamw) == len(names) and not set(in_muon) & set(in_adamw)


# ---- autograd against finite differences -------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_gradients_match_finite_differences_in_float64(attention):
    model = tiny_model(block_size=6, vocab_size=11, n_layer=1, n_head=2, n_embd=8, attention=attention).double()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial biases and gains, so their gradients are not special cases
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randint(0, 11, (2, 6), generator=generator)
    y = torch.randint(0, 11, (2, 6), generator=generator)
    _, loss = model(x, y)
    loss.backward()
    params = dict(model.named_parameters())
    checks = [("transformer.wte.weight", (3, 5)), ("transformer.wpe.weight", (2, 1)),
              ("transformer.h.0.ln_1.weight", (4,)), ("transformer.h.0.ln_1.bias", (0,)),
              ("transformer.h.0.attn.c_attn.weight", (9, 2)), ("transformer.h.0.attn.c_proj.bias", (7,)),
              ("transformer.h.0.mlp.c_fc.weight", (20, 3)), ("transformer.h.0.mlp.c_proj.weight", (6, 31)),
              ("transformer.ln_f.bias", (5,))]
    eps = 1e-6
    for name, index in checks:
        p = params[name]
        with torch.no_grad():
            saved = p[index].item()
            p[index] = saved + eps
            up = model(x, y)[1].item()
            p[index] = saved - eps
            down = model(x, y)[1].item()
            p[index] = saved
        numeric = (up - down) / (2 * eps)
        analytic = p.grad[index].item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)
        assert analytic != 0.0, name


def test_muon_skips_a_flagged_step_on_the_device_and_otherwise_steps_as_usual():
    """found_inf (a device tensor, as health.py's guard passes it) skips the step without a host read: weights
    and momentum stay bit for bit even with NaN gradients; unflagged, the step is the plain one."""
    from machinery.optimizers import Muon
    torch.manual_seed(0)
    weights = [torch.randn(8, 16), torch.randn(16, 8)]
    grads = [torch.randn(8, 16), torch.randn(16, 8)]
    runs = {}
    for flag in (None, 0.0, 1.0):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = Muon([{"params": params}], lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)
        for step in range(3):
            for p, g in zip(params, grads):
                p.grad = g * (step + 1) if flag != 1.0 or step == 0 else torch.full_like(g, float("nan"))
            if flag is not None and step > 0:
                opt.found_inf = torch.tensor(flag)
            opt.step()
        runs[flag] = params, [opt.state[p]["momentum_buffer"] for p in params]
    for (a, b) in zip(runs[None][0], runs[0.0][0]):
        assert torch.allclose(a, b, atol=1e-6)
    skipped_params, skipped_bufs = runs[1.0]
    once = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon([{"params": once}], lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)
    for p, g in zip(once, grads):
        p.grad = g
    opt.step()  # only the first, unflagged step
    assert all(torch.equal(a, b) for a, b in zip(skipped_params, once))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(skipped_bufs, once))
