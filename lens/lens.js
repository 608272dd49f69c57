"use strict";
// The page draws what lens.py answers: every number comes from the model's own code on the server,
// none is computed here. body[data-pending] is set while an answer is on its way (the tests wait on it).

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_k", "top_p", "seed", "max_new_tokens"];
const MASKED = [229, 231, 235];  // the causal mask's cells (a query never sees a later key): light grey
const BLUE = [37, 99, 235];
const state = { model: null, answer: null, position: null, head: null, asked: 0, stream: null, timer: null,
  training: null, heads: null, stripHead: null };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value;
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

// whitespace made visible, so that a space or a newline token can be seen and clicked
const shown = (text) => text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
const pct = (p) => `${(100 * p).toFixed(2)}%`;
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

function say(text) {
  $("message").hidden = !text;
  $("message").textContent = text || "";
}

function fields() {
  const f = { prompt: $("prompt").value, step: $("step").value };  // step "": the checkpoint itself
  for (const key of SETTINGS) f[key] = $(key).value;
  return f;
}

async function start() {
  const m = state.model = await (await fetch("/api/model")).json();
  $("model-info").textContent = `${m.checkpoint}: ${m.n_layer} layers × ${m.n_head} heads × ${m.n_embd} wide, ` +
    `block_size ${m.block_size}, ${m.vocab_size} tokens (${m.tokenizer}), on ${m.device} in ${m.dtype}`;
  for (const key of SETTINGS) $(key).value = m.defaults[key] ?? "";
  $("prompt").value = m.example;
  $("prompt").addEventListener("input", () => { state.position = null; later(); });
  for (const key of ["temperature", "top_k", "top_p"]) $(key).addEventListener("input", later);
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
  $("query").addEventListener("input", drawHeadRow);
  $("head-canvas").addEventListener("mousemove", readHeadCell);
  $("head-canvas").addEventListener("click", chooseQuery);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => finishGenerating("stopped"));
  if (m.snapshots.length) {  // a run with a timeline: every view can show the model at any snapshot
    $("step").replaceChildren(el("option", { value: "" }, "the checkpoint"),
      ...m.snapshots.map((s) => el("option", { value: s.step }, `step ${s.step}`)));
    $("step").addEventListener("change", () => chooseStep($("step").value));
    $("step-box").hidden = $("training-tab").hidden = false;
    $("curves").addEventListener("click", (event) => { const s = snapshotAt(event); if (s) chooseStep(s.step); });
    $("curves").addEventListener("mousemove", readCurves);
    $("head-metric").addEventListener("change", drawHeadsTable);
  }
  showView("tokens");
  analyse();
}

function showView(name) {
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === `view-${name}`));
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
  if (name === "training" && !state.training) loadTraining();
}

// typing asks once the keys pause, not once per key
function later() {
  document.body.dataset.pending = "1";
  clearTimeout(state.timer);
  state.timer = setTimeout(analyse, 150);
}

// a POST of fields as JSON; a body larger than the server reads (it says its limit) is refused here, in words
function post(url, body, signal) {
  const json = JSON.stringify(body);
  const size = new Blob([json]).size;
  if (state.model && size > state.model.body_limit) {
    return Promise.resolve(new Response(JSON.stringify({
      error: `the prompt is too long for the lens: the request would be ${size} bytes, and it reads at most ` +
        `${state.model.body_limit}`,
    }), { status: 413, headers: { "Content-Type": "application/json" } }));
  }
  return fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: json, signal });
}

// the error of an answer that is not ok: its JSON's words, or its status
async function errorOf(response) {
  try {
    return (await response.json()).error || `the lens answered ${response.status}`;
  } catch {
    return `the lens answered ${response.status}`;
  }
}

async function analyse() {
  document.body.dataset.pending = "1";
  const asked = ++state.asked;
  let answer = null, error = null;
  try {
    const response = await post("/api/analyze", { ...fields(), position: state.position ?? "" });
    if (response.ok) answer = await response.json();
    else error = await errorOf(response);
  } catch {
    error = "the lens server stopped answering";
  }
  if (asked !== state.asked) return;  // a newer question is on its way
  state.answer = answer;
  say(error);
  $("note").hidden = !(answer && answer.note);
  $("note").textContent = (answer && answer.note) || "";
  if (state.answer) {
    state.position = answer.position;
    drawTokens(); drawNext(); drawAttention(); drawStack();
  } else {
    for (const id of ["tokens", "next-bars", "heads", "stack", "stack-detail"]) $(id).replaceChildren();
    for (const id of ["next-title", "next-summary", "stack-title"]) $(id).textContent = "";
    $("head-detail").hidden = true;
  }
  delete document.body.dataset.pending;
}

