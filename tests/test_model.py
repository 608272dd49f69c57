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


def test_greedy_generation_is_deterministic_and_crops_context():
    model = tiny_model(block_size=8).eval()
    idx = torch.randint(0, 65, (1, 5))
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert a.shape == (1, 25) and torch.equal(a, b)
    assert torch.equal(a[:, :5], idx)


def test_crop_block_size_keeps_the_first_positions():
    model = tiny_model()
    wpe = model.transformer.wpe.weight[:16].clone()
    model.crop_block_size(16)
    assert torch.equal(model.transformer.wpe.weight, wpe)
    logits, _ = model(torch.zeros(1, 16, dtype=torch.long))
    assert logits.shape == (1, 1, 65)


def test_top_k_one_is_greedy():
    model = tiny_model().eval()
    idx = torch.randint(0, 65, (2, 4))
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
    model = tiny_model(attention=attention).eval()
    idx = torch.randint(0, 65, (2, 6))
    cached = model.generate(idx, 26, temperature=0, kv_cache=True)  # 32 tokens: fits block_size
    uncached = model.generate(idx, 26, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached)
    from model import KVCache
    caches = [KVCache(32) for _ in range(2)]
    model(cached[:, :20], caches=caches, pos=torch.arange(20))
    step, _ = model(cached[:, 20:21], caches=caches, pos=torch.tensor([20]))
    full, _ = model(cached[:, :21])
    assert (step - full).abs().max().item() < 1e-5
    # the cache buffers have their full size from the first write: every step has the same shapes
    assert caches[0].k.shape == (2, 4, 32, 64 // 4)  # (B, nh, block_size, hs)


def test_decode_step_logits_equal_the_uncached_forward_at_every_position():
    from model import DecodeStep, KVCache
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


def test_kv_cache_past_block_size_reprefills_last_half_window():
    model = tiny_model(block_size=16).eval()
    idx = torch.randint(0, 65, (1, 4))
    out = model.generate(idx, 30, temperature=0, kv_cache=True)
    assert out.shape == (1, 34)
    # out[16] used the full 16-token cache; out[17] is made after re-running out[9:17] from position 0
    logits, _ = model(out[:, 0:16])
    assert out[0, 16].item() == logits[0, -1].argmax().item()
    logits, _ = model(out[:, 9:17])
    assert out[0, 17].item() == logits[0, -1].argmax().item()


def test_training_forward_and_decode_step_are_each_one_graph_for_torch_compile():
    """No graph breaks: torch.compile sees the whole training forward, and the whole decoding step."""
    import torch._dynamo
    from model import DecodeStep, KVCache
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
    from model import DecodeStep, KVCache
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
