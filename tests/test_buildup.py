"""docs/buildup.py, chapter 10's stages from a bigram to the GPT: each stage's model has exactly the pieces
of the stages up to it, the last pieces give back model.py's GPT, and the script trains and reports."""

import math
import re

import pytest
import torch

from conftest import CORPUS, run_script
from model import GPT, GPTConfig
from test_docs_figures import load_script, train_and_record

buildup = load_script("buildup")
SHAPE = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)


def build(stage, **overrides):
    torch.manual_seed(0)
    return buildup.ablations.ablated_gpt(buildup.stage_switch(stage))(GPTConfig(**dict(SHAPE, **overrides))).eval()


def test_each_stage_holds_the_pieces_of_the_stages_up_to_it():
    order = list(buildup.STAGES)
    assert order[0] == "bigram" and order[-2:] == ["position", "dropout"]
    for i, stage in enumerate(order):
        assert [buildup.has(stage, piece) for piece in order] == [j <= i for j in range(len(order))]
    assert buildup.stage_flags("bigram") == ["--optimizer=adamw"]
    assert buildup.stage_flags("mean_of_past") == ["--n_layer=1", "--n_head=1"]
    assert buildup.stage_flags("heads") == ["--n_layer=1"]
    assert buildup.stage_flags("position") == []
    assert buildup.stage_flags("dropout") == [f"--dropout={buildup.DROPOUT}"]


def test_the_mean_of_the_past_weighs_every_earlier_position_equally():
    model = build("mean_of_past", n_layer=1)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, SHAPE["n_embd"])
    v = attn.c_attn(x)  # (2, 5, C): the values
    means = torch.stack([v[:, :t + 1].mean(dim=1) for t in range(5)], dim=1)
    torch.testing.assert_close(attn(x), attn.c_proj(means))
    assert attn.c_attn.weight.shape == (SHAPE["n_embd"], SHAPE["n_embd"])  # no queries, no keys


def test_the_mean_of_the_past_decodes_with_the_cache_as_without():
    model = build("mean_of_past", n_layer=1)
    idx = torch.randint(65, (1, 3))
    with_cache = model.generate(idx, 8, temperature=0.0)
    assert torch.equal(with_cache, model.generate(idx, 8, temperature=0.0, kv_cache=False))


def test_stages_before_residuals_replace_the_stream_and_later_ones_add_to_it():
    idx = torch.randint(65, (1, 8))
    mlp = build("mlp")
    block = mlp.transformer.h[0]
    x = mlp.transformer.wte(idx)
    torch.testing.assert_close(block(x), block.mlp(block.attn(x)))  # no LayerNorm yet: the identity
    assert not hasattr(block, "ln_2") or isinstance(block.ln_2, torch.nn.Identity)
    residual = build("residual")
    block = residual.transformer.h[0]
    a = x + block.attn(x)
    torch.testing.assert_close(block(x), a + block.mlp(a))
    assert not residual.transformer.wpe.weight.requires_grad  # positions come two stages later


def test_the_position_stage_is_model_pys_gpt():
    idx = torch.randint(65, (2, 8))
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE)).eval()
    staged = build("position")
    assert staged.num_params() == plain.num_params()
    torch.testing.assert_close(staged(idx, idx)[0], plain(idx, idx)[0])


@pytest.mark.slow
def test_two_stages_train_score_and_report(tmp_path):
    runs = [out for out, _ in train_and_record("buildup.py", "stage", ("bigram", "one_head"), tmp_path)]
    chart = tmp_path / "chart.png"
    result = run_script("docs/buildup.py", "--report", *reversed(runs), f"--out={chart}", cwd=tmp_path, check=True)
    rows = re.findall(r"^\| `(\w+)` \|.*\| \d\.\d{3} \| *(?:[+-]\d\.\d{3})? *\|$", result.stdout, re.M)
    assert chart.is_file() and rows == ["bigram", "one_head"]
    line = CORPUS.splitlines()[1][:20]
    result = run_script("docs/buildup.py", "--head", runs[1], f"--line={line}", "--query=5", cwd=tmp_path, check=True)
    weights = [float(w) for w in re.findall(r"weight ([\d.]+)$", result.stdout, re.M)]
    assert f"query at 5 {line[5]!r}" in result.stdout and len(weights) == 5 and weights == sorted(weights, reverse=True)


def test_the_unigram_loss_is_the_cross_entropy_of_the_train_frequencies():
    assert buildup.unigram_loss("aaabaaab", train_fraction=0.5) == pytest.approx(-math.log(0.75) * 3 / 4 - math.log(0.25) / 4)


def test_an_unknown_stage_is_one_line_naming_the_choices(tmp_path):
    result = run_script("docs/buildup.py", "residuals", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'residual'" in result.stderr and "Traceback" not in result.stderr