function choosePosition(i) {
  state.position = i;
  analyse();
}

// ---- Tokens ----------------------------------------------------------------------------------

function drawTokens() {
  const tokens = state.answer.tokens;
  const bpe = state.model.tokenizer !== "char";
  $("tokens").replaceChildren(...tokens.map((t, i) => {
    // a BPE token that goes on with the letters of the one before: the tokenizer cut a word here
    const cont = bpe && i > 0 && /[\p{L}\p{N}]$/u.test(tokens[i - 1].text) && /^[\p{L}\p{N}]/u.test(t.text);
    const chip = el("span", {
      className: `tok${cont ? " cont" : ""}${i === state.position ? " chosen" : ""}`,
      title: `position ${i}, id ${t.id}${cont ? ": the same word as the token before" : ""}`,
      dataset: { position: i, id: t.id },
    }, shown(t.text), el("small", {}, String(t.id)));
    chip.addEventListener("click", () => choosePosition(i));
    return chip;
  }));
}

// ---- Next token ------------------------------------------------------------------------------

function drawNext() {
  const { next, settings: s, tokens, position } = state.answer;
  $("next-title").textContent = `after position ${position} (“${shown(tokens[position].text)}”)`;
  const other = next.compare;  // lens.py --compare: a second model's probabilities, beside (orange)
  const scale = Math.max(...next.top.map((r) => Math.max(r.p, r.sampled, r.p_compare ?? 0)));
  const rows = next.top.map((r, rank) => el("tr", { dataset: { id: r.id, p: r.p, sampled: r.sampled,
    ...(other ? { pCompare: r.p_compare } : {}) } },
  el("td", {}, String(rank + 1)),
  el("td", { className: "mono" }, shown(r.text)),
  el("td", { className: "mono" }, `id ${r.id}`),
  el("td", {}, el("div", { className: `bar${other ? " three" : ""}` },
    el("span", { className: "model", style: `width: ${100 * r.p / scale}%` }),
    el("span", { className: "sampled", style: `width: ${100 * r.sampled / scale}%` }),
    ...(other ? [el("span", { className: "compare", style: `width: ${100 * r.p_compare / scale}%` })] : []))),
  el("td", {}, pct(r.p)),
  el("td", {}, pct(r.sampled)),
  ...(other ? [el("td", {}, pct(r.p_compare))] : [])));
  const names = ["", "token", "", "", "model", "sampled", ...(other ? ["compared"] : [])];
  $("next-bars").replaceChildren(el("tr", {}, ...names.map((h) => el("th", {}, h))), ...rows);
  $("next-summary").textContent =
    `temperature ${s.temperature}, top-k ${s.top_k ?? "off"}, top-p ${s.top_p ?? "off"}: ` +
    `${next.kept} of ${next.vocab_size} tokens can be drawn. The tokens not listed hold ${pct(next.rest)} ` +
    `of the model's probability and ${pct(next.rest_sampled)} after the settings.` + (other ? ` Compared ` +
    `(orange): ${other.path}, whose most likely token is “${shown(other.top.text)}” (${pct(other.top.p)}); ` +
    `KL(model ‖ compared) = ${other.kl.toFixed(5)} nats.` : "");
}

// ---- Attention -------------------------------------------------------------------------------

function drawAttention() {
  const { attention, attention_note: note } = state.answer;
  $("attention-note").hidden = !note;
  $("attention-note").textContent = note || "";
  $("heads").replaceChildren();
  $("head-detail").hidden = !attention || !state.head;
  if (!attention) return;
  $("heads").style.gridTemplateColumns = `auto repeat(${state.model.n_head}, 130px)`;
  attention.forEach((layer, l) => {
    $("heads").append(el("div", {}, `layer ${l + 1}`));
    layer.forEach((weights, h) => {
      const canvas = el("canvas");
      paint(canvas, weights, Math.max(1, Math.floor(120 / weights.length)), 0);
      const chosen = state.head && state.head.layer === l && state.head.head === h;
      const figure = el("figure", { className: chosen ? "chosen" : "", dataset: { layer: l, head: h } },
        canvas, el("figcaption", {}, `layer ${l + 1}, head ${h + 1}`));
      figure.addEventListener("click", () => chooseHead(l, h));
      $("heads").append(figure);
    });
  });
  if (state.head) drawHead();
}

