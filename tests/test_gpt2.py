"""GPT-2 compatibility, proven offline: Hugging Face GPT-2 weights come in (GPT.from_pretrained,
train.py --init_from=<dir>) and go out (export.py) with the same logits. No real GPT-2 weights are
needed: small random GPT2LMHeadModels are saved with save_pretrained into tmp_path."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import export
from machinery.checkpoint import load_checkpoint, save_checkpoint
from conftest import CORPUS, ROOT, run_script
from machinery.cli import UsageError
from machinery.configurator import load_config, train_defaults
from data import GPT2Tokenizer, prepare
from generate import load_model
from machinery.hf import hf_to_ours, ours_to_hf
from model import GPT, GPTConfig


def perturbed(model, scale=0.1):
    """Add noise to every parameter, so that zero biases and unit LayerNorm gains cannot hide a
    weight that was copied to the wrong place (or not at all)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def tiny_hf_model(vocab_size=1000, n_positions=32):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=2,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    return perturbed(GPT2LMHeadModel(config)).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 (2 layers, 2 heads, 64 wide, vocab 1000, 32 positions) saved like the hub's."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf = tiny_hf_model()
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_imported_gpt2_gives_hf_logits(hf_dir, attention):
    folder, hf = hf_dir
    ours = GPT.from_pretrained(str(folder), {"attention": attention}).eval()
    idx = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits  # (3, 32, 1000)
        mine, _ = ours(idx, idx)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() <= 1e-5


def test_imported_gpt2_generates_hf_greedy_tokens(hf_dir):
    folder, hf = hf_dir
    ours = GPT.from_pretrained(str(folder)).eval()
    prompt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(1))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         pad_token_id=0)
    mine = ours.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(mine, theirs)
    assert len(set(mine[0, 5:].tolist())) > 1  # a real sequence, not one token repeated


