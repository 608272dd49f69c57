"""lens.py: the model's trace, the lens's numbers, its server, and the page in a real headless browser.

The browser tests drive Debian's chromium through Playwright. They run on the tiny checkpoint of
conftest.trained_run; with GLASSGPT_LENS_DOCS=<checkpoint or run folder> they run on that model instead
and write their screenshots to docs/img/lens-*.png (how the docs' pictures are made):

    GLASSGPT_LENS_DOCS=out-shakespeare-char-cpu python -m pytest -q tests/test_lens.py -k browser
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, run_script
from machinery.cli import UsageError
from data import GPT2Tokenizer
from generate import find_checkpoint, load_model
import lens as lens_module
from lens import Lens, make_server, sampling_settings
from model import GPT, GPTConfig, sample_next, sampling_probs

PROMPT = "ROMEO:\nBut, soft! what light"  # every character is in conftest's corpus and in Shakespeare


def tiny_model(attention="sdpa"):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, attention=attention)).eval()


# ---- the model's trace -------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_trace_leaves_the_logits_unchanged_and_holds_every_layer(attention):
    model = tiny_model(attention)
    idx = torch.randint(0, 40, (1, 12))
    plain, _ = model(idx)
    traced, trace = lens_module.trace(model, idx)
    assert (plain - traced).abs().max().item() < 1e-6
    assert [block.attn.attention for block in model.transformer.h] == [attention] * 2  # its path is restored
    assert not any(block._forward_hooks for block in model.transformer.h)  # and its hooks removed
    assert len(trace["residual"]) == 3 and trace["residual"][0].shape == (1, 12, 32)
    assert len(trace["attention"]) == 2 and trace["attention"][0].shape == (1, 2, 12, 12)


def test_traced_attention_rows_sum_to_one_and_never_look_ahead():
    _, trace = lens_module.trace(tiny_model(), torch.randint(0, 40, (1, 12)))
    for att in trace["attention"]:
        assert torch.allclose(att.sum(-1), torch.ones(1, 2, 12), atol=1e-6)
        assert torch.equal(att.triu(1), torch.zeros_like(att))


def test_the_last_residual_through_the_head_is_the_models_prediction():
    model = tiny_model()
    logits, trace = lens_module.trace(model, torch.randint(0, 40, (1, 12)))
    seen = model.lm_head(model.transformer.ln_f(trace["residual"][-1]))  # (1, T, V)
    assert (seen[:, -1:] - logits).abs().max().item() < 1e-6  # the same maths on T rows instead of one


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


# ---- the lens's answers, without a browser -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lens(trained_run):
    out, _ = trained_run
    path = str(out / "best_model.pt")
    model, tokenizer = load_model(path, "cpu")
    return Lens(model, tokenizer, path, "cpu")


def full_logits(lens, ids):
    """The model's logits (T, V) at every position of ids, from its ordinary forward."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        return lens.model(idx, targets=idx)[0][0].float()


def test_an_analysis_is_one_forward_of_the_model(tiny_lens):
    calls = []
    hook = tiny_lens.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        answer = tiny_lens.analyse({"prompt": PROMPT, "position": 3})
    finally:
        hook.remove()
    assert calls == [1]
    assert [t["id"] for t in answer["tokens"]] == tiny_lens.tokenizer.encode(PROMPT) and answer["position"] == 3
    assert len(answer["stack"]) == tiny_lens.model.config.n_layer + 1 and answer["note"] is None


def test_a_prompt_longer_than_the_block_is_cut_to_its_last_block_size_tokens_with_a_note(tiny_lens):
    block_size = tiny_lens.model.config.block_size
    prompt = (PROMPT * 3)[: block_size + 5]
    answer = tiny_lens.analyse({"prompt": prompt})
    assert [t["id"] for t in answer["tokens"]] == tiny_lens.tokenizer.encode(prompt)[-block_size:]
    assert answer["note"].startswith(f"the prompt is {block_size + 5} tokens long")
    assert answer["position"] == block_size - 1