// one pixel per (query, key): blue, deeper for more weight (square root: small weights stay visible), grey where
// the causal mask hides the key
function heatmap(weights) {
  const T = weights.length;
  const image = new ImageData(T, T);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      const shade = k > q ? null : Math.sqrt(weights[q][k]);
      const rgb = shade === null ? MASKED : BLUE.map((c) => Math.round(255 + (c - 255) * shade));  // blue over white
      image.data.set([...rgb, 255], 4 * (q * T + k));
    }
  }
  return image;
}

// the heatmap drawn with cells of `cell` pixels, leaving a margin at the top and left for labels
function paint(canvas, weights, cell, margin) {
  const T = weights.length;
  const pixels = el("canvas", { width: T, height: T });
  pixels.getContext("2d").putImageData(heatmap(weights), 0, 0);
  canvas.width = canvas.height = margin + T * cell;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(pixels, margin, margin, T * cell, T * cell);
}

function chooseHead(layer, head) {
  state.head = { layer, head };
  document.querySelectorAll("#heads figure").forEach((f) =>
    f.classList.toggle("chosen", +f.dataset.layer === layer && +f.dataset.head === head));
  $("query").value = state.position;
  drawHead();
}

function headGeometry() {
  const T = state.answer.tokens.length;
  const cell = Math.max(4, Math.floor(400 / T));
  return { T, cell, margin: cell >= 12 ? 30 : 0 };  // token labels on the axes when they fit
}

function drawHead() {
  const { layer, head } = state.head;
  const weights = state.answer.attention[layer][head];
  const { T, cell, margin } = headGeometry();
  const canvas = $("head-canvas");
  paint(canvas, weights, cell, margin);
  if (margin) {
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#374151";
    ctx.font = `${Math.min(12, cell - 2)}px monospace`;
    ctx.textAlign = "center";
    state.answer.tokens.forEach((t, i) => {
      const label = shown(t.text).slice(0, 2);
      ctx.fillText(label, margin + (i + 0.5) * cell, margin - 8);  // keys along the top
      ctx.fillText(label, margin / 2, margin + (i + 0.7) * cell);   // queries down the side
    });
  }
  $("head-title").textContent = `layer ${layer + 1}, head ${head + 1}: rows are queries, columns keys`;
  $("head-detail").hidden = false;
  $("query").max = T - 1;
  if (+$("query").value > T - 1) $("query").value = T - 1;
  drawHeadRow();
}

function cellAt(event) {
  const { T, cell, margin } = headGeometry();
  const k = Math.floor((event.offsetX - margin) / cell), q = Math.floor((event.offsetY - margin) / cell);
  return q >= 0 && q < T && k >= 0 && k < T ? { q, k } : null;
}

function readHeadCell(event) {
  const at = cellAt(event);
  if (!at) return;
  const { tokens, attention } = state.answer;
  const w = attention[state.head.layer][state.head.head][at.q][at.k];
  $("head-readout").textContent = `query ${at.q} “${shown(tokens[at.q].text)}” → key ${at.k} ` +
    `“${shown(tokens[at.k].text)}”: ${at.k > at.q ? "masked (0)" : w.toFixed(5)}`;
}

function chooseQuery(event) {
  const at = cellAt(event);
  if (!at) return;
  $("query").value = at.q;
  drawHeadRow();
}

// the weights one query gives every key: they sum to 1, and the keys after it get 0
function drawHeadRow() {
  if (!state.answer || !state.head || !state.answer.attention) return;
  const { tokens, attention } = state.answer;
  const q = Math.min(Math.max(0, Math.floor(+$("query").value || 0)), tokens.length - 1);
  const row = attention[state.head.layer][state.head.head][q];
  const head = el("tr", {}, el("th", {}, "key"), el("th", {}, "token"), el("th", {}, `weight from query ${q}`));
  const cells = row.map((w, k) => el("tr", { className: k > q ? "masked" : "", dataset: { key: k, w } },
    el("td", {}, String(k)), el("td", { className: "mono" }, shown(tokens[k].text)),
    el("td", {}, k > q ? "0 (masked)" : w.toFixed(5))));
  const sum = el("tr", {}, el("td"), el("td", {}, "sum"), el("td", {}, row.reduce((a, b) => a + b, 0).toFixed(5)));
  $("head-row").replaceChildren(head, ...cells, sum);
}

