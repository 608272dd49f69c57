"""machinery/timeline.py: the training timeline (snapshots of the weights, for the lens's replay) and
machinery/heads.py: what each head does (previous-token, induction, first-token scores, knock-out)."""

import json
import os
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY, run_script
from machinery import heads, timeline
from machinery.checkpoint import load_checkpoint
from machinery.cli import UsageError
from model import GPT, GPTConfig
import lens as lens_module

EXAMPLES = int(os.environ.get("GLASSGPT_PROPERTY_EXAMPLES", "30"))


# ---- the schedule ------------------------------------------------------------------------------

def test_the_schedule_doubles_and_adds_every_eval():
    due = lambda s: s % 20 == 0 or s == 50
    assert timeline.scheduled_steps(0, 50, due) == [0, 1, 2, 4, 8, 16, 20, 32, 40, 50]
    assert timeline.scheduled_steps(30, 50, due) == [32, 40, 50]  # a resumed run continues it
    assert not timeline.on_schedule(3) and timeline.on_schedule(1024)


def test_auto_keeps_snapshots_of_small_models_only_and_never_of_sharded_ones():
    assert timeline.wanted("auto", timeline.AUTO_LIMIT, fsdp=False)
    assert not timeline.wanted("auto", timeline.AUTO_LIMIT + 1, fsdp=False)
    assert not timeline.wanted("auto", 10, fsdp=True)
    assert timeline.wanted(True, 10**9, fsdp=False) and not timeline.wanted(False, 10, fsdp=False)


# ---- a real run's timeline -----------------------------------------------------------------------

def train(char_data, out, *extra):
    return run_script("train.py", f"--data_dir={char_data}", "--dataset=tiny", f"--out_dir={out}",
                      "--eval_interval=20", *TINY, *extra, check=True)


def index(out):
    with open(out / "timeline" / "timeline.json", encoding="utf-8") as f:
        return json.load(f)["snapshots"]


def weights(path):
    return load_checkpoint(str(path))[0]["model"]


def test_a_run_keeps_its_schedule_and_the_last_snapshot_is_the_final_model(char_data, tmp_path):
    out = tmp_path / "out"
    result = train(char_data, out, "--max_iters=50")
    entries = index(out)
    assert [e["step"] for e in entries] == [0, 1, 2, 4, 8, 16, 20, 32, 40, 50]
    assert sorted(os.listdir(out / "timeline")) == sorted([e["file"] for e in entries] + ["timeline.json"])
    assert all(e["bytes"] == os.path.getsize(out / "timeline" / e["file"]) for e in entries)
    assert entries[0]["loss"] > entries[-1]["loss"]  # it learned something
    final, last = weights(out / "ckpt.pt"), weights(out / "timeline" / entries[-1]["file"])
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert "snapshots: 10 of" in result.stdout  # the disk use, said before the run
    meta = load_checkpoint(str(out / "timeline" / entries[3]["file"]))[1]
    assert meta["snapshot"]["step"] == 4 and meta["iter_num"] == 4


def test_a_snapshot_is_a_checkpoint_generate_py_samples_from(char_data, tmp_path):
    out = tmp_path / "out"
    train(char_data, out, "--max_iters=8")
    result = run_script("generate.py", f"--ckpt={out / 'timeline' / 'step_0000004.pt'}", "--max_new_tokens=5",
                        "--device=cpu", check=True)
    assert result.stdout.strip()


