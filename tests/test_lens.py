"""lens.py: the model's trace, the lens's numbers, and the page in a real headless browser."""

import pytest
import torch

from model import GPT, GPTConfig, sample_next, sampling_probs


def tiny_model(attention="sdpa"):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, attention=attention)).eval()


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_trace_leaves_the_logits_unchanged_and_holds_every_layer(attention):
    model = tiny_model(attention)
    idx = torch.randint(0, 40, (1, 12))
    plain, _ = model(idx)
    trace = {}
    traced, _ = model(idx, trace=trace)
    assert (plain - traced).abs().max().item() < 1e-6
    assert len(trace["residual"]) == 3 and trace["residual"][0].shape == (1, 12, 32)
    assert len(trace["attention"]) == 2 and trace["attention"][0].shape == (1, 2, 12, 12)


def test_traced_attention_rows_sum_to_one_and_never_look_ahead():
    trace = {}
    tiny_model()(torch.randint(0, 40, (1, 12)), trace=trace)
    for att in trace["attention"]:
        assert torch.allclose(att.sum(-1), torch.ones(1, 2, 12), atol=1e-6)
        assert torch.equal(att.triu(1), torch.zeros_like(att))


def test_the_last_residual_through_the_head_is_the_models_prediction():
    model = tiny_model()
    trace = {}
    logits, _ = model(torch.randint(0, 40, (1, 12)), trace=trace)
    lens = model.lm_head(model.transformer.ln_f(trace["residual"][-1]))  # (1, T, V)
    assert (lens[:, -1:] - logits).abs().max().item() < 1e-6  # the same maths on T rows instead of one


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.5, top_k=3),
                                      dict(temperature=1.2, top_p=0.6), dict(temperature=0)])
def test_sample_next_draws_from_sampling_probs(settings):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = sampling_probs(logits, **settings)
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([sample_next(logits, generator=generator, **settings) for _ in range(2000)])
    counts = torch.bincount(drawn.view(-1), minlength=5) / 2000
    assert torch.equal(counts > 0, probs[0] > 0)  # never a token the distribution cuts, always the kept ones
    assert (counts - probs[0]).abs().max().item() < 0.05