// ---- Inside the stack ------------------------------------------------------------------------

function drawStack() {
  const { stack, tokens, position } = state.answer;
  const biggest = Math.max(...stack.map((s) => mean(s.norm)));
  const head = el("tr", {}, el("th", {}, "stream after"), ...tokens.map((t, i) =>
    el("th", { className: i === position ? "chosen" : "" }, shown(t.text))));
  const rows = stack.map((stage) => el("tr", { dataset: { stage: stage.name } },
    el("th", { className: "layer", title: "the mean norm of the stream's vectors over the positions" },
      `${stage.name}  ‖x‖ ${mean(stage.norm).toFixed(1)}`,
      el("span", { className: "norm", style: `width: ${60 * mean(stage.norm) / biggest}px` })),
    ...stage.top.map((t, i) => el("td", {
      className: i === position ? "chosen" : "",
      style: `background: rgba(22, 163, 74, ${t.p})`,
      title: `after position ${i}: “${shown(t.text)}” ${pct(t.p)}; ‖x‖ = ${stage.norm[i]}`,
      dataset: { position: i, id: t.id, p: t.p },
    }, shown(t.text)))));
  $("stack").replaceChildren(head, ...rows);
  $("stack-title").textContent = `after position ${position} (“${shown(tokens[position].text)}”), layer by layer`;
  $("stack-detail").replaceChildren(
    el("tr", {}, ...["stream after", "‖x‖", "top predictions of the logit lens"].map((h) => el("th", {}, h))),
    ...stack.map((stage) => el("tr", {},
      el("td", {}, stage.name), el("td", {}, stage.norm[position].toFixed(2)),
      el("td", { className: "mono" }, stage.detail.map((t) => `“${shown(t.text)}” ${pct(t.p)}`).join("   ")))));
}

// ---- Generate --------------------------------------------------------------------------------

