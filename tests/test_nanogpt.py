"""Coming from nanoGPT (machinery/nanogpt.py): its ckpt.pt and meta.pkl read by generate.py, lens.py and
export.py, proven on nanoGPT-format files built here (the same keys, shapes, `_orig_mod.` prefixes and
0-d best_val_loss that nanoGPT's train.py saves; no nanoGPT code is needed), against a reference forward
of nanoGPT's maths written below from the state dict."""

import os
import pickle
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2LMHeadModel

import export
import lens
from conftest import CORPUS, ROOT, run_script
from generate import load_model, model_from_checkpoint
from machinery import nanogpt
from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.cli import UsageError

CHARS = sorted(set(CORPUS))


def nanogpt_state(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=len(CHARS), bias=True, seed=0):
    """A state dict with nanoGPT's names and shapes (its GPT: wte tied to lm_head, Linear weights (out, in),
    LayerNorm bias only with bias=True), random values large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd
    r = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale
    wte = r(vocab_size, C)
    state = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(block_size, C)}
    shapes = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C,),
              "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    for i in range(n_layer):
        for name, shape in shapes.items():
            state[f"transformer.h.{i}.{name}.weight"] = 1 + r(*shape) if name.startswith("ln") else r(*shape)
            if bias:
                state[f"transformer.h.{i}.{name}.bias"] = r(shape[0])
    state["transformer.ln_f.weight"] = 1 + r(C)
    if bias:
        state["transformer.ln_f.bias"] = r(C)
    state["lm_head.weight"] = wte  # tied, as nanoGPT's state_dict() holds it twice
    return state


def save_nanogpt_checkpoint(path, compiled=False, bias=True, vocab_size=len(CHARS), **sizes):
    """A ckpt.pt as nanoGPT's train.py writes it: torch.save of a plain dict."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=vocab_size, dropout=0.0)
    args.update(sizes)
    state = nanogpt_state(**{k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")})
    model = {("_orig_mod." if compiled else "") + k: v for k, v in state.items()}
    optimizer = {"state": {0: {"step": torch.tensor(20.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "params": [0]}]}
    config = {"out_dir": "out-shakespeare-char", "dataset": "shakespeare_char", "batch_size": 12, "compile": compiled,
              "learning_rate": 1e-3, "max_iters": 20, "device": "cpu", "dtype": "float16"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model, "optimizer": optimizer, "model_args": args, "iter_num": 20,
                "best_val_loss": torch.tensor(2.5), "config": config}, path)
    return state, args


def write_meta_pkl(path, chars=CHARS):
    """nanoGPT's data/shakespeare_char/prepare.py's meta.pkl (pickle.dump of a dict; written, never loaded)."""
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {ch: i for i, ch in enumerate(chars)}}, f)


def reference_logits(state, args, idx, gelu="none"):
    """nanoGPT's GPT.forward (all positions), from its state dict: exact GELU unless gelu='tanh'."""
    C, nh, T = args["n_embd"], args["n_head"], idx.size(1)
    ln = lambda x, n: F.layer_norm(x, (C,), state[n + ".weight"], state.get(n + ".bias"), 1e-5)
    lin = lambda x, n: x @ state[n + ".weight"].T + (state[n + ".bias"] if n + ".bias" in state else 0)
    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        q, k, v = lin(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(idx.size(0), T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (C // nh) ** 0.5
        y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(idx.size(0), T, C), h + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, h + "ln_2"), h + "mlp.c_fc"), approximate=gelu), h + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ state["lm_head.weight"].T


@pytest.fixture
def nano(tmp_path):
    """A nanoGPT folder: out-shakespeare-char/ckpt.pt (compiled: `_orig_mod.` keys) and data/.../meta.pkl."""
    ckpt = tmp_path / "out-shakespeare-char" / "ckpt.pt"
    state, args = save_nanogpt_checkpoint(str(ckpt), compiled=True, bias=False)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    write_meta_pkl(tmp_path / "data" / "shakespeare_char" / "meta.pkl")
    return ckpt, state, args


