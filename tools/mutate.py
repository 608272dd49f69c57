"""Mutation check: does the test suite notice the bugs a change to the code is likely to make?

Each mutation below is one realistic one-line bug. For each, the committed tree (HEAD) is copied to a
scratch folder, the bug is applied there, and the suite runs
until its first failure, the mutation's own likely test files first. A mutation the suite passes is
MISSED. The suite must pass on an unmutated copy first, or no score means anything.
The docs test that matches quoted code text is left out: a bug must be caught by a behaviour, not by a
changed quote.

    python tools/mutate.py             # every mutation against the whole suite
    python tools/mutate.py --fast      # against the not-slow suite (the edit-test loop)
    python tools/mutate.py --only 3,7  # some of them; --list prints them all
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUOTE_TEST = "tests/test_docs.py::test_code_excerpts_still_appear_in_the_code"

# (file, the exact text to change, what it becomes, the bug in words, test files to run first)
MUTATIONS = [
    # the loop and its step (train.py) and the NaN guard (health.py)
    ("machinery/health.py", "bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))",
     "bad = ~torch.isfinite(loss.detach())", "the NaN guard checks only the loss", ["test_step"]),
    ("machinery/health.py", "        return not bool(bad)", "        return True",
     "the NaN guard disabled (every step taken)", ["test_step"]),
    ("machinery/health.py", "opt.found_inf = bad.float()", "opt.found_inf = torch.zeros_like(bad).float()",
     "the on-device guard never tells fused AdamW to skip", ["test_step"]),
    ("machinery/health.py", "self.bad_run = (self.bad_run + 1) * bad", "self.bad_run = self.bad_run + bad",
     "the guard counts bad steps in all, not in a row", ["test_step"]),
    ("machinery/checkpoint.py", '    if improved:\n        save_checkpoint(os.path.join(out_dir, "best_model.pt")',
     '    if True:\n        save_checkpoint(os.path.join(out_dir, "best_model.pt")',
     "best_model.pt written at every evaluation", ["test_step"]),
    ("train.py", "loss = loss / env.accum_steps", "loss = loss",
     "gradient accumulation does not divide the loss", ["test_step"]),
    ("train.py", "grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)",
     "grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])",
     "clipping only measures the norm", ["test_step"]),
    ("machinery/checkpoint.py", "**rng_state(self.batches.state, self.env)",
     "**rng_state(self.batches.rng.get_state(), self.env)",
     "resume restores the batch RNG from the wrong state", ["test_step"]),
    ("train.py", "opt.zero_grad(set_to_none=True)", "pass",
     "gradients are never zeroed between steps", ["test_step"]),
    ("data.py", "first = (self.rank * self.accum_steps + micro_step) * self.batch_size",
     "first = self.rank * self.accum_steps * self.batch_size", "every micro-batch takes the same rows",
     ["test_step"]),
    ("train.py", "return learning_rate * (it + 1) / (warmup_iters + 1)", "return learning_rate * it / warmup_iters",
     "warmup starts at a learning rate of 0", ["test_correctness"]),
    ("train.py", "return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)",
     "return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * learning_rate",
     "the cosine decays from learning_rate + min_lr", ["test_correctness"]),
    ("machinery/metrics.py", 'elif entry is not None and entry["iter"] <= upto:', 'elif entry is not None and entry["iter"] < upto:',
     "resume drops the checkpoint's own metrics line", ["test_step", "test_training_safety"]),
    ("machinery/checkpoint.py", "for old in periodic[:-keep]:", "for old in periodic[:keep]:",
     "keep_last_n deletes the newest periodic checkpoints", ["test_training_safety"]),
    ("machinery/evaluation.py", "mine = torch.arange(rank, n_windows, world_size) * block_size",
     "mine = torch.arange(rank, n_windows, world_size)", "the whole-split loss scores overlapping windows",
     ["test_bench"]),
    ("machinery/optimizers.py", 'buf.lerp_(grad, 1 - group["momentum"] if keep is None', 'buf.lerp_(grad, group["momentum"] if keep is None',
     "Muon's momentum weights the new gradient as the old", ["test_correctness"]),
    ("machinery/configurator.py", "        if c[key] < 1:", "        if c[key] < 0:", "a size of 0 is accepted",
     ["test_bad_input"]),
    # the model (model.py)
    ("model.py", 'nn.GELU(approximate="tanh")', "nn.GELU()", "the MLP's GELU exact instead of tanh", ["test_model"]),
    ("model.py", "x = x + self.mlp(self.ln_2(x))", "x = x + self.mlp(x)", "the block skips ln_2", ["test_model"]),
    ("model.py", "x = x + self.attn(self.ln_1(x), cache, pos)", "x = self.attn(self.ln_1(x), cache, pos)",
     "attention without its residual connection", ["test_model"]),
    ("model.py", "att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))", "att = q @ k.transpose(-2, -1)",
     "explicit attention without 1/sqrt(hs)", ["test_model"]),
    ("model.py", "return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)",
     "return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)", "fused attention sees the future",
     ["test_model"]),
    ("model.py", "x = self.transformer.drop(tok_emb + pos_emb)", "x = self.transformer.drop(tok_emb)",
     "position embeddings left out", ["test_model"]),
    ("model.py", "logits = self.lm_head(x[:, -1:, :])", "logits = self.lm_head(x[:, :1, :])",
     "inference scores the first position, not the last", ["test_model"]),
    ("model.py", 'no_decay = [p for n, p in params.items() if p.dim() < 2]',
     'no_decay = [p for n, p in params.items() if p.dim() < 1]', "biases and gains lose their AdamW group",
     ["test_correctness"]),
    ("model.py", "nn.init.normal_(module.weight, mean=0.0, std=0.02)\n            if module.bias",
     "nn.init.normal_(module.weight, mean=0.0, std=0.2)\n            if module.bias", "Linear weights drawn 10x too wide",
     ["test_model"]),
    # train/eval mode and no_grad: what every recipe with dropout 0 hides
    ("model.py", "dropout_p = self.dropout if self.training else 0.0", "dropout_p = self.dropout",
     "attention dropout left on in evaluation and generation on the fused path", ["test_model"]),
    ("machinery/evaluation.py", "        self.model.eval()\n", "\n",
     "the loss is estimated in training mode (dropout on)", ["test_training_safety"]),
    ("machinery/evaluation.py", "        self.model.train()\n", "\n",
     "training goes on in eval mode after the first evaluation (dropout off)", ["test_training_safety"]),
    ("generate.py", "return model.eval().to(device=device, dtype=dtype), tokenizer",
     "return model.to(device=device, dtype=dtype), tokenizer", "sampling in training mode (dropout on)",
     ["test_model"]),
    ("model.py", "    @torch.no_grad()\n    def generate_stream(", "    def generate_stream(",
     "generation records autograd history for every token", ["test_model"]),
    # sampling, the KV cache and fast decoding
    ("model.py", "logits = logits.float() / temperature", "logits = logits.float() * temperature",
     "temperature multiplies the logits", ["test_model"]),
    ("model.py", "kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]",
     "kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [0]]", "top-k keeps only the top token",
     ["test_model"]),
    ("model.py", "sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)",
     "sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)", "top-p keeps one token too many at the edge",
     ["test_model"]),
    ("model.py", "logits = step(idx[:, -1:], pos)", "logits = step(idx[:, -1:], pos + 1)",
     "the KV cache position advanced one step early", ["test_model"]),
    ("model.py", "logits, _ = self(idx[:, -block_size:])", "logits, _ = self(idx[:, :block_size])",
     "the uncached path crops to the first block_size tokens", ["test_model"]),
    ("model.py", "if caches is None else block_size // 2", "if caches is None else block_size // 4",
     "the cache's re-prefill keeps a quarter window", ["test_model"]),
    ("model.py", "self.v.index_copy_(2, pos, v)", "self.v.index_copy_(2, pos, k)",
     "the cache stores keys as values", ["test_model"]),
    ("machinery/decoding.py", "self.pos.fill_(pos)", "self.pos.fill_(pos - 1)", "the decoding step runs one position early",
     ["test_model"]),
    # data, checkpoints, scripts, Hugging Face
    ("data.py", "return rows[:, :-1], rows[:, 1:].contiguous()", "return rows[:, :-1], rows[:, :-1].contiguous()",
     "targets are the inputs, not the next tokens", ["test_data", "test_step"]),
    ("machinery/preparation.py", "TRAIN_FRACTION = 0.9", "TRAIN_FRACTION = 0.5", "half the text goes to validation",
     ["test_data", "test_pipeline"]),
    ("data.py", "self.stoi = {ch: i for i, ch in enumerate(self.chars)}",
     "self.stoi = {ch: i + 1 for i, ch in enumerate(self.chars)}", "char ids off by one",
     ["test_data"]),
    ("machinery/corpus.py", 'split = "val" if document % VAL_EVERY == VAL_EVERY - 1 else "train"',
     'split = "val" if document % VAL_EVERY == 0 else "train"', "a corpus's first document goes to val",
     ["test_corpus"]),
    ("machinery/checkpoint.py", "newest = max(found, key=os.path.getmtime)", "newest = min(found, key=os.path.getmtime)",
     "find_checkpoint picks the oldest checkpoint", ["test_pipeline"]),
    ("machinery/faults.py", "        os.replace(tmp, path)\n", "        pass\n",
     "an atomic write never renames its temp file into place", ["test_step"]),
    ("machinery/hf.py", "ours[key] = value.t() if key.endswith(HF_TRANSPOSED) else value", "ours[key] = value",
     "Hugging Face import forgets the Conv1D transposes", ["test_gpt2"]),
    ("machinery/hf.py", "return {key: (value.t() if key.endswith(HF_TRANSPOSED) else value).contiguous()",
     "return {key: value.contiguous()", "Hugging Face export forgets the Conv1D transposes", ["test_gpt2"]),
    # the training timeline and the heads' scores (issue 30)
    ("machinery/timeline.py", "return step == 0 or step & (step - 1) == 0", "return step == 0 or step % 2 == 0",
     "the snapshot schedule takes every even step instead of doubling", ["test_timeline"]),
    ("machinery/timeline.py", "kept = [e for e in entries if resumed and e[\"step\"] <= start]",
     "kept = [e for e in entries if resumed]", "a resumed run keeps the snapshots its interrupted run took after "
     "the checkpoint", ["test_timeline"]),
    ("machinery/heads.py", "return weights.diagonal(offset=-(half - 1), dim1=-2, dim2=-1)[:, :, 1:].mean(dim=(0, 2))",
     "return weights.diagonal(offset=-half, dim1=-2, dim2=-1).mean(dim=(0, 2))",
     "the induction score reads the earlier copy of the token itself, not the token after it", ["test_timeline"]),
    ("machinery/heads.py", "x[..., head * head_size:(head + 1) * head_size] = 0", "x[..., head:head + head_size] = 0",
     "the knock-out zeroes the wrong slice of the heads", ["test_timeline"]),
]


def snapshot(dest):
    """The committed tree (HEAD): every mutant starts from this one copy, so what is being edited in the
    working tree, or while the check runs, changes nothing in it."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)


