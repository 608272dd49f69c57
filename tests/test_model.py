"""The model's maths: causality, initial loss, capacity, and the two attention paths."""

import math

import pytest
import torch

from model import GPT, GPTConfig, top_p_filter


def tiny_model(**overrides):
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    args.update(overrides)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_changing_a_token_never_changes_earlier_logits(attention):
    model = tiny_model(attention=attention).eval()
    idx = torch.randint(0, 65, (2, 32))
    t = 17
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 65
    logits_a, _ = model(idx, idx)
    logits_b, _ = model(changed, changed)
    assert torch.equal(logits_a[:, :t], logits_b[:, :t])
    assert not torch.allclose(logits_a[:, t:], logits_b[:, t:])


def test_initial_loss_is_close_to_uniform_guess():
    model = tiny_model()
    torch.manual_seed(1)
    x, y = torch.randint(0, 65, (16, 32)), torch.randint(0, 65, (16, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_one_batch_can_be_memorised():
    model = tiny_model()
    x = torch.randint(0, 65, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_sdpa_and_explicit_attention_agree():
    sdpa = tiny_model(attention="sdpa").eval()
    explicit = tiny_model(attention="explicit").eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 65, (3, 32))
    a, _ = sdpa(idx, idx)
    b, _ = explicit(idx, idx)
    assert (a - b).abs().max().item() < 1e-5


def test_inference_scores_only_the_last_position():
    model = tiny_model().eval()
    idx = torch.randint(0, 65, (2, 10))
    full, _ = model(idx, idx)
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, 65)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_use_scaled_init():
    model = tiny_model(n_layer=8, n_embd=128)
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_crop_block_size_keeps_the_first_positions():
    model = tiny_model()
    wpe = model.transformer.wpe.weight[:16].clone()
    model.crop_block_size(16)
    assert torch.equal(model.transformer.wpe.weight, wpe)
    logits, _ = model(torch.zeros(1, 16, dtype=torch.long))
    assert logits.shape == (1, 1, 65)


def test_top_k_one_is_greedy():
    model = expressive_model()
    idx = torch.randint(0, 23, (2, 4))
    sampled = model.generate(idx, 10, temperature=1.0, top_k=1)
    greedy = model.generate(idx, 10, temperature=0)
    assert torch.equal(sampled, greedy)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    kept = top_p_filter(probs, 0.7)  # 0.5 + 0.25 = 0.75 >= 0.7: two tokens
    assert torch.equal(kept > 0, torch.tensor([[False, True, False, True]]))
    assert torch.allclose(kept.sum(), torch.tensor(1.0))
    assert torch.equal(top_p_filter(probs, 0.5) > 0, torch.tensor([[False, True, False, False]]))
    assert torch.equal(top_p_filter(probs, 1.0) > 0, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_kv_cache_matches_full_forward(attention):
    model = expressive_model(block_size=32)
    for block in model.transformer.h:
        block.attn.attention = attention
    idx = torch.randint(0, 23, (2, 6))
    cached = model.generate(idx, 26, temperature=0, kv_cache=True)  # 32 tokens: fits block_size
    uncached = model.generate(idx, 26, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached) and len(set(cached[0, 6:].tolist())) >= 5
    from model import KVCache
    caches = [KVCache(32) for _ in range(2)]
    model(cached[:, :20], caches=caches, pos=torch.arange(20))
    step, _ = model(cached[:, 20:21], caches=caches, pos=torch.tensor([20]))
    full, _ = model(cached[:, :21])
    assert (step - full).abs().max().item() < 1e-9
    # the cache buffers have their full size from the first write: every step has the same shapes
    assert caches[0].k.shape == (2, 2, 32, 16 // 2)  # (B, nh, block_size, hs)


def test_decode_step_logits_equal_the_uncached_forward_at_every_position():
    from machinery.decoding import DecodeStep
    from model import KVCache
    model = tiny_model().eval()
    tokens = torch.randint(0, 65, (3, 32))
    caches = [KVCache(32) for _ in range(2)]
    with torch.no_grad():
        model(tokens[:, :5], caches=caches, pos=torch.arange(5))
        step = DecodeStep(model, caches, batch_size=3)
        for p in range(5, 32):
            logits = step(tokens[:, p:p + 1], p)
            full, _ = model(tokens[:, :p + 1])
            assert (logits - full).abs().max().item() < 1e-5, p


def test_training_forward_and_decode_step_are_each_one_graph_for_torch_compile():
    """No graph breaks: torch.compile sees the whole training forward, and the whole decoding step."""
    import torch._dynamo
    from machinery.decoding import DecodeStep
    from model import KVCache
    model = tiny_model(dropout=0.1)
    x, y = torch.randint(0, 65, (2, 32)), torch.randint(0, 65, (2, 32))
    explained = torch._dynamo.explain(model)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.eval()
    caches = [KVCache(32) for _ in range(2)]
    with torch.no_grad():
        model(x[:, :5], caches=caches, pos=torch.arange(5))
        explained = torch._dynamo.explain(DecodeStep(model, caches, 2).forward)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_logits_on_cpu():
    """generate.py --compile: the one-token step through torch.compile computes what the eager step does."""
    from machinery.decoding import DecodeStep
    from model import KVCache
    model = tiny_model().eval()
    tokens = torch.randint(0, 65, (2, 12))
    logits = {}
    for compile in (False, True):
        caches = [KVCache(32) for _ in range(2)]
        with torch.no_grad():
            model(tokens[:, :8], caches=caches, pos=torch.arange(8))
            step = DecodeStep(model, caches, 2, compile=compile)
            logits[compile] = torch.cat([step(tokens[:, p:p + 1], p) for p in range(8, 12)], dim=1)
    assert (logits[True] - logits[False]).abs().max().item() < 1e-5


# -- against a reference, on a model whose every weight and position matters --------------------------------

def expressive_model(block_size=16, n_layer=2, n_head=2, n_embd=16, gains=0.0, seed=0):
    """A float64 model with weights large enough that every piece shows in the logits (GELU's tanh form,
    each LayerNorm, each position) and greedy decoding does not just repeat a token, as an untrained one
    does. gains: the spread of the LayerNorms' weights around 1 and biases around 0."""
    model = tiny_model(block_size=block_size, vocab_size=23, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd).double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = gains if ".ln_" in name else 2.0 if name.endswith("wpe.weight") else 1.0
            center = 1.0 if ".ln_" in name and name.endswith(".weight") else 0.0
            p.copy_(center + std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def reference_logits(model, idx):
    """GPT-2's forward written out from the weights alone, in plain tensor maths: idx (B, T) -> (B, T, V)."""
    w = {name: p.detach() for name, p in model.named_parameters()}
    cfg = model.config
    B, T = idx.shape
    hs = cfg.n_embd // cfg.n_head

    def norm(x, prefix):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        q, k, v = linear(norm(x, f"{h}.ln_1"), f"{h}.attn.c_attn").split(cfg.n_embd, dim=-1)
        q, k, v = (t.view(B, T, cfg.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + linear(y, f"{h}.attn.c_proj")
        u = linear(norm(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + linear(gelu, f"{h}.mlp.c_proj")
    return norm(x, "transformer.ln_f") @ w["transformer.wte.weight"].T  # the head is the embedding


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_forward_equals_gpt2_written_out_by_hand(attention):
    model = expressive_model(gains=0.2)
    model.transformer.h[0].attn.attention = model.transformer.h[1].attn.attention = attention
    idx = torch.randint(0, 23, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx, idx)
    expected = reference_logits(model, idx)
    assert expected.std() > 1  # large logits: a wrong piece moves them far beyond the tolerance
    assert (logits - expected).abs().max().item() < 1e-9


def greedy_reference(model, idx, steps, window):
    """Greedy tokens from full forwards only; window(n_context) -> how many of the last tokens to run."""
    idx, n = idx.clone(), min(idx.size(1), model.config.block_size)
    for _ in range(steps):
        logits = reference_logits(model, idx[:, -n:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        n = window(n + 1)
    return idx


def test_uncached_generation_runs_the_last_block_size_tokens():
    model = expressive_model(block_size=8)
    idx = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(idx, 30, temperature=0, kv_cache=False)
    expected = greedy_reference(model, idx, 30, lambda n: min(n, 8))
    assert torch.equal(out, expected)
    assert len(set(out[0, 5:].tolist())) >= 5  # the check has teeth: no run of one repeated token


def test_cached_generation_equals_full_forwards_and_reprefills_the_last_half_window():
    """Up to block_size the cache changes nothing; when it is full, the last block_size // 2 tokens are run
    again from position 0 and the window grows back to block_size."""
    model = expressive_model(block_size=8)
    idx = torch.randint(0, 23, (2, 3), generator=torch.Generator().manual_seed(3))
    out = model.generate(idx, 30, temperature=0, kv_cache=True)
    expected = greedy_reference(model, idx, 30, lambda n: n if n <= 8 else 4)
    assert torch.equal(out, expected)
    assert len(set(out[0, 3:].tolist())) >= 5
    uncached = model.generate(idx, 30, temperature=0, kv_cache=False)
    assert torch.equal(out[:, :9], uncached[:, :9]) and not torch.equal(out, uncached)  # they part after the window


def test_a_long_prompt_is_cut_to_its_last_block_size_tokens():
    model = expressive_model(block_size=8)
    idx = torch.randint(0, 23, (1, 20), generator=torch.Generator().manual_seed(5))
    for kv_cache in (True, False):
        out = model.generate(idx, 1, temperature=0, kv_cache=kv_cache)
        assert out[0, -1].item() == reference_logits(model, idx[:, -8:])[0, -1].argmax().item()
        assert out[0, -1].item() != reference_logits(model, idx[:, :8])[0, -1].argmax().item()


def sampled_frequencies(logits, n=20000, **settings):
    from model import sample_next
    generator = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(n, -1), generator=generator, **settings)[:, 0]
    return torch.bincount(ids, minlength=logits.size(-1)).double() / n


def entropy(p):
    p = p[p > 0]
    return -(p * p.log()).sum().item()


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_sampling_draws_from_the_softmax_of_logits_over_temperature():
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(LOGITS[0].double() / temperature, dim=-1)
        assert (sampled_frequencies(LOGITS, temperature=temperature) - expected).abs().max() < 0.012


def test_lower_temperature_lowers_the_entropy_and_zero_is_greedy():
    entropies = [entropy(sampled_frequencies(LOGITS, temperature=t)) for t in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert entropies == sorted(entropies) and entropies[-1] - entropies[0] > 1.0
    assert torch.equal(sampled_frequencies(LOGITS, temperature=0), torch.eye(6, dtype=torch.float64)[0])


def test_top_k_samples_only_the_k_most_likely_in_their_renormalised_proportions():
    frequencies = sampled_frequencies(LOGITS, temperature=1.0, top_k=3)
    expected = torch.softmax(LOGITS[0, :3].double(), dim=-1)
    assert torch.equal(frequencies[3:], torch.zeros(3, dtype=torch.float64))
    assert (frequencies[:3] - expected).abs().max() < 0.012


def test_top_p_samples_only_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS[0].double(), dim=-1)  # 0.56, 0.21, 0.13, ...: 0.56 + 0.21 >= 0.75
    frequencies = sampled_frequencies(LOGITS, temperature=1.0, top_p=0.75)
    assert torch.equal(frequencies[2:], torch.zeros(4, dtype=torch.float64))
    assert (frequencies[:2] - probs[:2] / probs[:2].sum()).abs().max() < 0.012


# ---- train and eval mode: what every recipe with dropout 0 hides ----------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_dropout_is_off_in_eval_mode_on_both_attention_paths(attention):
    dropped = tiny_model(attention=attention, dropout=0.5).eval()
    plain = tiny_model(attention=attention, dropout=0.0).eval()  # the same weights (same seed)
    idx = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        assert torch.equal(dropped(idx, idx)[0], plain(idx, idx)[0])
        cached = dropped.generate(idx[:, :8], 12, temperature=0)  # the fused cached path too
        assert torch.equal(cached, plain.generate(idx[:, :8], 12, temperature=0))
    dropped.train()
    assert not torch.equal(dropped(idx, idx)[0], plain(idx, idx)[0])  # and on in training: the test can fail


def test_generation_records_no_autograd_history():
    model = tiny_model().eval()
    grad_enabled = []
    model.register_forward_hook(lambda module, inputs, output: grad_enabled.append(torch.is_grad_enabled()))
    for _ in model.generate_stream(torch.zeros(1, 1, dtype=torch.long), 5):
        pass
    assert grad_enabled and not any(grad_enabled)


def test_a_checkpoint_loads_for_sampling_in_eval_mode(tmp_path):
    from generate import load_model
    from machinery.checkpoint import save_checkpoint
    model = tiny_model(dropout=0.5)
    args = dict(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.5, bias=True,
                attention="sdpa")
    chars = [chr(32 + i) for i in range(65)]
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict()},
                    {"model_args": args, "tokenizer": {"kind": "char", "chars": chars}})
    loaded, _ = load_model(str(tmp_path / "ckpt.pt"), "cpu")
    idx = torch.randint(0, 65, (1, 16))
    assert not loaded.training
    assert torch.equal(loaded(idx, idx)[0], loaded(idx, idx)[0])  # no dropout: the same logits each time