def test_import_reads_sizes_from_hf_config_and_applies_overrides(hf_dir):
    folder, _ = hf_dir
    ours = GPT.from_pretrained(str(folder), {"dropout": 0.25})
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size, c.bias) == (2, 2, 64, 1000, 32, True)
    dropouts = [m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 + 2 * 3 and set(dropouts) == {0.25}  # embeddings + 3 per block
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_state_dict_round_trip_ours_hf_ours_is_exact():
    torch.manual_seed(0)
    ours = perturbed(GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=32)))
    hf = GPT2LMHeadModel(export.hf_config(
        dict(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=32), {"kind": "char"}))
    hf.load_state_dict(ours_to_hf(ours.state_dict()))
    back = hf_to_ours(hf.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_missing_hub_name_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached copy can answer instead
    (tmp_path / "tiny.txt").write_text(CORPUS, encoding="utf-8")
    prepare(str(tmp_path / "tiny.txt"), str(tmp_path / "data" / "tiny"), "gpt2")
    result = run_script("train.py", "--init_from=gpt2", f"--data_dir={tmp_path / 'data'}", "--dataset=tiny",
                        f"--out_dir={tmp_path / 'out'}", "--block_size=32", "--device=cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "could not load 'gpt2'" in lines[0] and "unreachable" in lines[0]
    assert "local directory" in lines[0]


def test_finetune_config_is_the_nanogpt_recipe_on_gpt2():
    config = load_config(train_defaults(), [os.path.join(ROOT, "config", "finetune_shakespeare.py")])
    expected = dict(init_from="gpt2", dataset="shakespeare", learning_rate=3e-5, decay_lr=False,
                    batch_size=1, gradient_accumulation_steps=32, block_size=1024, always_save_checkpoint=False)
    assert {k: config[k] for k in expected} == expected
    assert config["max_iters"] <= 100


# ---- fine-tune from a local GPT-2 directory, sample, export -------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The shipped fine-tune recipe run for 4 iterations from a tiny random GPT-2 (BPE vocabulary,
    64 positions, cropped to block_size 32) on a BPE dataset made in tmp."""
    root = tmp_path_factory.mktemp("finetune")
    hf = tiny_hf_model(vocab_size=50257, n_positions=64)
    hf.save_pretrained(root / "gpt2-tiny")
    (root / "tiny.txt").write_text(CORPUS, encoding="utf-8")
    prepare(str(root / "tiny.txt"), str(root / "data" / "tiny"), "gpt2")
    out = root / "out"
    result = run_script("train.py", "config/finetune_shakespeare.py", f"--init_from={root / 'gpt2-tiny'}",
                        f"--data_dir={root / 'data'}", "--dataset=tiny", f"--out_dir={out}", "--block_size=32",
                        "--batch_size=2", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=2",
                        "--eval_iters=2", "--log_interval=1", "--device=cpu", "--dtype=float32", check=True)
    return root, out, hf, result


@pytest.mark.slow
def test_train_from_local_hf_dir_then_generate(finetuned):
    root, out, hf, result = finetuned
    tensors, meta = load_checkpoint(str(out / "ckpt.pt"))
    args = meta["model_args"]
    # the sizes come from the Hugging Face model, not from train.py's 12 x 12 x 768 defaults
    assert (args["n_layer"], args["n_head"], args["n_embd"], args["block_size"]) == (2, 2, 64, 32)
    assert meta["iter_num"] == 4 and meta["tokenizer"] == {"kind": "gpt2"}
    start = hf_to_ours(hf.state_dict())["transformer.h.0.attn.c_attn.weight"]
    assert not torch.equal(tensors["model"]["transformer.h.0.attn.c_attn.weight"], start)  # it trained
    sample = run_script("generate.py", "--ckpt", out / "ckpt.pt", "--start", "ROMEO:", "--max_new_tokens", "12",
                        "--device", "cpu", check=True).stdout.split("\n---------------\n")[0]
    assert sample.startswith("ROMEO:") and len(sample) > len("ROMEO:")


@pytest.mark.slow
def test_block_size_longer_than_the_pretrained_positions_is_one_line(finetuned):
    root, _, _, _ = finetuned
    result = run_script("train.py", "config/finetune_shakespeare.py", f"--init_from={root / 'gpt2-tiny'}",
                        f"--data_dir={root / 'data'}", "--dataset=tiny", f"--out_dir={root / 'long'}",
                        "--block_size=100", "--device=cpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "64 positions, fewer than block_size=100; use --block_size=64 or less" in result.stderr


@pytest.mark.slow
def test_exported_bpe_model_loads_in_transformers_with_our_logits(finetuned):
    root, out, _, _ = finetuned
    result = run_script("export.py", "--ckpt", out / "ckpt.pt", "--out", f"{root / 'hf_model'}/", check=True)
    assert "logits match" in result.stdout
    hf = GPT2LMHeadModel.from_pretrained(root / "hf_model").eval()
    ours, _ = load_model(str(out / "ckpt.pt"), "cpu")
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, _ = ours(idx, idx)
        assert (hf(idx).logits - mine).abs().max().item() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(root / "hf_model")
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tokenizer(text).input_ids == GPT2Tokenizer().encode(text)
    assert hf.config.eos_token_id == 50256 and hf.config.n_positions == 32
    # and back: ours -> HF -> ours gives the checkpoint's tensors bit for bit
    again = GPT.from_pretrained(str(root / "hf_model")).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


# ---- export: char models and refusals ----------------------------------------------------------

CHARS = sorted(set(CORPUS))


def save_tiny_checkpoint(path, bias=True):
    """A char-level checkpoint as train.py writes it (model tensors + JSON meta)."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=len(CHARS), dropout=0.0,
                attention="sdpa")
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**args)))
    save_checkpoint(str(path), {"model": model.state_dict()},
                    {"model_args": args, "tokenizer": {"kind": "char", "chars": CHARS}, "iter_num": 1,
                     "best_val_loss": 1.0})
    return model.eval()