def test_a_bpe_model_shows_its_word_pieces_and_names_its_padded_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).eval()
    lens = Lens(model, GPT2Tokenizer(), "bpe", "cpu")
    pieces = [t["text"] for t in lens.analyse({"prompt": "Unbelievably"})["tokens"]]
    assert "".join(pieces) == "Unbelievably" and len(pieces) > 1
    assert lens.token(50300) == {"id": 50300, "text": "<unused 50300>"}  # past GPT-2's 50257: never in any text


def test_settings_are_checked_by_generate_py_and_an_empty_filter_is_off():
    assert sampling_settings({}) == dict(temperature=0.8, top_k=200, top_p=None, seed=1337, max_new_tokens=500)
    chosen = sampling_settings({"top_k": "", "top_p": "0.9", "temperature": "0", "seed": "7"})
    assert (chosen["top_k"], chosen["top_p"], chosen["temperature"], chosen["seed"]) == (None, 0.9, 0.0, 7)
    # generate.py's parser names the flag and says the range (its words are its own)
    for fields, words in (({"top_k": "0"}, ["--top_k", "at least 1"]), ({"top_p": "2"}, ["--top_p", "1"]),
                          ({"temperature": "hot"}, ["--temperature", "'hot'"]), ({"seed": "-1"}, ["--seed", "-1"]),
                          ({"temperature": "nan"}, ["--temperature", "finite"]), ({"seed": str(2 ** 64)}, ["--seed"]),
                          # and the lens's own limits
                          ({"max_new_tokens": "10001"}, ["--max_new_tokens must be at most 10000"]),
                          ({"temperature": "1e-300"}, ["argument --temperature: must be 0 (greedy) or at least 1e-06"]),
                          ({"top_k": True}, ["the field 'top_k' must be a number"]),
                          ({"top_p": float("inf")}, ["the field 'top_p' must be a finite number"])):
        with pytest.raises(UsageError) as refused:
            sampling_settings(fields)
        assert all(word in str(refused.value) for word in words), str(refused.value)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on CUDA the decoding steps replay a graph


@pytest.mark.parametrize("device", DEVICES)
def test_generated_tokens_are_generate_streams_with_the_probability_each_had(trained_run, device, monkeypatch):
    import model as model_module
    path = str(trained_run[0] / "best_model.pt")
    lens = Lens(*load_model(path, device), path, device)
    drawn_from = []  # the logits of each step, as generate_stream hands them to sample_next

    def recording_sample_next(logits, *args, **kwargs):
        drawn_from.append(logits.float().clone())
        return sample_next(logits, *args, **kwargs)

    monkeypatch.setattr(model_module, "sample_next", recording_sample_next)
    # 40 tokens after 6 run past block_size 32: the cache's window restarts once on the way
    fields = {"prompt": "ROMEO:", "seed": "7", "max_new_tokens": "40", "temperature": "0.9", "top_k": "5"}
    tokens = list(lens.generate(fields))
    ids = lens.tokenizer.encode("ROMEO:")
    expected = lens.model.generate(torch.tensor([ids], device=device), 40, temperature=0.9, top_k=5,
                                   generator=torch.Generator(device=device).manual_seed(7))[0, len(ids):].tolist()
    assert [t["id"] for t in tokens] == expected and len(drawn_from) == 80  # the lens's run, then generate's
    for token, logits in zip(tokens, drawn_from):
        assert abs(token["p"] - sampling_probs(logits, 0.9, 5)[0, token["id"]].item()) < 1e-4
        assert abs(token["p_model"] - F.softmax(logits, dim=-1)[0, token["id"]].item()) < 1e-4