// the server's answer is a stream of server-sent events (token ..., then done or failure), read as it comes
// from a POST (a prompt need not fit in a URL, as it must for EventSource)
async function generate() {
  finishGenerating("");
  const asked = fields();
  const out = $("generated");
  out.replaceChildren(el("span", { className: "prompt" }, asked.prompt));
  delete out.dataset.text;
  $("generate-summary").textContent = "generating…";
  $("generate").disabled = true;
  $("stop").disabled = false;
  const stream = state.stream = new AbortController();
  const current = () => state.stream === stream;  // not stopped, nor replaced by a newer generation
  const handlers = {
    token(t) {
      out.append(el("span", {
        className: "gen", dataset: { id: t.id, p: t.p, pModel: t.p_model },
        title: `id ${t.id}: ${pct(t.p)} under the settings, ${pct(t.p_model)} under the model alone`,
      }, el("b", { style: `background: rgba(37, 99, 235, ${0.6 * t.p})` }, t.text.replace(/\n/g, "⏎")),
      el("small", {}, (100 * t.p).toFixed(0))));
      if (t.text.includes("\n")) out.append(el("br"));
    },
    done(done) {
      out.dataset.text = asked.prompt + done.text;
      finishGenerating(`${out.querySelectorAll(".gen").length} tokens (the small number under each: its ` +
        "probability in %). The same text from the command line:");
      $("generate-summary").append(el("code", {}, done.command));
    },
    failure(failure) {
      say(failure.error);
      const made = out.querySelectorAll(".gen").length;
      finishGenerating(made ? `${made} tokens, then the generation failed` : "nothing generated");
    },
  };
  try {
    const response = await post("/api/generate", asked, stream.signal);
    if (!response.ok) {
      const error = await errorOf(response);
      if (current()) handlers.failure({ error });
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    while (current()) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0 && current()) {
        const event = {};
        for (const line of buffer.slice(0, end).split("\n")) {
          const colon = line.indexOf(": ");
          if (colon > 0) event[line.slice(0, colon)] = line.slice(colon + 2);
        }
        buffer = buffer.slice(end + 2);
        if (handlers[event.event]) handlers[event.event](JSON.parse(event.data));
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return;  // stopped
  }
  if (current()) finishGenerating("the lens server stopped answering");
}

function finishGenerating(summary) {
  if (state.stream) state.stream.abort();
  state.stream = null;
  $("generate").disabled = false;
  $("stop").disabled = true;
  if (summary) $("generate-summary").textContent = summary;
}

// ---- Training: the replay of a run's timeline ------------------------------------------------

// body[data-training] is set while the curves or the heads' table are on their way (the tests wait on it)
async function loadTraining() {
  document.body.dataset.training = "loading";
  try {
    state.training = await (await fetch("/api/training")).json();
    drawCurves();
    drawStepButtons();
    const response = await fetch("/api/heads");
    if (response.ok) state.heads = await response.json();
    else say(await errorOf(response));
    drawHeadsTable();
  } catch {
    say("the lens server stopped answering");
  }
  delete document.body.dataset.training;
}

function chooseStep(step) {
  $("step").value = String(step);
  drawStepButtons();
  if (state.training) drawCurves();
  if (state.heads) drawHeadsTable();
  analyse();
}

function drawStepButtons() {
  const chosen = $("step").value;
  $("snapshot-steps").replaceChildren(...[{ step: "" }, ...state.model.snapshots].map((s) => {
    const b = el("button", { className: String(s.step) === chosen ? "chosen" : "", dataset: { step: s.step } },
      s.step === "" ? "checkpoint" : `step ${s.step}`);
    b.addEventListener("click", () => chooseStep(s.step));
    return b;
  }));
}

// the curves on a log(1 + step) axis: most of what a model learns happens in its first steps
function curveGeometry() {
  const t = state.training, canvas = $("curves");
  const steps = [...t.train.map((p) => p[0]), ...t.eval.map((p) => p[0]), ...t.snapshots.map((s) => s.step), 1];
  const losses = [...t.train.map((p) => p[1]), ...t.eval.map((p) => p[2]), ...t.snapshots.map((s) => s.loss)];
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const left = 48, right = canvas.width - 12, top = 12, bottom = canvas.height - 28;
  const xmax = Math.log1p(Math.max(...steps));
  return {
    x: (step) => left + (right - left) * Math.log1p(step) / xmax,
    y: (loss) => bottom - (bottom - top) * (loss - lo) / ((hi - lo) || 1),
    left, right, top, bottom, lo, hi, xmax,
  };
}

function drawCurves() {
  const t = state.training, canvas = $("curves"), ctx = canvas.getContext("2d"), g = curveGeometry();
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui";
  ctx.fillStyle = "#6b7280";
  for (const step of [0, 1, 10, 100, 1000, 10000, 100000]) {
    if (Math.log1p(step) > g.xmax) break;
    ctx.fillText(String(step), g.x(step) - 4, g.bottom + 14);
  }
  for (const loss of [g.lo, (g.lo + g.hi) / 2, g.hi]) ctx.fillText(loss.toFixed(2), 4, g.y(loss) + 4);
  ctx.fillText("step (log scale)", g.right - 80, g.bottom + 26);
  if (t.band) {  // the recipe's reference band (machinery/bands.py): the range of its reference runs, step by step
    const { steps, lo, hi } = t.band.train;
    ctx.fillStyle = "rgba(16, 185, 129, 0.18)";
    ctx.beginPath();
    steps.forEach((step, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, g.x(step), g.y(Math.min(hi[i], g.hi))));
    for (let i = steps.length - 1; i >= 0; i--) ctx.lineTo(g.x(steps[i]), g.y(Math.max(lo[i], g.lo)));
    ctx.fill();
    ctx.strokeStyle = "rgba(16, 185, 129, 0.9)";  // each eval's val-loss range: a short vertical bar
    t.band.eval.steps.forEach((step, i) => {
      ctx.beginPath();
      ctx.moveTo(g.x(step), g.y(t.band.eval.val_loss.lo[i]));
      ctx.lineTo(g.x(step), g.y(t.band.eval.val_loss.hi[i]));
      ctx.stroke();
    });
  }
  ctx.strokeStyle = "#9ca3af";
  ctx.beginPath();
  t.train.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, g.x(p[0]), g.y(p[1])));
  ctx.stroke();
  const dot = (x, y, r, ring) => {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx[ring ? "stroke" : "fill"]();
  };
  ctx.fillStyle = "#ea580c";
  for (const p of t.eval) dot(g.x(p[0]), g.y(p[2]), 4);
  const chosen = $("step").value;
  for (const s of t.snapshots) {
    ctx.fillStyle = "#2563eb";
    dot(g.x(s.step), g.y(s.loss), 3.5);
    if (String(s.step) === chosen) {
      ctx.strokeStyle = "#dc2626";
      ctx.lineWidth = 2;
      dot(g.x(s.step), g.y(s.loss), 7, true);
      ctx.lineWidth = 1;
    }
  }
}

