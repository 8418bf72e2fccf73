// The playground of `minigpt serve`: a completion streamed from this server's own /v1/completions with
// `logprobs` on, each token shaded by its probability; a selected token shows what else the model considered
// (its top_logprobs) and what it attended to (/v1/attention). Nothing here talks to another host.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP = 5;  // the most logprobs the API gives: the page asks for all of them
let model = null;  // the served model's card from /v1/models
let controller = null;  // aborts the running stream (Stop)
let run = null;  // the latest generation: its context and the tokens written so far

// ---------------------------------------------------------------------------------------------------------------
// Talking to the server

function headers() {
  const key = $("api_key").value;
  return key ? {"Content-Type": "application/json", "Authorization": "Bearer " + key}
             : {"Content-Type": "application/json"};
}

async function errorMessage(response) {
  if (response.status === 401) $("key-row").hidden = false;  // the server wants --api-key's key
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  const response = await fetch("/v1/models", {headers: headers()});
  if (!response.ok) {
    showError(await errorMessage(response));
    return false;
  }
  model = (await response.json()).data[0];
  $("model").textContent = `${model.id} · reads the last ${model.max_model_len} characters`;
  return true;
}

function requestBody() {
  const body = {model: model.id, prompt: $("prompt").value, stream: true, logprobs: TOP,
                max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value)};
  for (const name of ["top_k", "top_p", "seed", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  if ($("guided_regex").value !== "") body.guided_regex = $("guided_regex").value;
  return body;
}

// ---------------------------------------------------------------------------------------------------------------
// Generating

async function generate() {
  showError("");
  setRunning(true);  // at once: a click is answered before anything is fetched
  try {
    if (model || (await loadModel())) await stream(requestBody());
  } finally {
    setRunning(false);
    showLive();
  }
}

async function stream(body) {
  // The server reads an empty prompt as a newline: so does the attention view.
  run = {context: body.prompt || "\n", pieces: [], started: performance.now()};
  $("text").replaceChildren(document.createTextNode(body.prompt));
  $("details").hidden = true;
  controller = new AbortController();
  const poll = setInterval(showLive, 500);
  try {
    const response = await fetch("/v1/completions", {method: "POST", headers: headers(),
                                                     body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) showError(await errorMessage(response));
    else await readEvents(response.body);
  } catch (error) {
    if (error.name !== "AbortError") showError(String(error));
  } finally {
    clearInterval(poll);
  }
}

async function readEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();  // an event cut in two by the read waits for its end
    for (const event of events) {
      if (!event.startsWith("data: {")) continue;  // data: [DONE]
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) showError(chunk.error.message);
      for (const choice of chunk.choices || []) addTokens(choice.text, choice.logprobs);
    }
  }
}