@pytest.mark.parametrize("compiled, bias", [(False, True), (True, False)])
def test_a_converted_model_computes_nanogpts_maths_with_the_tanh_gelu(tmp_path, capsys, compiled, bias):
    state, args = save_nanogpt_checkpoint(str(tmp_path / "ckpt.pt"), compiled=compiled, bias=bias)
    write_meta_pkl(tmp_path / "meta.pkl")
    model, tokenizer, meta = model_from_checkpoint(str(tmp_path / "ckpt.pt"))
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "nanoGPT checkpoint (iteration 20" in said and "tanh GELU" in said
    assert tokenizer.chars == CHARS and meta["best_val_loss"] == 2.5 and meta["iter_num"] == 20
    assert meta["model_args"]["attention"] == "sdpa" and meta["model_args"]["bias"] is bias
    idx = torch.randint(0, len(CHARS), (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model.eval()(idx, idx)
        exact, tanh = reference_logits(state, args, idx), reference_logits(state, args, idx, "tanh")
    assert (ours - tanh).abs().max().item() <= 1e-5  # the same model, but for the GELU form
    gap = (ours - exact).abs().max().item()
    assert 0 < gap <= 1e-3 * exact.abs().max().item()
    # the figure said is measured this way: a sequence of min(block_size, 64) tokens from seed 0
    stated = float(re.search(r"at most ([0-9.e+-]+)", said).group(1))
    test_ids = torch.randint(0, len(CHARS), (1, 16), generator=torch.Generator().manual_seed(0))
    measured = (reference_logits(state, args, test_ids) - reference_logits(state, args, test_ids, "tanh")).abs().max()
    assert f"{measured.item():.1e}" == f"{stated:.1e}"


def test_generate_samples_a_nanogpt_run_folder_as_it_samples_the_same_weights_in_our_format(nano, tmp_path):
    ckpt, state, args = nano
    ours = tmp_path / "ours.pt"
    save_checkpoint(str(ours), {"model": state}, {"model_args": dict(args, attention="sdpa"),
                                                  "tokenizer": {"kind": "char", "chars": CHARS}})
    flags = ["--device", "cpu", "--max_new_tokens", "12", "--start", "ROMEO:", "--seed", "7"]
    theirs = run_script("generate.py", "--ckpt", ckpt.parent, *flags, cwd=tmp_path)  # the folder: its ckpt.pt
    assert theirs.returncode == 0, theirs.stderr
    assert "no best_model.pt" in theirs.stderr and "read without unpickling" in theirs.stderr
    assert theirs.stdout == run_script("generate.py", "--ckpt", ours, *flags, check=True).stdout
    assert theirs.stdout.startswith("ROMEO:") and len(theirs.stdout) > len("ROMEO:") + 12


def test_the_lens_opens_a_nanogpt_checkpoint(nano):
    ckpt, _, args = nano
    model, tokenizer = load_model(str(ckpt), "cpu")
    seen = lens.Lens(model, tokenizer, str(ckpt), "cpu")
    described = seen.describe()
    assert (described["tokenizer"], described["n_layer"], described["vocab_size"]) == ("char", 2, len(CHARS))
    answer = seen.analyse({"prompt": "ROMEO:"})
    assert [t["text"] for t in answer["tokens"]] == list("ROMEO:") and len(answer["stack"]) == args["n_layer"] + 1


@pytest.mark.parametrize("bias", [True, False])
def test_export_writes_a_nanogpt_checkpoint_with_our_logits(tmp_path, bias):
    state, args = save_nanogpt_checkpoint(str(tmp_path / "ckpt.pt"), compiled=True, bias=bias)
    write_meta_pkl(tmp_path / "meta.pkl")
    export.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, len(CHARS), (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(idx).logits - reference_logits(state, args, idx, "tanh")).abs().max().item() <= 1e-5


def test_a_gpt2_sized_vocabulary_without_meta_pkl_means_gpt2s_tokenizer(tmp_path):
    save_nanogpt_checkpoint(str(tmp_path / "ckpt.pt"), vocab_size=50304, n_embd=16)
    model, tokenizer, meta = model_from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert meta["tokenizer"] == {"kind": "gpt2"} and model.config.vocab_size == 50304
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"


def test_a_char_vocabulary_without_meta_pkl_is_one_line_saying_where_to_put_it(tmp_path):
    save_nanogpt_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    result = run_script("generate.py", "--ckpt", tmp_path / "out" / "ckpt.pt", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no meta.pkl was found" in result.stderr and "copy its dataset's meta.pkl beside the checkpoint" in result.stderr


def test_meta_pkl_is_read_without_unpickling_and_a_pickle_that_calls_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this creates the file

    save_nanogpt_checkpoint(str(tmp_path / "ckpt.pt"))
    for protocol in (0, pickle.DEFAULT_PROTOCOL):  # GLOBAL + REDUCE; STACK_GLOBAL + REDUCE
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: Evil()}}, protocol))
        result = run_script("generate.py", "--ckpt", tmp_path / "ckpt.pt", "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert re.search(r"opcode (STACK_)?GLOBAL at byte", result.stderr) and "never unpickled" in result.stderr
        assert not marker.exists()
    pickle.loads((tmp_path / "meta.pkl").read_bytes())  # the payload is real: unpickled, it makes the file
    assert marker.exists()


@pytest.mark.parametrize("payload, words", [
    ({"stoi": {"a": 0}}, "holds no char tokenizer"),
    ({"itos": {0: "a", 2: "b"}}, "holds no char tokenizer"),  # ids not 0..n-1
    ({"itos": {0: "ab"}}, "holds no char tokenizer"),  # not one character
    ({"itos": {0: "a", 1: "a"}}, "holds no char tokenizer"),
    ({"vocab_size": 3, "itos": {0: "a", 1: "b"}}, "holds no char tokenizer"),
    ([1, 2], "pickle opcode"),  # a list is not among the plain values read
])
def test_a_meta_pkl_that_is_not_nanogpts_char_tokenizer_is_refused(tmp_path, payload, words):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(UsageError, match=words):
        nanogpt.read_meta_pkl(str(tmp_path / "meta.pkl"))
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}})[:-3])  # truncated
    with pytest.raises(UsageError, match="not a (readable meta.pkl|complete pickle)"):
        nanogpt.read_meta_pkl(str(tmp_path / "meta.pkl"))


