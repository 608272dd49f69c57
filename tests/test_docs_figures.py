"""The scripts behind the docs: docs/figures.py draws the pictures of the ideas, docs/ablations.py trains
chapter 8's ablations. Their switches are checked on tiny models; both scripts run end to end on a tiny
corpus."""

import importlib.util
import json
import os
import re
import shlex

import pytest
import torch

from conftest import CORPUS, ROOT, run_script
from model import GPT, GPTConfig

FIGURES = ("block.png", "causal-mask.png", "attention-maps.png", "lr-schedules.png", "optimizer-step.png",
           "kv-cache.png")
SHAPE = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "docs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablations = load_script("ablations")
figures = load_script("figures")


def build(name, **overrides):
    torch.manual_seed(0)
    _, switch, _ = ablations.ABLATIONS[name]
    return ablations.ablated_gpt(switch)(GPTConfig(**dict(SHAPE, **overrides))).eval()


def logits(model, idx):
    return model(idx, idx)[0]


def test_every_picture_the_script_draws_is_shown_in_both_languages():
    for name in FIGURES:
        for lang in ("en", "zh"):
            shown = any(f"](../img/{name})" in open(os.path.join(ROOT, "docs", lang, chapter), encoding="utf-8").read()
                        for chapter in os.listdir(os.path.join(ROOT, "docs", lang)))
            assert shown, f"docs/{lang} does not show img/{name}"


def test_the_full_model_is_gpt_itself():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), build("none").state_dict().values()))


def test_no_pos_emb_freezes_the_position_table_at_zero():
    wpe = build("no_pos_emb").transformer.wpe.weight
    assert not wpe.requires_grad and not wpe.any()


def test_no_residual_blocks_pass_on_only_what_their_sublayers_make():
    block = build("no_residual").transformer.h[0]
    x = torch.randn(2, 8, 32)
    assert torch.allclose(block(x), block.mlp(block.ln_2(block.attn(block.ln_1(x)))))


def test_no_layernorm_and_no_mlp_leave_no_such_module():
    from model import MLP, LayerNorm
    assert not any(isinstance(m, LayerNorm) for m in build("no_layernorm").modules())
    no_mlp = build("no_mlp")
    assert not any(isinstance(m, MLP) for m in no_mlp.modules())
    assert all(not hasattr(block, "ln_2") for block in no_mlp.transformer.h)


def test_no_attention_scale_scores_with_the_plain_dot_product():
    attn = build("no_attention_scale").transformer.h[0].attn
    x = torch.randn(1, 8, 32)
    q, k, v = (t.view(1, 8, 2, 16).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
    # the hook scaled the queries by sqrt(16): undo it to get the layer's own q
    q = q / 4
    weights = torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~attn.causal_mask[:8, :8], float("-inf")), dim=-1)
    expected = attn.c_proj((weights @ v).transpose(1, 2).reshape(1, 8, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_no_weight_tying_gives_the_head_its_own_matrix():
    model = build("no_weight_tying")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.num_params() == GPT(GPTConfig(**SHAPE)).num_params() + 65 * 32


def test_no_scaled_init_draws_residual_projections_like_every_matrix():
    scaled, plain = build("none"), build("no_scaled_init")
    std = lambda m: torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("c_proj.weight")]).std()
    assert abs(std(plain) - 0.02) < 0.002 and abs(std(scaled) - 0.02 / 2) < 0.001  # 2 * n_layer = 4


def test_no_causal_mask_lets_a_position_see_the_future_and_the_mask_stops_it():
    idx = torch.randint(65, (1, 8))
    later = idx.clone()
    later[0, -1] = (idx[0, -1] + 1) % 65  # change the last token only
    cheat, honest = build("no_causal_mask", attention="explicit"), build("none", attention="explicit")
    assert not torch.allclose(logits(cheat, idx)[0, 0], logits(cheat, later)[0, 0])
    assert torch.allclose(logits(honest, idx)[0, 0], logits(honest, later)[0, 0])


def test_bigram_logits_depend_on_the_current_token_only():
    model = build("bigram")
    idx = torch.randint(65, (1, 8))
    other = torch.randint(65, (1, 8))
    other[0, 5] = idx[0, 5]
    assert torch.allclose(logits(model, idx)[0, 5], logits(model, other)[0, 5])
    assert not list(model.transformer.h)


def tiny_shakespeare_char(tmp_path):
    """A tiny corpus prepared as the known dataset `shakespeare_char`, so the CPU recipe runs on it."""
    from data import prepare
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text(CORPUS, encoding="utf-8")
    prepare(str(folder / "input.txt"), str(folder), "char", "input.txt")
    return tmp_path / "data"