@pytest.fixture(scope="module")
def served(tiny_lens):
    """The lens server on a free port of 127.0.0.1, in a thread of this process."""
    server = make_server(tiny_lens, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def ask(url, body=None):
    """(status, JSON answer) of a GET, or of a POST when body (bytes) is given."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, words", [
    ({"prompt": "ROMEO: \u00e9"}, "characters outside this model's vocabulary: '\u00e9'"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "ROMEO:", "top_k": "-1"}, "--top_k"),
    ({"prompt": "ROMEO:", "position": "two"}, "the field 'position' must be a whole number, got 'two'"),
])
def test_bad_input_is_an_answer_naming_it_not_a_server_error(served, body, words):
    status, answer = ask(f"{served}/api/analyze", json.dumps(body).encode())
    assert status == 400 and words in answer["error"]


def test_a_request_that_is_not_json_is_refused_and_the_server_keeps_answering(served):
    status, answer = ask(f"{served}/api/analyze", b"{not json")
    assert status == 400 and answer["error"].startswith("the request is not JSON")
    assert ask(f"{served}/api/nothing")[0] == 404
    assert ask(f"{served}/api/model")[1]["block_size"] == 32


def test_a_missing_or_foreign_checkpoint_is_one_line(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for ckpt, words in ((tmp_path / "nowhere", "not found"),
                        (tmp_path / "text.pt", "is not a readable GlassGPT checkpoint"),
                        (tmp_path, "is a folder without a best_model.pt")):
        result = run_script("lens.py", "--ckpt", ckpt, "--device", "cpu")
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_command_serves_a_run_folder_and_stops_on_ctrl_c(trained_run):
    out, _ = trained_run
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "lens.py"), "--ckpt", str(out), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=dict(os.environ, GLASSGPT_OFFLINE="1"))
    try:
        line = process.stdout.readline()
        url = line.split()[-4]  # "GlassGPT lens of <path>: <url>  (Ctrl-C stops it)"
        assert line.startswith(f"GlassGPT lens of {out / 'best_model.pt'}: http://127.0.0.1:") and url.endswith("/")
        assert ask(f"{url}api/model")[1]["checkpoint"] == str(out / "best_model.pt")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and err == "interrupted by SIGINT; the lens has stopped\n"


# ---- the page, in a real browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_CKPT = os.environ.get("GLASSGPT_LENS_DOCS")


@pytest.fixture(scope="module")
def browser_context():
    """Headless Debian chromium with a fresh profile; absent here, the browser tests are skipped (never in CI,
    where .ci/run installs it)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [name for name, found in (("chromium", CHROMIUM), ("playwright", sync_playwright)) if not found]
    reason = f"needs {' and '.join(missing)}: apt-get install chromium; pip install -r requirements-dev.txt"
    if missing and os.environ.get("CI"):
        pytest.fail(reason)
    if missing:
        pytest.skip(reason)
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 960, "height": 640})
        yield context
        context.close()


@pytest.fixture(scope="module")
def page_lens(trained_run):
    """The model the browser tests look at: the tiny trained one, or GLASSGPT_LENS_DOCS's for the docs."""
    path = find_checkpoint(DOCS_CKPT) if DOCS_CKPT else str(trained_run[0] / "best_model.pt")
    model, tokenizer = load_model(path, "cpu")
    lens = Lens(model, tokenizer, path, "cpu")
    server = make_server(lens, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", lens
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return os.path.join(ROOT, "docs", "img") if DOCS_CKPT else str(tmp_path_factory.mktemp("screenshots"))


class Page:
    """The lens page in a browser tab, with what it logged and every request it made."""

    def __init__(self, context, url):
        self.tab, self.url = context.new_page(), url
        self.errors, self.requests = [], []
        self.tab.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))
        self.tab.on("request", lambda r: self.requests.append(r.url))
        self.tab.goto(url)
        self.settle()

    def settle(self):
        """Wait until the answer to the latest question is drawn."""
        self.tab.wait_for_function("document.body.dataset.pending === undefined && !!window.lensReady")

    def type_prompt(self, text):
        self.tab.fill("#prompt", text)
        self.settle()

    def set(self, field, value):
        self.tab.fill(f"#{field}", str(value))
        self.settle()

    def view(self, name):
        self.tab.click(f"#tabs button[data-view={name}]")

    def rows(self, selector, *keys):
        """[(data-key, ...)] of each element matching selector, as numbers."""
        fields = ", ".join(f"e.dataset.{key}" for key in keys)
        return [tuple(float(v) for v in row)
                for row in self.tab.eval_on_selector_all(selector, f"els => els.map(e => [{fields}])")]

    def screenshot(self, folder, name):
        path = os.path.join(folder, name)
        self.tab.screenshot(path=path, full_page=True)
        return path


