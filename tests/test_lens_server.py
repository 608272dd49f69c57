"""lens.py as a server that any web page (or anyone, on --host 0.0.0.0) can reach: requests for another Host
are refused, bodies are limited before they are read, silent clients are dropped, every field is checked, a
fault of the lens is a 500, and every answer is JSON: the server answers the next request after each.

The property test throws generated hostile JSON at every field of both endpoints; GLASSGPT_PROPERTY_EXAMPLES
sets how many examples each of its tests tries (40 here: a few seconds).
"""

import json
import os
import shlex
import socket
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import CORPUS, run_script
import generate
import lens as lens_module
from generate import load_model
from lens import BODY_LIMIT, FIELDS, SETTINGS, Handler, Lens, make_server
from machinery.interactive import read_prompt

EXAMPLES = int(os.environ.get("GLASSGPT_PROPERTY_EXAMPLES", "40"))
GOOD = json.dumps({"prompt": "ROMEO:", "max_new_tokens": "3", "seed": "7"}).encode()


@pytest.fixture(scope="module")
def lens(trained_run):
    path = str(trained_run[0] / "best_model.pt")
    model, tokenizer = load_model(path, "cpu")
    return Lens(model, tokenizer, path, "cpu")


@pytest.fixture(scope="module")
def port(lens):
    """The lens server on a free port of 127.0.0.1, in a thread of this process."""
    server = make_server(lens, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def request(port, method, path, body=b"", host=None, headers=(), length=True):
    """The bytes of an HTTP/1.1 request; host None: the server's own 127.0.0.1:port, False: no Host header."""
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [] if host is False else [f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [*headers] + ([f"Content-Length: {len(body)}"] if length and method == "POST" else [])
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def exchange(port, data, timeout=30):
    """Send data on a new connection and read until the server closes it: (status, headers, body), status None
    when the connection closed with no answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return None, {}, b""
    lines = head.decode("iso-8859-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def strict_json(body):
    """body as JSON, refusing NaN and Infinity (Python reads them; JSON has no such words)."""
    def refuse(word):
        raise AssertionError(f"{word} in an answer: not JSON")
    return json.loads(body, parse_constant=refuse)


def error(port, data):
    """(status, error message) of a request the lens must refuse with a JSON answer."""
    status, headers, body = exchange(port, data)
    assert status is not None, "the connection closed with no answer"
    assert headers["content-type"] == "application/json", headers
    return status, strict_json(body)["error"]


def events(body):
    """[(name, data)] of a stream of server-sent events."""
    blocks = body.decode("utf-8").split("\n\n")
    assert blocks[-1] == "", "the stream ended inside an event"
    found = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        found.append((name[len("event: "):], strict_json(data[len("data: "):])))
    return found


def answers_a_good_request(port):
    status, _, body = exchange(port, request(port, "POST", "/api/analyze", GOOD))
    assert status == 200 and [t["text"] for t in strict_json(body)["tokens"]] == list("ROMEO:")
    return True


# ---- only this machine's names: DNS rebinding ----------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "{port}", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "127.0.0.1:1", False, "localhost:{port}, evil.example:{port}"])
def test_a_request_for_another_host_is_refused(port, host):
    host = host if host is False else host.format(port=port)
    for path, method in (("/api/model", "GET"), ("/", "GET"), ("/api/generate", "POST")):
        status, message = error(port, request(port, method, path, GOOD, host=host))
        assert status == 403 and f"answers only requests for 127.0.0.1:{port} or localhost:{port}" in message


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:{port}", "null",
                                    "http://127.0.0.1:{port}.evil.example", "https://127.0.0.1:{port}"])
def test_a_request_from_another_sites_page_is_refused(port, origin):
    # a page may post to 127.0.0.1 itself: it cannot read the answer, but the browser names it in Origin
    headers = [f"Origin: {origin.format(port=port)}", "Content-Type: text/plain"]
    status, message = error(port, request(port, "POST", "/api/generate", GOOD, headers=headers))
    assert status == 403 and message.startswith("this lens answers only its own page, not one from")
    for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):  # the lens's page itself
        assert exchange(port, request(port, "POST", "/api/analyze", GOOD, headers=[f"Origin: {own}"]))[0] == 200


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_this_machines_own_names_are_answered(port, host):
    status, _, body = exchange(port, request(port, "GET", "/api/model", host=host.format(port=port)))
    assert status == 200 and strict_json(body)["block_size"] == 32


def test_a_server_for_the_network_answers_its_own_address_and_warns_at_start(lens, trained_run, monkeypatch, capsys):
    server = make_server(lens, "0.0.0.0", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for host in (f"0.0.0.0:{port}", f"127.0.0.1:{port}"):  # and the address the client connected to
            assert exchange(port, request(port, "GET", "/api/model", host=host))[0] == 200
        status, message = error(port, request(port, "GET", "/api/model", host=f"evil.example:{port}"))
        assert status == 403 and f"this machine's addresses or localhost, port {port}" in message
    finally:
        server.shutdown()
        server.server_close()
    # lens.py's main: one warning line on stderr before it serves (here it stops at once)
    monkeypatch.setattr(lens_module.ThreadingHTTPServer, "serve_forever", lambda self: None)
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)):
        monkeypatch.setattr(sys, "argv", ["lens.py", "--ckpt", str(trained_run[0]), "--device", "cpu", "--host", host])
        lens_module.main()
        err = capsys.readouterr().err
        assert err.count("\n") == (1 if warned else 0)
        assert not warned or (err.startswith("warning: the lens listens on 0.0.0.0:") and "no password" in err)


# ---- limits: the body's size, before it is read; silence ------------------------------------------

def test_a_1_gb_content_length_is_refused_before_the_body_is_read(port):
    start = time.monotonic()
    # only the headers are sent: a server that waited for the body would answer after SOCKET_TIMEOUT, or never
    status, message = error(port, request(port, "POST", "/api/analyze", length=False,
                                          headers=["Content-Length: 1000000000"]))
    assert (status, message) == (413, f"the request body would be 1000000000 bytes; the lens reads at most {BODY_LIMIT}")
    assert time.monotonic() - start < Handler.timeout / 2
    assert answers_a_good_request(port)


def test_a_silent_client_is_dropped_after_the_socket_timeout(lens, monkeypatch):
    monkeypatch.setattr(Handler, "timeout", 0.5)
    server = make_server(lens, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        start = time.monotonic()
        assert exchange(port, b"", timeout=10)[0] is None  # nothing sent: closed, not waited on forever
        status, message = error(port, request(port, "POST", "/api/analyze", length=False,
                                              headers=["Content-Length: 100"]) + b'{"prompt": ')
        assert status == 408 and message == "the request body did not arrive within 0.5 s"
        assert time.monotonic() - start < 5
        assert answers_a_good_request(port)
    finally:
        server.shutdown()
        server.server_close()


# ---- every bad request: a 4xx JSON answer naming the problem, and the next request is answered ----------

def post(port, body, path="/api/analyze"):
    return request(port, "POST", path, body.encode("utf-8") if isinstance(body, str) else body)


def with_field(field, value):
    """A request body: a good prompt and one field's value, spelt as JSON text."""
    return '{"prompt": "ROMEO:", "%s": %s}' % (field, value)


BAD = [  # (request(port), status, words in the error)
    (lambda p: request(p, "GET", "/api/model", host="evil.example"), 403, "not one for Host 'evil.example'"),
    (lambda p: request(p, "GET", "/api/model", headers=["Host: evil.example"]), 403, "not one for Host '127.0.0.1:"),
    (lambda p: request(p, "POST", "/api/generate", GOOD, headers=["Origin: https://evil.example"]), 403,
     "not one from 'https://evil.example'"),
    (lambda p: request(p, "POST", "/api/analyze", length=False, headers=["Content-Length: 1000000000"]), 413,
     "would be 1000000000 bytes"),
    (lambda p: request(p, "POST", "/api/analyze", length=False, headers=["Content-Length: lots"]), 400,
     "the Content-Length must be one whole number of bytes, got 'lots'"),
    (lambda p: request(p, "POST", "/api/analyze", length=False, headers=["Content-Length: -5"]), 400, "got '-5'"),
    (lambda p: request(p, "POST", "/api/analyze", b"{}", headers=["Content-Length: 2"]), 400, "one whole number"),
    (lambda p: request(p, "POST", "/api/analyze", b"0\r\n\r\n", length=False, headers=["Transfer-Encoding: chunked"]),
     411, "not in chunks"),
    (lambda p: post(p, b'{"prompt": "ROMEO:\xff"}'), 400, "the request body is not UTF-8 text"),
    (lambda p: post(p, "[" * 30000 + "]" * 30000), 400, "the request is JSON nested too deeply"),
    (lambda p: post(p, '{"prompt": %s}' % ("[" * 3000 + "]" * 3000)), 400, "the request is JSON nested too deeply"),
    (lambda p: post(p, "{not json"), 400, "the request is not JSON"),
    (lambda p: post(p, "[1, 2]"), 400, "the request must be a JSON object of the page's fields, got a list"),
    (lambda p: post(p, '{"prompt": "ROMEO:", "colour": 1}'), 400, "a field the lens does not know, 'colour'"),
    (lambda p: post(p, '{"prompt": 42}'), 400, "the field 'prompt' must be a string, got a number"),
    (lambda p: post(p, '{"prompt": {"text": "ROMEO:"}}', "/api/generate"), 400,
     "the field 'prompt' must be a string, got an object"),
    (lambda p: post(p, '{"prompt": "\\ud800"}'), 400, "the field 'prompt' is not text"),
    (lambda p: post(p, with_field("temperature", "NaN")), 400, "the field 'temperature' must be a finite number"),
    (lambda p: post(p, with_field("temperature", "1e400")), 400, "the field 'temperature' must be a finite number"),
    (lambda p: post(p, with_field("temperature", '"inf"')), 400, "--temperature"),
    (lambda p: post(p, with_field("temperature", "1e-300")), 400, "argument --temperature: must be 0 (greedy) or at least"),
    (lambda p: post(p, with_field("temperature", "true")), 400, "the field 'temperature' must be a number"),
    (lambda p: post(p, with_field("top_k", "-Infinity")), 400, "the field 'top_k' must be a finite number"),
    (lambda p: post(p, with_field("top_k", "[5]")), 400, "the field 'top_k' must be a number (or a string of one)"),
    (lambda p: post(p, with_field("top_k", str(2 ** 64))), 400, "--top_k"),
    (lambda p: post(p, with_field("top_p", '"nan"')), 400, "--top_p"),
    (lambda p: post(p, with_field("top_p", "Infinity"), "/api/generate"), 400, "the field 'top_p' must be a finite"),
    (lambda p: post(p, with_field("seed", "-1"), "/api/generate"), 400, "--seed"),
    (lambda p: post(p, with_field("seed", str(2 ** 64)), "/api/generate"), 400, "--seed"),
    (lambda p: post(p, with_field("seed", '"%s"' % ("9" * 200))), 400, "the field 'seed' is 200 characters long"),
    (lambda p: post(p, with_field("max_new_tokens", "1" * 5000), "/api/generate"), 400,
     "the field 'max_new_tokens' is a number of 5000 digits"),
    (lambda p: post(p, with_field("max_new_tokens", str(10 ** 12)), "/api/generate"), 400,
     "--max_new_tokens must be at most 10000"),
    (lambda p: post(p, with_field("max_new_tokens", "NaN"), "/api/generate"), 400, "the field 'max_new_tokens'"),
    (lambda p: post(p, with_field("position", "1e400")), 400, "the field 'position' must be a finite number"),
    (lambda p: post(p, with_field("position", str(10 ** 30))), 400, "the field 'position' must be a whole number"),
    (lambda p: post(p, with_field("position", '"two"')), 400, "the field 'position' must be a whole number"),
    (lambda p: request(p, "GET", f"/api/generate?{'prompt=ROMEO:&' * 8000}"), 414, "Request-URI Too Long"),
    (lambda p: request(p, "GET", "/api/generate?prompt=ROMEO:"), 405, "/api/generate takes a POST"),
    (lambda p: request(p, "DELETE", "/"), 501, "Unsupported method ('DELETE')"),
    (lambda p: post(p, "{}", "/api/nothing"), 404, "nothing to post to at /api/nothing"),
    (lambda p: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", 400, "Bad request syntax"),
]


def test_every_bad_request_is_a_4xx_json_answer_naming_it_and_the_server_answers_the_next(port, capsys):
    for make, expected, words in BAD:
        status, message = error(port, make(port))
        assert (status, words in message) == (expected, True), (message, make(port)[:80])
        assert answers_a_good_request(port)
    assert capsys.readouterr().err == ""  # nothing in the lens's terminal: these are the client's mistakes


def test_a_long_prompt_is_generated_from_a_post_body(port, lens):
    prompt = CORPUS[:20_000]  # far more than a URL holds
    status, headers, body = exchange(port, post(port, json.dumps({"prompt": prompt, "max_new_tokens": 3}),
                                                "/api/generate"))
    assert status == 200 and headers["content-type"] == "text/event-stream"
    names = [name for name, _ in events(body)]
    assert names == ["token", "token", "token", "done"]


# ---- a fault of the lens: 500, one line in its terminal, and it goes on --------------------------------

def failing_forward(model, after=0):
    """A forward that works `after` times, then raises as a broken model would."""
    calls, forward = [], model.forward

    def forward_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("the model broke\nsecond line of the error")
        return forward(*args, **kwargs)
    return forward_or_fail


@pytest.mark.parametrize("path", ["/api/analyze", "/api/generate"])
def test_an_exception_inside_the_model_is_a_500_json_answer_and_one_line(port, lens, path, monkeypatch, capsys):
    monkeypatch.setattr(lens.model, "forward", failing_forward(lens.model))
    status, message = error(port, post(port, GOOD, path))
    assert status == 500 and message == ("the lens failed on this request (RuntimeError: the model broke); its "
                                         "terminal has the line")
    assert capsys.readouterr().err == (f"lens: POST '{path}' failed: RuntimeError: the model broke "
                                       "(answered 500; the lens goes on)\n")
    monkeypatch.undo()
    assert answers_a_good_request(port)


def test_a_fault_in_the_middle_of_a_stream_is_its_failure_event(port, lens, monkeypatch, capsys):
    monkeypatch.setattr(lens.model, "forward", failing_forward(lens.model, after=2))
    status, _, body = exchange(port, post(port, GOOD, "/api/generate"))
    assert status == 200
    assert [name for name, _ in events(body)] == ["token", "token", "failure"]
    assert events(body)[-1][1]["error"].startswith("the lens failed on this request (RuntimeError: the model broke)")
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.undo()
    assert answers_a_good_request(port)


def test_an_answer_that_would_not_be_json_is_a_500(port, monkeypatch, capsys):
    monkeypatch.setattr(lens_module, "rounded", lambda tensor, digits=6: float("nan"))  # as from a diverged model
    status, message = error(port, post(port, GOOD))
    assert status == 500 and "ValueError" in message  # json.dumps(allow_nan=False): never NaN in an answer
    assert "Traceback" not in capsys.readouterr().err


# ---- the offered command prints what the page printed ---------------------------------------------

AWKWARD = ["-ROMEO:", "--seed=3", "FILE:/etc/passwd", "TEXT:ROMEO:", "FILE:", "ROMEO:\nBut, 'soft!\" what\n",
           " leading space", "a\\b $HOME `x` $(y) ;|&", "\t\r\n", "-"]


@pytest.mark.parametrize("prompt", AWKWARD)
def test_the_offered_command_gives_generate_py_the_same_prompt_and_settings(lens, prompt):
    fields = {"prompt": prompt, "seed": "7", "temperature": "0.5", "top_k": "", "top_p": "0.9", "max_new_tokens": "9"}
    argv = shlex.split(lens.generate_command(fields))
    assert argv[:2] == ["python", "generate.py"]
    args = generate.parse_args(argv[2:])
    assert read_prompt(args.start) == prompt  # FILE:/etc/passwd is the text, not the file
    assert (args.ckpt, args.seed, args.temperature, args.top_p, args.max_new_tokens, args.device) == \
        (lens.path, 7, 0.5, 0.9, 9, "cpu")
    assert args.top_k == lens.model.config.vocab_size  # top-k off: every token kept


def test_the_offered_command_prints_the_pages_text(lens):
    prompt = "'What work's, my\nWith"  # a quote and a newline, in the tiny model's vocabulary
    fields = {"prompt": prompt, "seed": "3", "max_new_tokens": "20"}
    text = lens.tokenizer.decode([t["id"] for t in lens.generate(fields)])
    printed = run_script(*shlex.split(lens.generate_command(fields))[1:], check=True).stdout
    assert printed == prompt + text + "\n---------------\n"


# ---- the property: hostile JSON at every field ------------------------------------------------------

NUMBER_TEXTS = ["", " ", "0", "-0", "1", "2", "7", "-1", "0.5", "1e-300", "1e400", "-1e400", "nan", "NaN", "inf",
                "-inf", "Infinity", "0x10", "1_000", "\u0663", "18446744073709551616", "9" * 30, " 3 ", "3.0", "true"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                    st.text(max_size=12), st.sampled_from(NUMBER_TEXTS), st.sampled_from([1, 2, 3, 0.5]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                             max_size=3), max_leaves=6)
PROMPTS = st.one_of(VALUES, st.text(alphabet=sorted(set(CORPUS)), max_size=40), st.text(max_size=10),
                    st.sampled_from(["ROMEO:", "FILE:/etc/passwd", "-x", "", "\ud800"]))
VALID = {"prompt": ["ROMEO:", "But, soft! what light"], "position": [0, "2", ""], "temperature": [0, "0.8", 1.5],
         "top_k": ["", 1, "5"], "top_p": ["", 0.9, "1"], "seed": [0, "7", 2 ** 64 - 1], "max_new_tokens": [1, "3"],
         "step": ["", 0, "8"], "layer": [0, "1"], "head": ["0", 1]}  # steps of conftest's run's timeline
FIELD = {key: st.one_of(st.sampled_from(VALID[key]), PROMPTS if key == "prompt" else VALUES) for key in FIELDS}
# a prompt and a length always (the default of 500 tokens is more than this test lets a request generate),
# each other field or not: many requests reach the model, the rest each check
ALWAYS = ("prompt", "max_new_tokens")
REQUESTS = st.fixed_dictionaries({key: FIELD[key] for key in ALWAYS},
                                 optional={key: FIELD[key] for key in FIELDS if key not in ALWAYS})
BODIES = st.one_of(REQUESTS.map(json.dumps), REQUESTS.map(json.dumps), REQUESTS.map(json.dumps),
                   VALUES.map(json.dumps), st.binary(max_size=40))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def keeps_the_contract(port, path, body):
    """The contract of every answer: 2xx with valid JSON (or a stream of it), or 4xx/5xx JSON naming the
    problem; never a dropped connection."""
    status, headers, answer = exchange(port, post(port, body, path))
    assert status is not None, "the connection closed with no answer"
    if status == 200 and path == "/api/generate":
        names = [name for name, _ in events(answer)]
        assert names[-1] in ("done", "failure") and set(names[:-1]) <= {"token"}
    else:
        assert headers["content-type"] == "application/json"
        data = strict_json(answer)
        assert (200 <= status < 300) or (400 <= status < 600 and isinstance(data["error"], str) and data["error"])
    return status


@pytest.mark.parametrize("path", ["/api/analyze", "/api/generate", "/api/strip"])
def test_property_hostile_json_at_every_field_is_an_answer_and_the_server_goes_on(port, path, monkeypatch, capsys):
    monkeypatch.setattr(lens_module, "GENERATE_LIMIT", 20)  # a valid request generates a few tokens, not thousands
    seen = []

    @PROPERTY
    @given(body=BODIES)
    @example(body=json.dumps({"prompt": "ROMEO:", "max_new_tokens": 3, "layer": 0, "head": 1}))  # one that reaches
    # the model, whatever the path
    @example(body=json.dumps({"prompt": "ROMEO:", "temperature": float("nan")}))  # and one that does not
    def hostile(body):
        seen.append(keeps_the_contract(port, path, body))
        assert answers_a_good_request(port)

    hostile()
    assert 200 in seen and 400 in seen  # the examples reached both the model and the checks
    assert "Traceback" not in capsys.readouterr().err