def check_applies(folder, path, old):
    with open(os.path.join(folder, path), encoding="utf-8") as f:
        count = f.read().count(old)
    if count != 1:
        raise SystemExit(f"error: {path} holds {count} copies of {old!r}, not one; update tools/mutate.py")


def apply(folder, path, old, new):
    target = os.path.join(folder, path)
    with open(target, encoding="utf-8") as f:
        text = f.read()
    with open(target, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def run_suite(folder, focus, fast):
    """(caught, the first failing test and its first assertion line)."""
    tests = sorted(f[:-3] for f in os.listdir(os.path.join(folder, "tests")) if re.fullmatch(r"test_\w+\.py", f))
    order = [t for t in focus if t in tests] + [t for t in tests if t not in focus]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--deselect", QUOTE_TEST,
               *(["-m", "not slow"] if fast else []), *[f"tests/{t}.py" for t in order]]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    reason = re.search(r"^E +(.+)$", result.stdout, re.M)
    if result.returncode == 0:
        return False, ""
    return True, (failed.group(1) if failed else f"pytest exit {result.returncode}") + (
        f"  [{reason.group(1)[:90]}]" if reason else "")


def parse_numbers(text):
    """'3,7,10-12' -> [3, 7, 10, 11, 12]"""
    numbers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        numbers += range(int(first), int(last or first) + 1)
    return numbers