@pytest.fixture
def page(browser_context, page_lens):
    page = Page(browser_context, page_lens[0])
    yield page
    page.tab.close()


@pytest.mark.slow
def test_browser_the_page_loads_offline_with_no_console_error(page, page_lens):
    assert page.errors == []
    assert page.requests and all(url.startswith(page.url) for url in page.requests), page.requests
    info = page.tab.inner_text("#model-info")
    assert info.startswith(page_lens[1].path) and f"block_size {page_lens[1].model.config.block_size}" in info


@pytest.mark.slow
def test_browser_typing_a_prompt_shows_its_tokens(page, page_lens, screenshots):
    page.type_prompt(PROMPT)
    ids = page_lens[1].tokenizer.encode(PROMPT)
    assert [int(i) for (i,) in page.rows("#tokens .tok", "id")] == ids
    texts = page.tab.eval_on_selector_all("#tokens .tok", "els => els.map(e => e.firstChild.textContent)")
    assert texts == [page_lens[1].tokenizer.decode([i]).replace(" ", "␣").replace("\n", "⏎") for i in ids]
    page.screenshot(screenshots, "lens-tokens.png")
    assert page.errors == []


@pytest.mark.slow
def test_browser_next_token_bars_are_the_models_softmax_and_follow_the_settings(page, page_lens, screenshots):
    lens = page_lens[1]
    page.type_prompt(PROMPT)
    page.tab.click("#tokens .tok[data-position='7']")
    page.settle()
    page.view("next")
    logits = full_logits(lens, lens.tokenizer.encode(PROMPT))[7]  # the model's own forward, position 7
    probs = F.softmax(logits, dim=-1)
    bars = page.rows("#next-bars tr[data-id]", "id", "p", "sampled")
    assert len(bars) == 20
    assert [int(i) for i, _, _ in bars] == torch.topk(probs, 20).indices.tolist()
    assert max(abs(p - probs[int(i)].item()) for i, p, _ in bars) < 1e-4
    page.set("temperature", 0.5)
    page.set("top_k", 3)
    reshaped = sampling_probs(logits[None], 0.5, 3)[0]
    bars = page.rows("#next-bars tr[data-id]", "id", "p", "sampled")
    assert max(abs(s - reshaped[int(i)].item()) for i, _, s in bars) < 1e-4
    assert sum(s > 0 for _, _, s in bars) == 3
    drawn = {sample_next(logits[None], 0.5, 3, generator=torch.Generator().manual_seed(n)).item() for n in range(200)}
    assert drawn <= {int(i) for i, _, s in bars if s > 0}  # sample_next draws only what the bars keep
    page.screenshot(screenshots, "lens-next.png")
    assert page.errors == []


@pytest.mark.slow
def test_browser_attention_rows_sum_to_one_and_the_future_is_masked(page, page_lens, screenshots):
    lens = page_lens[1]
    page.type_prompt(PROMPT)
    page.view("attention")
    n_layer, n_head = lens.model.config.n_layer, lens.model.config.n_head
    assert page.tab.locator("#heads figure").count() == n_layer * n_head
    T = len(lens.tokenizer.encode(PROMPT))
    # the small maps: the cell of the first query and the last key is the mask's grey, the first cell full blue
    corners = page.tab.eval_on_selector("#heads figure canvas", """c => {
        const ctx = c.getContext('2d');
        return [Array.from(ctx.getImageData(c.width - 1, 0, 1, 1).data), Array.from(ctx.getImageData(0, 0, 1, 1).data)];
    }""")
    assert corners == [[229, 231, 235, 255], [37, 99, 235, 255]]
    page.tab.click(f"#heads figure[data-layer='{n_layer - 1}'][data-head='{n_head - 1}']")
    with torch.no_grad():
        _, inside = lens_module.trace(lens.model, torch.tensor([lens.tokenizer.encode(PROMPT)]))
    weights = inside["attention"][-1][0, -1]  # (T, T): the enlarged head's, from the model
    for q in range(T):
        page.tab.fill("#query", str(q))
        row = page.rows("#head-row tr[data-key]", "key", "w")
        assert [int(k) for k, _ in row] == list(range(T))
        assert abs(sum(w for _, w in row) - 1) < 1e-3
        assert all(w == 0 for k, w in row if k > q)
        assert max(abs(w - weights[q, int(k)].item()) for k, w in row) < 1e-4
    page.tab.fill("#query", str(T - 1))
    page.tab.hover("#head-canvas")
    page.screenshot(screenshots, "lens-attention.png")
    assert page.errors == []