def test_exported_char_model_has_our_logits_and_its_tokenizer_beside_it(tmp_path):
    from transformers import AutoTokenizer
    ours = save_tiny_checkpoint(tmp_path / "char.pt")
    export.export(str(tmp_path / "char.pt"), str(tmp_path / "hf_char"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_char").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf_char")
    assert tokenizer.get_vocab() == {ch: i for i, ch in enumerate(CHARS)}
    ids = tokenizer("ROMEO:\nBut, soft!"[:16], return_tensors="pt").input_ids  # (1, 16)
    with torch.no_grad():
        mine, _ = ours(ids, ids)
        assert (hf(ids).logits - mine).abs().max().item() <= 1e-5
    assert hf.config.vocab_size == len(CHARS) and hf.config.eos_token_id is None


@pytest.mark.parametrize("case", ["out not empty", "out is a file", "not a checkpoint", "no tokenizer"])
def test_export_refuses_bad_input_and_writes_nothing(tmp_path, case):
    ckpt, out = tmp_path / "model.pt", tmp_path / "hf_model"
    save_tiny_checkpoint(ckpt)
    if case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "not a checkpoint":
        ckpt.write_text("hello")
    elif case == "no tokenizer":
        tensors, meta = load_checkpoint(str(ckpt))
        del meta["tokenizer"]
        save_checkpoint(str(ckpt), {"model": tensors["model"]}, meta)
    before = sorted(os.listdir(tmp_path))
    expected = {"out not empty": "exists and is not empty; choose a new directory or add --force",
                "out is a file": "is a file; give a directory path",
                "not a checkpoint": "is not a readable GlassGPT checkpoint",
                "no tokenizer": "names no known tokenizer"}[case]
    with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
        export.main(["--ckpt", str(ckpt), "--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == before
    if case == "out not empty":
        assert os.listdir(out) == ["keep.txt"]


def test_export_cli_error_is_one_line_with_exit_2(tmp_path):
    save_tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "hf_model").write_text("mine")
    result = run_script("export.py", "--ckpt", tmp_path / "model.pt", "--out", tmp_path / "hf_model")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert (tmp_path / "hf_model").read_text() == "mine"


def test_a_bias_false_model_exports_with_zero_biases_and_the_same_logits(tmp_path):
    ours = save_tiny_checkpoint(tmp_path / "model.pt", bias=False)
    export.export(str(tmp_path / "model.pt"), str(tmp_path / "hf_model"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_model").eval()
    biases = {k: v for k, v in hf.state_dict().items() if k.endswith(".bias") and v.dim() == 1}
    assert len(biases) == 2 * 6 + 1 and all(not v.any() for v in biases.values())  # 6 a block, and ln_f's
    ids = torch.randint(0, len(CHARS), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, _ = ours(ids, ids)
        assert (hf(ids).logits - mine).abs().max().item() <= 1e-5


def test_export_force_replaces_an_earlier_export_and_nothing_else(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "hf_model").mkdir()
    (tmp_path / "hf_model" / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="no earlier export"):  # a folder of other files is never replaced
        export.main(["--ckpt", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf_model"), "--force"])
    assert os.listdir(tmp_path / "hf_model") == ["stale.txt"]
    (tmp_path / "hf_model" / "config.json").write_text("{}")  # an earlier export's
    export.main(["--ckpt", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf_model"), "--force"])
    assert "its 2 entries (config.json, stale.txt) are deleted" in capsys.readouterr().out  # said first
    files = set(os.listdir(tmp_path / "hf_model"))
    assert "stale.txt" not in files and {"config.json", "tokenizer.json"} <= files
    assert sorted(os.listdir(tmp_path)) == ["hf_model", "model.pt"]  # no temporary folders left behind


@pytest.mark.parametrize("where", ["the run folder", "a parent of it", "the current folder"])
def test_export_never_replaces_a_folder_that_holds_its_checkpoint_or_the_current_folder(tmp_path, where,
                                                                                       monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    save_tiny_checkpoint(run / "best_model.pt")
    (run / "config.json").write_text("{}")  # even one that looks like an export
    monkeypatch.chdir(run if where == "the current folder" else tmp_path)
    out = {"the run folder": run, "a parent of it": tmp_path, "the current folder": "."}[where]
    before = sorted(os.listdir(run))
    with pytest.raises(UsageError, match="holds the (checkpoint being exported|current folder)"):
        export.main(["--ckpt", str(run), "--out", str(out), "--force"])
    assert sorted(os.listdir(run)) == before


def test_an_export_removes_the_temp_folder_a_killed_export_left_and_keeps_an_old_copy(tmp_path):
    save_tiny_checkpoint(tmp_path / "model.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process id that has exited: the writer of the leftovers below
    for name in (f".hf_model.tmp{pid}", f".hf_model.tmp{pid}.old", f".other.tmp{pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    export.main(["--ckpt", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf_model")])
    # only the killed export's half-written folder goes: an .old copy may hold the only earlier export
    assert sorted(os.listdir(tmp_path)) == sorted([f".hf_model.tmp{pid}.old", f".other.tmp{pid}", "hf_model",
                                                   "model.pt"])


# ---- exports in Hugging Face's own tools: AutoTokenizer, pipeline, the README's snippets (issue 20) -------


def our_greedy_text(model, tokenizer, prompt, new_tokens):
    ids = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode(model.generate(ids, new_tokens, temperature=0.0)[0].tolist())


def test_a_char_export_encodes_decodes_and_generates_in_transformers_as_ours(tmp_path):
    from transformers import pipeline
    from data import CharTokenizer
    ours = save_tiny_checkpoint(tmp_path / "char.pt")
    export.export(str(tmp_path / "char.pt"), str(tmp_path / "hf_char"))
    theirs, mine = AutoTokenizer.from_pretrained(tmp_path / "hf_char"), CharTokenizer(CHARS)
    rng = torch.Generator().manual_seed(0)
    texts = ["ROMEO:\nBut, soft!", "  two  spaces\n\n", " ", "\n"] + [
        "".join(CHARS[i] for i in torch.randint(len(CHARS), (int(n),), generator=rng))
        for n in torch.randint(1, 40, (50,), generator=rng)]
    for text in texts:  # any text of the vocabulary: the same ids, and back to the same text
        assert theirs(text).input_ids == mine.encode(text), text
        assert theirs.decode(mine.encode(text)) == text
    generator = pipeline("text-generation", model=str(tmp_path / "hf_char"))
    text = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == our_greedy_text(ours, mine, "ROMEO:", 8)


@pytest.mark.slow
def test_a_bpe_export_generates_through_pipeline_as_ours(finetuned):
    from transformers import pipeline
    root, out, _, _ = finetuned
    run_script("export.py", "--ckpt", out, "--out", root / "hf_pipeline", check=True)  # a run folder
    generator = pipeline("text-generation", model=str(root / "hf_pipeline"))
    text = generator("ROMEO:", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ours, tokenizer = load_model(str(out / "best_model.pt"), "cpu")
    assert text == our_greedy_text(ours, tokenizer, "ROMEO:", 6)


def test_the_readme_export_command_and_snippet_run_as_printed_on_the_quick_start_model(tmp_path):
    import re
    import shlex
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    command = next(line for line in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
                   if line.startswith("python export.py")).strip()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                   if 'pipeline("text-generation"' in block)
    run = tmp_path / "out-shakespeare-char-cpu"  # the quick start's run folder: a char model of 64 positions
    run.mkdir()
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=64, bias=True, vocab_size=len(CHARS), dropout=0.0,
                attention="sdpa")
    save_checkpoint(str(run / "best_model.pt"), {"model": GPT(GPTConfig(**args)).state_dict()},
                    {"model_args": args, "tokenizer": {"kind": "char", "chars": CHARS}, "iter_num": 1,
                     "best_val_loss": 1.0})
    exported = run_script(*shlex.split(command, comments=True)[1:], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(snippet, {})  # prints a sample; a prompt too long for the positions would raise here
    finally:
        os.chdir(cwd)