function snapshotAt(event) {
  const g = curveGeometry();
  const scale = $("curves").width / $("curves").clientWidth;  // the canvas may be drawn narrower than it is
  const x = event.offsetX * scale;
  const nearest = state.training.snapshots.reduce((a, b) => (Math.abs(g.x(b.step) - x) < Math.abs(g.x(a.step) - x)
    ? b : a));
  return Math.abs(g.x(nearest.step) - x) < 12 ? nearest : null;
}

function readCurves(event) {
  const s = state.training && snapshotAt(event);
  $("curves-readout").textContent = s ? `snapshot at step ${s.step}: lr ${s.lr.toExponential(2)}, loss ` +
    `${s.loss.toFixed(4)} on its own batch (click to see the model as it was)` : "";
}

function drawHeadsTable() {
  const report = state.heads;
  if (!report) return;
  const metric = $("head-metric").value;
  $("heads-note").textContent = report.sample;
  const columns = report.snapshots;
  const values = columns.flatMap((c) => c.heads.flat().map((h) => h[metric])).filter((v) => v !== null);
  const most = Math.max(1e-9, ...values.map(Math.abs));
  const chosen = $("step").value;
  const header = el("tr", {}, el("th", {}, "head"), ...columns.map((c) => el("th", {
    className: String(c.step ?? "") === chosen ? "chosen" : "" }, c.step === null ? "ckpt" : String(c.step))));
  const rows = [];
  for (let l = 0; l < report.n_layer; l++) {
    for (let h = 0; h < report.n_head; h++) {
      const isChosen = state.stripHead && state.stripHead.layer === l && state.stripHead.head === h;
      const row = el("tr", { className: isChosen ? "chosen" : "", dataset: { layer: l, head: h } },
        el("th", {}, `layer ${l + 1}, head ${h + 1}`), ...columns.map((c) => {
          const v = c.heads[l][h][metric];
          const shade = v === null ? 0 : Math.abs(v) / (metric === "knockout" ? most : 1);
          const color = metric === "knockout" && v < 0 ? "22, 163, 74" : metric === "knockout" ? "220, 38, 38" : BLUE;
          return el("td", { style: `background: rgba(${color}, ${0.7 * shade})`,
            dataset: { step: c.step ?? "", value: v ?? "" } },
          v === null ? "–" : v.toFixed(metric === "knockout" ? 3 : 2));
        }));
      row.addEventListener("click", () => drawStrip(l, h));
      rows.push(row);
    }
  }
  $("heads-table").replaceChildren(header, ...rows);
}

// one head's attention to the prompt at every snapshot, side by side
async function drawStrip(layer, head) {
  state.stripHead = { layer, head };
  drawHeadsTable();
  document.body.dataset.training = "loading";
  const response = await post("/api/strip", { prompt: $("prompt").value, layer, head });
  if (response.ok) {
    const strip = await response.json();
    $("strip-title").textContent = `layer ${layer + 1}, head ${head + 1}: its attention to the prompt, step by step`;
    $("strip").replaceChildren(...strip.maps.map((weights, i) => {
      const canvas = el("canvas");
      paint(canvas, weights, Math.max(1, Math.floor(96 / weights.length)), 0);
      return el("figure", { dataset: { step: strip.steps[i] } }, canvas,
        el("figcaption", {}, `step ${strip.steps[i]}`));
    }));
    say("");
  } else {
    say(await errorOf(response));
  }
  delete document.body.dataset.training;
}

start().then(() => { window.lensReady = true; });