@pytest.mark.slow
def test_browser_the_logit_lens_of_the_last_block_is_the_models_prediction(page, page_lens, screenshots):
    lens = page_lens[1]
    page.type_prompt(PROMPT)
    page.view("stack")
    stages = page.tab.eval_on_selector_all("#stack tr[data-stage]", "els => els.map(e => e.dataset.stage)")
    assert stages == ["embeddings"] + [f"block {n + 1}" for n in range(lens.model.config.n_layer)]
    probs = F.softmax(full_logits(lens, lens.tokenizer.encode(PROMPT)), dim=-1)  # (T, V)
    best_p, best_id = probs.max(dim=-1)
    last = page.rows("#stack tr[data-stage]:last-child td", "position", "id", "p")
    assert [int(i) for _, i, _ in last] == best_id.tolist()
    assert max(abs(p - best_p[int(t)].item()) for t, _, p in last) < 1e-4
    page.screenshot(screenshots, "lens-stack.png")
    assert page.errors == []


@pytest.mark.slow
def test_browser_generate_with_a_seed_prints_what_generate_py_prints(page, page_lens, screenshots):
    lens = page_lens[1]
    page.type_prompt("ROMEO:")
    page.set("seed", 7)
    page.set("max_new_tokens", 60)
    page.view("generate")
    page.tab.click("#generate")
    page.tab.wait_for_selector("#generated[data-text]")
    printed = run_script("generate.py", "--ckpt", os.path.abspath(lens.path), "--start", "ROMEO:", "--seed", "7",
                         "--max_new_tokens", "60", "--device", "cpu", check=True).stdout
    text = page.tab.get_attribute("#generated", "data-text")
    assert printed == text + "\n---------------\n"
    tokens = page.rows("#generated .gen", "id", "p")
    assert len(tokens) == 60 and all(0 < p <= 1 for _, p in tokens)
    assert "generate.py" in page.tab.inner_text("#generate-summary")
    page.screenshot(screenshots, "lens-generate.png")
    assert page.errors == []


@pytest.mark.slow
def test_browser_bad_prompts_are_messages_on_the_page(page, page_lens):
    block_size = page_lens[1].model.config.block_size
    page.type_prompt("ROMEO: \u00e9")
    assert "outside this model's vocabulary" in page.tab.inner_text("#message")
    assert page.tab.locator("#tokens .tok").count() == 0
    page.view("generate")
    page.tab.click("#generate")
    page.tab.wait_for_function("document.getElementById('generate-summary').textContent === 'nothing generated'")
    assert "outside this model's vocabulary" in page.tab.inner_text("#message")
    assert page.tab.locator("#generated .gen").count() == 0
    page.type_prompt("")
    assert page.tab.inner_text("#message") == "the prompt is empty; type some text"
    long = (PROMPT * 10)[: block_size + 3]
    page.type_prompt(long)
    assert page.tab.is_hidden("#message") and page.tab.locator("#tokens .tok").count() == block_size
    assert page.tab.inner_text("#note").startswith(f"the prompt is {block_size + 3} tokens long")