def test_a_resumed_run_continues_the_timeline_and_drops_what_came_after_its_checkpoint(char_data, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(char_data, whole, "--max_iters=50")
    train(char_data, broken, "--max_iters=30")
    # as if the interrupted run had gone on past its checkpoint before it died
    entries = index(broken)
    extra = dict(entries[-1], step=33, file="step_0000033.pt")
    (broken / "timeline" / extra["file"]).write_bytes((broken / "timeline" / entries[-1]["file"]).read_bytes())
    (broken / "timeline" / "timeline.json").write_text(json.dumps({"format": 1, "snapshots": entries + [extra]}))
    train(char_data, broken, "--max_iters=50", "--init_from=resume")
    # the same schedule, with the interrupted run's own last eval (step 30) in it
    assert [e["step"] for e in index(broken)] == sorted([e["step"] for e in index(whole)] + [30])
    assert not (broken / "timeline" / "step_0000033.pt").exists()
    a, b = weights(whole / "timeline" / "step_0000040.pt"), weights(broken / "timeline" / "step_0000040.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume: the same model at the same step


def test_snapshots_off_writes_no_timeline_and_a_wrong_value_is_one_line(char_data, tmp_path):
    train(char_data, tmp_path / "off", "--max_iters=4", "--snapshots=False")
    assert not (tmp_path / "off" / "timeline").exists()
    result = run_script("train.py", f"--data_dir={char_data}", "--dataset=tiny", "--snapshots=sometimes", *TINY)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "snapshots must be True, False or 'auto'" in result.stderr


class FakeRun:
    """What Timeline reads of train.py's Checkpoints and Evaluations, for a run in out_dir."""

    def __init__(self, out_dir, model):
        env = types.SimpleNamespace(master=True, fsdp=False, autocast=torch.autocast("cpu", enabled=False))
        config = {"snapshots": True, "fsdp": False, "eval_only": False, "max_iters": 100, "init_from": "scratch",
                  "dataset": "tiny"}
        self.checkpoints = types.SimpleNamespace(out_dir=str(out_dir), model=model, env=env, config=config,
                                                 model_args={}, meta={"tokenizer": {"kind": "char"}})
        self.evals = types.SimpleNamespace(first_iter=0, best_val_loss=float("inf"), due=lambda s: s == 100)


def test_a_failed_write_leaves_the_previous_timeline_and_no_temporary_file(tmp_path, monkeypatch):
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    run = FakeRun(tmp_path, model)
    kept = timeline.Timeline(run.checkpoints, run.evals)
    X = torch.zeros(1, 8, dtype=torch.long)
    kept.keep(0, 1e-3, X, X)
    before = (tmp_path / "timeline" / "timeline.json").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(timeline.json, "dump", full_disk)
    with pytest.raises(UsageError, match="could not write .*timeline.json"):
        kept.keep(1, 1e-3, X, X)
    assert (tmp_path / "timeline" / "timeline.json").read_text() == before
    assert not [f for f in os.listdir(tmp_path / "timeline") if ".tmp" in f]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=12)
ENTRY = st.fixed_dictionaries({"step": JSON | st.integers(-3, 9), "lr": JSON | st.floats(), "loss": JSON | st.floats(),
                               "file": JSON | st.sampled_from(["step_0000001.pt", "../ckpt.pt", "/etc/x.pt", ""]),
                               "bytes": JSON | st.integers()})


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({"format": st.just(1), "snapshots": st.lists(ENTRY, max_size=3)})))
def test_a_hostile_timeline_is_read_as_a_checked_list_or_refused_in_one_line(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("timeline") / "timeline.json"
    path.write_text(json.dumps(document))
    try:
        entries = timeline.read_index(str(path))
    except UsageError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    for e in entries:  # what is accepted is safe to use: a file of the folder, numbers that are numbers
        assert os.path.basename(e["file"]) == e["file"] and e["file"].endswith(".pt") and e["step"] >= 0
        assert isinstance(e["loss"], (int, float)) and not isinstance(e["step"], bool)


# ---- what each head does -----------------------------------------------------------------------

def one_hot_patterns(T, half):
    """Attention weights (1, 3, T, T) set by hand: head 0 reads the previous token, head 1 the first token, head 2
    the token after the first occurrence of its own (an induction head on a repeated sequence)."""
    w = torch.zeros(1, 3, T, T)
    for t in range(T):
        w[0, 0, t, max(t - 1, 0)] = 1
        w[0, 1, t, 0] = 1
        w[0, 2, t, t - half + 1 if t >= half else t] = 1
    return w


def test_each_score_is_one_for_its_own_pattern_and_low_for_the_others():
    w = one_hot_patterns(16, 8)
    prev, first, induction = heads.previous_token_scores(w), heads.first_token_scores(w), heads.induction_scores(w, 8)
    assert prev[0] == 1 and first[1] == 1 and induction[2] == 1
    assert induction[0] == 0 and induction[1] == 0 and prev[2] < 0.2


def induction_model(vocab=32, T=16, s=12.0):
    """A two-layer attention-only GPT whose weights are set by hand to do induction. The stream has three
    groups of dimensions: the token (vocab), the position (T) and the previous token (vocab). Layer 0's head
    attends from each position to the one before it and copies that token into the previous-token group;
    layer 1's head attends from each position to the positions whose previous token is its own token: the
    token after its earlier occurrence."""
    C = 2 * vocab + T
    tok, pos, prev = slice(0, vocab), slice(vocab, vocab + T), slice(vocab + T, C)
    model = GPT(GPTConfig(block_size=T, vocab_size=vocab, n_layer=2, n_head=1, n_embd=C, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1)
        model.transformer.wte.weight[:, tok] = torch.eye(vocab)  # (the head is tied: unused here)
        model.transformer.wpe.weight[:, pos] = torch.eye(T)
        a0, a1 = model.transformer.h[0].attn, model.transformer.h[1].attn
        q0, k0, v0 = a0.c_attn.weight.split(C)  # each (C, C): rows = outputs
        q0[pos, pos] = s * torch.eye(T)  # query of position p: e_p
        k0[pos, pos] = s * torch.eye(T).roll(1, dims=0)  # key of position j: e_{j+1}
        k0[vocab, vocab + T - 1] = 0  # (the roll's wrap-around: the last position is no key for the first)
        v0[prev, tok] = torch.eye(vocab)  # its value: its token, into the previous-token group
        a0.c_proj.weight[:] = torch.eye(C)
        q1, k1, _ = a1.c_attn.weight.split(C)
        q1[prev, tok] = s * torch.eye(vocab)  # query: my token ...
        k1[prev, prev] = s * torch.eye(vocab)  # ... matches a key whose previous token it is
    return model.eval()


def test_a_head_built_to_do_induction_scores_high_and_the_previous_token_head_low():
    model = induction_model()
    half = 8
    repeated = heads.repeated_random_tokens(8, half, model.config.vocab_size)
    with torch.no_grad():
        table = lens_module.head_scores(model, None, repeated, half)["heads"]
    previous_head, induction_head = table[0][0], table[1][0]
    assert induction_head["induction"] > 0.8 and previous_head["induction"] < 0.2
    assert previous_head["previous"] > 0.8 and induction_head["previous"] < 0.3


def test_a_knockout_is_the_loss_with_that_heads_output_zeroed_minus_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    X, Y = torch.randint(0, 20, (3, 12)), torch.randint(0, 20, (3, 12))
    base, effects = heads.knockout_effects(model, X, Y)
    attn = model.transformer.h[1].attn
    head_size = 8
    direct = attn.c_proj.weight.clone()
    with torch.no_grad():
        attn.c_proj.weight[:, head_size:] = 0  # head 1 of layer 1 contributes nothing to the projection
        without = model(X, Y)[1].item()
        attn.c_proj.weight[:] = direct
    assert abs(effects[1][1] - (without - base)) < 1e-5
    assert base == pytest.approx(model(X, Y)[1].item())  # and the model is left as it was


# ---- the lens's side: reading a run's timeline -----------------------------------------------------

def test_the_lens_reads_the_runs_curves_and_snapshots(trained_run):
    from generate import load_model
    out = trained_run[0]
    path = str(out / "best_model.pt")
    lens = lens_module.Lens(*load_model(path, "cpu"), path, "cpu")
    training = lens.training()
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    assert training["train"] == [[e["iter"], e["loss"]] for e in entries if e["type"] == "train"]
    assert [e[0] for e in training["eval"]] == [e["iter"] for e in entries if e["type"] == "eval"]
    assert [s["step"] for s in training["snapshots"]] == [e["step"] for e in index(out)]
    with pytest.raises(UsageError, match="no snapshot at step 3; its snapshots are at steps 0, 1, 2, 4"):
        lens.analyse({"prompt": "ROMEO:", "step": 3})


def test_a_broken_timeline_is_one_line_when_the_lens_opens_the_run(trained_run, tmp_path):
    import shutil
    from generate import load_model
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "timeline" / "timeline.json").write_text('{"format": 1, "snapshots": [{"step": 1}]}')
    path = str(run / "best_model.pt")
    with pytest.raises(UsageError, match="timeline.json has a snapshot entry without step, lr, loss"):
        lens_module.Lens(*load_model(path, "cpu"), path, "cpu")


def test_the_lens_draws_the_band_its_run_was_compared_with(trained_run, tmp_path):
    import shutil
    from generate import load_model
    from machinery.bands import band_for_run
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # as train.py records a recipe's band
        f.write(json.dumps({"type": "band", "iter": 5, "band": "config/shakespeare_char_cpu.band.json"}) + "\n")
    path = str(run / "best_model.pt")
    band = lens_module.Lens(*load_model(path, "cpu"), path, "cpu").training()["band"]
    assert band == band_for_run(str(run)) and band["train"]["steps"][0] == 10
    assert len(band["train"]["lo"]) == len(band["train"]["steps"]) and band["train"]["lo"][0] < band["train"]["hi"][0]


def test_a_snapshot_write_cut_short_by_kill_9_is_removed_when_the_run_resumes(char_data, tmp_path):
    out = tmp_path / "out"
    train(char_data, out, "--max_iters=8")
    leftover = out / "timeline" / "step_0000016.pt.tmp999999999"  # a writer that is gone (no such process)
    leftover.write_bytes(b"half a snapshot")
    result = train(char_data, out, "--max_iters=16", "--init_from=resume")
    assert not leftover.exists() and "removed 1 half-written file(s) of a killed run" in result.stdout
    assert [e["step"] for e in index(out)][-1] == 16