def test_the_experiments_commands_draw_every_picture_of_chapter_4():
    with open(figures.EXPERIMENTS, encoding="utf-8") as f:
        text = f.read()
    shown = set(re.findall(r"\]\(\.\./img/([\w-]+\.png)\)", text))
    lines = [shlex.join(argv) for argv in figures.experiment_commands()]
    drawn = {m for line in lines for m in re.findall(r"--out=docs/img/([\w-]+\.png)", line)}
    assert shown and drawn == shown
    trainings = [line for line in lines if " train.py " in line]
    assert len(trainings) > 10 and all(line.startswith(("python ", "OMP_NUM_THREADS=1 python ")) for line in trainings)


def test_an_experiment_line_runs_with_its_variables_from_the_root(monkeypatch):
    calls = []
    monkeypatch.setattr(figures.subprocess, "run", lambda argv, **kw: calls.append((argv, kw)) or FakeResult(len(calls) - 1))
    figures.run_command(shlex.split('OMP_NUM_THREADS=1 python plot.py out-exp/base --title="a b"'))
    argv, kw = calls[0]
    assert argv == [figures.sys.executable, "plot.py", "out-exp/base", "--title=a b"]
    assert kw["cwd"] == ROOT and kw["env"]["OMP_NUM_THREADS"] == "1"
    with pytest.raises(figures.UsageError, match="failed .*: python train.py x"):
        figures.run_command(["python", "train.py", "x"])


class FakeResult:
    def __init__(self, returncode):
        self.returncode = returncode


def test_without_a_checkpoint_the_figures_train_the_whole_recipe_unless_told_fewer_steps(monkeypatch):
    commands = []
    monkeypatch.setattr(figures.subprocess, "run", lambda argv, **kw: commands.append(argv) or FakeResult(0))
    figures.train_recipe(None, "data", "out-figures")
    figures.train_recipe(5, "data", "out-figures")
    assert not any(a.startswith("--max_iters") for a in commands[0])
    assert {"--max_iters=5", "--lr_decay_iters=5", "--eval_interval=5"} <= set(commands[1])


@pytest.mark.slow
def test_figures_script_draws_every_picture_after_a_tiny_run(tmp_path):
    data_dir = tiny_shakespeare_char(tmp_path)
    img = tmp_path / "img"
    result = run_script("docs/figures.py", "--iters=2", f"--data_dir={data_dir}", f"--train_dir={tmp_path / 'run'}",
                        f"--out_dir={img}", cwd=tmp_path, check=True)
    assert sorted(os.listdir(img)) == sorted(FIGURES), result.stdout
    assert all(10_000 < (img / name).stat().st_size < 200_000 for name in FIGURES)


def train_and_record(script, kind, names, tmp_path):
    """Run docs/<script> NAME for each name on tiny Shakespeare for 3 steps; [(run folder, its <kind>.json)],
    each record checked against what the script printed (docs/buildup.py's tests use it too)."""
    data_dir = tiny_shakespeare_char(tmp_path)
    runs = []
    for name in names:
        out = tmp_path / name
        result = run_script(f"docs/{script}", name, "--max_iters=3", "--eval_iters=2", f"--data_dir={data_dir}",
                            f"--out_dir={out}", cwd=tmp_path, check=True)
        record = json.loads((out / f"{kind}.json").read_text(encoding="utf-8"))
        assert record[kind] == name and f"{name}: val loss {record['val_loss']:.4f}" in result.stdout
        runs.append((out, record))
    return runs


@pytest.mark.slow
def test_an_ablation_trains_scores_and_reports(tmp_path):
    (full, full_record), (no_mlp, no_mlp_record) = train_and_record("ablations.py", "ablation", ("none", "no_mlp"),
                                                                    tmp_path)
    assert no_mlp_record["params"] < full_record["params"]
    runs = [full, no_mlp]
    chart = tmp_path / "chart.png"
    result = run_script("docs/ablations.py", "--report", *runs, f"--out={chart}", cwd=tmp_path, check=True)
    assert chart.is_file() and re.search(r"^\| the MLP \| [\d,]+ \| \d\.\d{3} \| [+-]\d\.\d{3} \|$", result.stdout, re.M)


def test_an_unknown_ablation_is_one_line_naming_the_choices(tmp_path):
    result = run_script("docs/ablations.py", "no_mpl", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'no_mlp'" in result.stderr and "Traceback" not in result.stderr