@pytest.mark.slow
def test_browser_a_long_prompt_generates_and_a_failure_in_the_stream_is_shown(page, page_lens, monkeypatch):
    lens = page_lens[1]
    long = PROMPT * 400  # 10,000 characters: the parameters travel in a POST body, not in a URL
    page.type_prompt(long)
    page.set("max_new_tokens", 4)
    page.view("generate")
    page.tab.click("#generate")
    page.tab.wait_for_selector("#generated[data-text]")
    assert page.tab.get_attribute("#generated", "data-text").startswith(long)
    assert page.tab.locator("#generated .gen").count() == 4
    # the model fails at its fourth forward, in the middle of the stream: the page says so and keeps what came
    calls, forward = [], lens.model.forward

    def forward_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("the model broke")
        return forward(*args, **kwargs)
    monkeypatch.setattr(lens.model, "forward", forward_or_fail)
    page.set("max_new_tokens", 10)
    page.tab.click("#generate")
    page.tab.wait_for_function("document.getElementById('generate-summary').textContent.includes('failed')")
    assert page.tab.inner_text("#generate-summary") == "3 tokens, then the generation failed"
    assert page.tab.inner_text("#message").startswith("the lens failed on this request (RuntimeError: the model broke)")
    monkeypatch.undo()
    page.type_prompt("x" * (lens_module.BODY_LIMIT + 1))  # more than the lens reads: said on the page, not sent
    assert page.tab.inner_text("#message").startswith("the prompt is too long for the lens")
    page.tab.click("#generate")
    page.tab.wait_for_function("document.getElementById('generate-summary').textContent === 'nothing generated'")
    page.type_prompt("ROMEO:")  # and Stop ends a long generation where it is
    page.set("max_new_tokens", lens_module.GENERATE_LIMIT)
    page.tab.click("#generate")
    page.tab.wait_for_selector("#generated .gen")
    page.tab.click("#stop")
    assert page.tab.inner_text("#generate-summary") == "stopped" and page.tab.is_enabled("#generate")
    made = page.tab.locator("#generated .gen").count()
    page.tab.wait_for_timeout(300)
    assert page.tab.locator("#generated .gen").count() == made < lens_module.GENERATE_LIMIT
    assert page.errors == []


# ---- the training replay: a run's timeline on the page -------------------------------------------

def snapshot_probs(path, ids):
    """softmax of the last position's logits of the snapshot at path, loaded directly (not by the lens)."""
    model, _ = load_model(path, "cpu")
    with torch.no_grad():
        return F.softmax(model(torch.tensor([ids]))[0][0, -1].float(), dim=-1)


def open_training(page):
    page.view("training")
    page.tab.wait_for_function("document.body.dataset.training === undefined && "
                               "document.querySelectorAll('#heads-table tr[data-layer]').length > 0")