def test_the_meta_pkl_nanogpt_writes_gives_its_characters_in_order(tmp_path):
    write_meta_pkl(tmp_path / "meta.pkl")
    assert nanogpt.read_meta_pkl(str(tmp_path / "meta.pkl")) == CHARS


def test_a_fork_with_other_model_args_or_missing_fields_is_one_line(tmp_path):
    save_nanogpt_checkpoint(str(tmp_path / "ckpt.pt"))
    write_meta_pkl(tmp_path / "meta.pkl")
    payload = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    payload["model_args"]["n_kv_head"] = 1
    torch.save(payload, tmp_path / "fork.pt")
    with pytest.raises(UsageError, match="model_args has n_kv_head"):
        load_checkpoint(str(tmp_path / "fork.pt"))
    del payload["model_args"]["n_kv_head"], payload["model_args"]["n_head"]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(UsageError, match="'n_head' is None"):
        load_checkpoint(str(tmp_path / "broken.pt"))


def test_sample_py_flags_and_nanogpt_names_point_to_ours():
    result = run_script("generate.py", "--out_dir=out-shakespeare-char", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--ckpt <out_dir>" in result.stderr
    assert "is a switch" in run_script("generate.py", "--compile=False").stderr
    assert nanogpt.instead("config/train_shakespeare_char.py").endswith("here it is config/shakespeare_char.py")
    assert nanogpt.instead("../nanoGPT/sample.py") and not nanogpt.instead("config/shakespeare_char.py")
    for theirs, ours in nanogpt.NAMES.items():  # every name we point to exists
        target = ours.split()[1] if ours.startswith("python ") else ours
        assert os.path.isfile(os.path.join(ROOT, target)), ours


def test_the_readme_section_shows_every_name_the_errors_map():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Coming from nanoGPT", 1)[1].split("\n## ", 1)[0]
    for theirs, ours in nanogpt.NAMES.items():
        assert theirs in section and ours.replace(" <out_dir>", "") in section, theirs
    assert all(flag.removeprefix("--") in section for flag in nanogpt.SAMPLE_FLAGS)


@pytest.mark.parametrize("optimizer, taken", [("adamw", "its AdamW state is taken over"),
                                              ("muon", "does not fit this optimizer, which starts fresh")])
def test_train_resumes_a_nanogpt_run_from_its_folder_with_its_adamw_state(char_data, tmp_path, optimizer, taken):
    """nanoGPT's ckpt.pt holds one AdamW over two groups (weight decay on the matrices) in the order of
    named_parameters, as ours: its state is taken over, and the run goes on from iteration 20 in our format."""
    from model import GPT, GPTConfig
    run = tmp_path / "out-nano"
    state, args = save_nanogpt_checkpoint(str(run / "ckpt.pt"))
    model = GPT(GPTConfig(**args))
    model.load_state_dict(state)
    params = [p for p in model.parameters()]
    adamw = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    adamw.step()  # a real state: step, exp_avg, exp_avg_sq for every parameter
    payload = torch.load(run / "ckpt.pt", weights_only=True)
    payload["optimizer"] = adamw.state_dict()
    payload["config"].update(dataset="tiny", batch_size=4)
    torch.save(payload, run / "ckpt.pt")
    write_meta_pkl(run / "meta.pkl")
    result = run_script("train.py", "--init_from=resume", f"--out_dir={run}", f"--data_dir={char_data}",
                        "--max_iters=24", "--eval_interval=4", "--eval_iters=2", "--log_interval=1",
                        f"--optimizer={optimizer}", "--compile=False")
    assert result.returncode == 0, result.stderr
    assert taken in result.stdout and "iter 21: loss" in result.stdout and "eval 24:" in result.stdout
    tensors, meta = load_checkpoint(str(run / "ckpt.pt"))
    assert meta["iter_num"] == 24 and "optimizers" in tensors  # our format from here on