function addTokens(text, scores) {
  if (!scores) return;
  // A token's text runs from its offset to the next one's (a character model's: one character; a subword's
  // may be several, or none while a character's bytes are still arriving). A chunk ends where a token does.
  // Offsets count characters (code points), not JavaScript's UTF-16 units.
  const chars = Array.from(text);
  const offsets = scores.text_offset.map((offset) => offset - scores.text_offset[0]).concat([chars.length]);
  scores.tokens.forEach((name, i) => {
    const char = chars.slice(offsets[i], offsets[i + 1]).join("");
    const piece = {char, name, logprob: scores.token_logprobs[i], top: scores.top_logprobs[i]};
    const span = document.createElement("span");
    // A newline has no width of its own: it gets a visible mark (CSS, not text) so that it can be clicked.
    span.className = char === "\n" ? "char newline" : "char";
    span.textContent = char;
    span.dataset.index = run.pieces.length;
    span.dataset.probability = Math.exp(piece.logprob);
    span.style.backgroundColor = shade(Math.exp(piece.logprob));
    span.title = percent(Math.exp(piece.logprob));
    span.addEventListener("click", () => select(Number(span.dataset.index)));
    run.pieces.push(piece);
    if (char) $("text").append(span);  // a token with no text of its own yet: its odds stay in run.pieces
  });
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

async function showLive() {
  if (!run) return;
  const seconds = (performance.now() - run.started) / 1000;
  const rate = `${run.pieces.length} tokens, ${(run.pieces.length / seconds).toFixed(0)}/s`;
  try {
    const metrics = await (await fetch("/metrics")).text();
    const value = (name) => Number((metrics.match(new RegExp(`^${name} (\\S+)$`, "m")) || [0, NaN])[1]);
    $("live").textContent = `${rate} · server: ${value("minigpt_rows_in_use")} rows in the batch, ` +
                            `${value("minigpt_queue_depth")} requests waiting`;
  } catch {
    $("live").textContent = rate;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One character: its alternatives and its attention

function select(index) {
  document.querySelectorAll(".char.selected").forEach((span) => span.classList.remove("selected"));
  document.querySelector(`.char[data-index="${index}"]`).classList.add("selected");
  const piece = run.pieces[index];
  $("details").hidden = false;
  $("chosen").textContent = visible(piece.char);
  showAlternatives(piece);
  const before = run.context + run.pieces.slice(0, index).map((p) => p.char).join("");
  showAttention(before);
}

function showAlternatives(piece) {
  const ranked = Object.entries(piece.top).sort((a, b) => b[1] - a[1]);
  const rank = ranked.findIndex(([name]) => name === piece.name);
  const p = percent(Math.exp(piece.logprob));
  $("verdict").textContent = rank === 0
    ? `The likeliest token (${p}): greedy decoding writes it too.`
    : `Ranked ${rank < 0 ? `below the top ${TOP}` : rank + 1} (${p}): sampling (temperature, top-k, top-p) ` +
      `picked it where greedy decoding would write ${visible(ranked[0][0])}.`;
  const rows = ranked.map(([name, logprob]) => row(visible(name), Math.exp(logprob), name === piece.name));
  const shown = ranked.reduce((sum, [, logprob]) => sum + Math.exp(logprob), 0);
  rows.push(row("all others", Math.max(0, 1 - shown), false));
  $("alternatives").replaceChildren(...rows);
}

function row(label, probability, sampled) {
  const tr = document.createElement("tr");
  tr.className = sampled ? "sampled" : "";
  tr.dataset.probability = probability;
  const bar = `<span class="bar" style="width:${(120 * probability).toFixed(1)}px"></span>`;
  tr.innerHTML = `<td></td><td>${percent(probability)}</td><td>${bar}</td>`;
  tr.firstChild.textContent = label + (sampled ? " (written)" : "");
  return tr;
}

async function showAttention(text) {
  $("attention-note").textContent = "";
  $("attention").replaceChildren();
  const response = await fetch("/v1/attention", {method: "POST", headers: headers(),
                                                 body: JSON.stringify({model: model.id, prompt: text})});
  if (!response.ok) {
    $("attention-note").textContent = await errorMessage(response);
    return;
  }
  const {tokens, weights} = await response.json();
  $("attention-note").textContent = `Where the model looked when it wrote this character: the last of the ` +
    `${tokens.length} characters it read, attending to each (one row per layer and head; darker = more).`;
  $("attention").append(heatmap(tokens, weights));
}

function heatmap(tokens, weights) {
  const table = document.createElement("table");
  const head = table.insertRow();
  head.insertCell().textContent = "";
  for (const char of tokens) {
    const th = document.createElement("th");
    th.textContent = visible(char);
    head.append(th);
  }
  weights.forEach((heads, layer) => heads.forEach((row, headIndex) => {
    const tr = table.insertRow();
    tr.className = "head";
    tr.insertCell().textContent = `layer ${layer} head ${headIndex}`;
    row.forEach((weight, position) => {
      const cell = tr.insertCell();
      cell.dataset.weight = weight;
      cell.style.backgroundColor = `rgba(21, 101, 192, ${Math.min(1, weight * 1.5).toFixed(3)})`;
      cell.title = `${visible(tokens[position])}: ${percent(weight)}`;
    });
  }));
  return table;
}

// ---------------------------------------------------------------------------------------------------------------
// Small helpers

function shade(probability) {  // sure characters stay white; unsure ones turn orange
  return `rgba(255, 143, 0, ${(0.75 * (1 - probability)).toFixed(3)})`;
}

function percent(probability) {
  return `${(100 * probability).toFixed(probability < 0.001 ? 3 : 1)}%`;
}

function visible(text) {  // whitespace drawn as minigpt attention draws it
  return text.replace(/[ \n\t]/g, (space) => ({" ": "␣", "\n": "↵", "\t": "⇥"})[space]);
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
});
loadModel();