def main():
    p = argparse.ArgumentParser(description="Apply one-line bugs to scratch copies and run the suite on each.")
    p.add_argument("--fast", action="store_true", help="run the not-slow suite only")
    p.add_argument("--only", default=None, help="mutation numbers from --list, e.g. 3,7,10-12")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    args = p.parse_args()
    chosen = parse_numbers(args.only) if args.only else list(range(1, len(MUTATIONS) + 1))
    if args.list:
        for n, (path, _, _, what, _) in enumerate(MUTATIONS, start=1):
            print(f"{n:3d}  {path:<24} {what}")
        return
    start, missed = time.perf_counter(), []
    base = tempfile.TemporaryDirectory(prefix="unmutated-")
    snapshot(base.name)
    for n in chosen:  # every bug must still apply to the code, before anything runs
        check_applies(base.name, *MUTATIONS[n - 1][:2])
    failed, by = run_suite(base.name, [], args.fast)
    if failed:
        raise SystemExit(f"error: the suite fails without any mutation ({by}); make it pass first")
    print(f"unmutated copy: the suite passes ({time.perf_counter() - start:.0f} s)", flush=True)
    for n in chosen:
        path, old, new, what, focus = MUTATIONS[n - 1]
        with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
            shutil.copytree(base.name, folder, dirs_exist_ok=True)
            apply(folder, path, old, new)
            t0 = time.perf_counter()
            caught, by = run_suite(folder, focus, args.fast)
        print(f"{n:3d} {'caught' if caught else 'MISSED'} {time.perf_counter() - t0:5.0f} s  {what}"
              + (f"\n      by {by}" if caught else ""), flush=True)
        if not caught:
            missed.append(n)
    total = len(chosen)
    print(f"score: {total - len(missed)}/{total} caught ({'not-slow' if args.fast else 'whole'} suite, "
          f"{time.perf_counter() - start:.0f} s)" + (f"; missed: {', '.join(map(str, missed))}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