@pytest.mark.slow
def test_browser_choosing_a_step_shows_that_snapshots_own_next_token_probabilities(page, page_lens, screenshots):
    lens = page_lens[1]
    steps = list(lens.snapshots)
    assert steps and steps[0] == 0  # the run kept a timeline
    ids = lens.prompt_ids(PROMPT)[0]
    page.type_prompt(PROMPT)
    page.view("next")
    for step in (steps[len(steps) // 2], steps[0]):
        page.tab.select_option("#step", str(step))
        page.settle()
        probs = snapshot_probs(lens.snapshots[step][1], ids)
        bars = page.rows("#next-bars tr[data-id]", "id", "p")
        assert [int(i) for i, _ in bars] == torch.topk(probs, len(bars)).indices.tolist()
        assert max(abs(p - probs[int(i)].item()) for i, p in bars) < 1e-4
    final = F.softmax(full_logits(lens, ids)[-1], dim=-1)
    assert (final - probs).abs().max().item() > 1e-3  # step 0's model is not the trained one: the step mattered
    page.tab.select_option("#step", "")  # back to the checkpoint
    page.settle()
    assert max(abs(p - final[int(i)].item()) for i, p in page.rows("#next-bars tr[data-id]", "id", "p")) < 1e-4
    assert page.errors == []


@pytest.mark.slow
def test_browser_the_training_view_replays_the_run_and_a_knockout_is_the_loss_without_that_head(page, page_lens,
                                                                                                  screenshots):
    lens = page_lens[1]
    page.type_prompt(PROMPT)
    open_training(page)
    steps = list(lens.snapshots)
    assert page.rows("#snapshot-steps button[data-step]:not([data-step=''])", "step") == [(s,) for s in steps]
    page.tab.select_option("#head-metric", "knockout")
    layer, head, step = 0, 0, steps[-1]  # in the CPU recipe, the previous-token head (chapter 5.6.1)
    shown = page.tab.eval_on_selector(f"#heads-table tr[data-layer='{layer}'][data-head='{head}'] "
                                      f"td[data-step='{step}']", "e => e.dataset.value")
    # the same head removed by hand, in the snapshot loaded directly: its share of c_proj's input set to zero
    model, _ = load_model(lens.snapshots[step][1], "cpu")
    (X, Y), _ = lens.val_sample()
    size = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        base = model(X, Y)[1].item()
        model.transformer.h[layer].attn.c_proj.weight[:, head * size:(head + 1) * size] = 0
        without = model(X, Y)[1].item()
    assert abs(float(shown) - (without - base)) < 1e-4
    page.tab.click(f"#heads-table tr[data-layer='{layer}'][data-head='{head}'] th")  # the head's strip
    page.tab.wait_for_function("document.body.dataset.training === undefined && "
                               "document.querySelectorAll('#strip figure').length > 0")
    assert page.rows("#strip figure", "step") == [(s,) for s in steps]
    page.tab.click(f"#snapshot-steps button[data-step='{steps[len(steps) // 2]}']")  # a step chosen here ...
    page.settle()
    assert page.tab.input_value("#step") == str(steps[len(steps) // 2])  # ... is the step of every view
    page.tab.select_option("#head-metric", "previous")
    page.tab.locator("#view-training").screenshot(path=os.path.join(screenshots, "lens-training.png"))
    assert page.errors == []


# ---- a second model beside the first: lens.py --compare (a quantized checkpoint, say) -----------------

@pytest.fixture(scope="module")
def compared_lens(trained_run, tmp_path_factory):
    """The tiny trained model with its int4 quantization (groups of 16) beside it, served."""
    from quantize import quantize_checkpoint
    path = str(trained_run[0] / "best_model.pt")
    quantized, _ = quantize_checkpoint(path, "int4", 16, out=str(tmp_path_factory.mktemp("q") / "int4.safetensors"))
    model, tokenizer = load_model(path, "cpu")
    lens = Lens(model, tokenizer, path, "cpu", lens_module.compared_model(model, tokenizer, quantized, "cpu", "float32"))
    server = make_server(lens, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", lens, quantized
    server.shutdown()
    server.server_close()


def test_compare_needs_a_model_of_the_same_tokens(tiny_lens):
    with pytest.raises(UsageError, match="reads other tokens than the checkpoint"):  # a BPE model against a char one
        lens_module.compared_model(tiny_lens.model, GPT2Tokenizer(), tiny_lens.path, "cpu", "float32")


@pytest.mark.slow
def test_browser_the_compared_models_bars_are_its_own_softmax(browser_context, compared_lens):
    url, lens, quantized = compared_lens
    page = Page(browser_context, url)
    page.type_prompt(PROMPT)
    page.view("next")
    ids = lens.prompt_ids(PROMPT)[0]
    other, _ = load_model(quantized, "cpu")  # the quantized file loaded directly
    with torch.no_grad():
        q = F.softmax(other(torch.tensor([ids]))[0][0, -1].float(), dim=-1)
    p = F.softmax(full_logits(lens, ids)[-1], dim=-1)
    bars = page.rows("#next-bars tr[data-id]", "id", "p", "pCompare")
    assert max(abs(pc - q[int(i)].item()) for i, _, pc in bars) < 1e-4
    assert max(abs(pp - p[int(i)].item()) for i, pp, _ in bars) < 1e-4
    assert 0 < max(abs(pp - pc) for _, pp, pc in bars)  # int4 moved the probabilities, a little
    assert quantized in page.tab.inner_text("#next-summary")
    page.tab.close()
