// The nnobfuscator web page: paste a key, send an image (or a prompt), see the answer and its tier.
// A text-generation model gets a prompt box whose answer streams in as it is decoded.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: "", owner: false, task: "classification" };
const ENDPOINTS = { classification: "/v1/classify", segmentation: "/v1/segment" };
const PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
  [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]];

function isTextToImage(task) { return ["text-to-image", "text_to_image", "text2image"].includes(task); }
function isText(task) { return task === "text-generation"; }
function takesPrompt(task) { return isTextToImage(task) || isText(task); }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function call(path, options = {}) {
  const headers = Object.assign({ "X-API-Key": state.key }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const wait = response.headers.get("Retry-After");
    throw new Error(`${response.status}: ${body.detail || body.error}` + (wait ? ` (retry in ${wait} s)` : ""));
  }
  return { body, tier: response.headers.get("X-Tier") };
}

async function loadModelInfo() {
  const info = await (await fetch("/v1/tiers")).json();
  state.task = info.task;
  const tiers = info.tiers.map((t) => `${t.name} (${t.target})`).join(" → ");
  $("model-info").textContent = `${info.model} · ${info.task} · tiers: ${tiers}`;
  const prompt = takesPrompt(info.task);
  $("prompt-input").hidden = !prompt;
  $("image-input").hidden = prompt;
  if (isText(info.task)) {
    $("prompt").placeholder = "Ask the model something";
    $("prompt").rows = 4;
    $("run").textContent = "Send";
  }
  updateButtons();
}

function hasInput() {
  return takesPrompt(state.task) ? $("prompt").value.trim() !== "" : $("file").files.length > 0;
}

function updateButtons() {
  $("run").disabled = !state.key || !hasInput();
  $("compare").hidden = !state.owner || isText(state.task);
  $("compare").disabled = !state.key || !hasInput();
}

async function useKey(event) {
  event.preventDefault();
  state.key = $("key").value.trim();
  state.owner = false;
  showError("");
  try {
    const { body } = await call("/v1/key");
    state.owner = body.owner;
    $("key-status").textContent = `Key ${body.name || body.id}: tier ${body.tier}` +
      (body.owner ? " (owner: you can compare all tiers)" : "");
  } catch (err) {
    state.key = "";
    $("key-status").textContent = "No valid key yet.";
    showError(err.message);
  }
  updateButtons();
}

function request() {
  if (isTextToImage(state.task)) {
    return { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("prompt").value }) };
  }
  const form = new FormData();
  form.append("image", $("file").files[0]);
  return { method: "POST", body: form };
}

function renderClassification(result) {
  const box = document.createElement("div");
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = result.label;
  box.append(label);
  for (const entry of result.top_k) {
    if (entry.score === undefined) continue; // a label-only tier: the label above is all
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    name.textContent = entry.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * entry.score).toFixed(1)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.textContent = `${(100 * entry.score).toFixed(1)}%`;
    row.append(name, track, score);
    box.append(row);
  }
  return box;
}

function renderSegmentation(result) {
  const canvas = document.createElement("canvas");
  const image = new Image();
  image.onload = () => {
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, image.width, image.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const colour = PALETTE[pixels.data[i] % PALETTE.length];
      pixels.data.set(colour, i);
      pixels.data[i + 3] = 255;
    }
    context.putImageData(pixels, 0, 0);
  };
  image.src = `data:image/png;base64,${result.mask}`;
  const box = document.createElement("div");
  const classes = document.createElement("p");
  classes.textContent = `classes: ${result.labels.join(", ")}`;
  box.append(canvas, classes);
  return box;
}

function renderGeneration(result) {
  const image = document.createElement("img");
  image.src = `data:image/png;base64,${result.image}`;
  image.alt = result.prompt;
  return image;
}

function render(result) {
  if (isTextToImage(state.task)) return renderGeneration(result);
  return state.task === "segmentation" ? renderSegmentation(result) : renderClassification(result);
}

// Stream a completion: server-sent events read from the response body, each chunk's text appended.
async function stream(path, body, pick) {
  const response = await fetch(path, { method: "POST", body: JSON.stringify({ ...body, stream: true }),
    headers: { "X-API-Key": state.key, "Content-Type": "application/json" } });
  if (!response.ok) {
    const error = await response.json().catch(() => ({ detail: response.statusText }));
    const wait = response.headers.get("Retry-After");
    const failure = new Error(`${response.status}: ${error.detail}` + (wait ? ` (retry in ${wait} s)` : ""));
    failure.code = error.error && error.error.code;
    throw failure;
  }
  const answer = document.createElement("p");
  answer.className = "answer";
  $("result-tier").textContent = response.headers.get("X-Tier");
  $("result").replaceChildren(answer);
  $("result-card").hidden = false;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") { answer.dataset.done = "true"; return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.choices.length) answer.textContent += pick(chunk.choices[0]) || "";
    }
  }
}

async function converse() {
  const text = $("prompt").value;
  try {
    await stream("/v1/chat/completions", { messages: [{ role: "user", content: text }] },
      (choice) => choice.delta.content);
  } catch (err) {
    if (err.code !== "no_chat_template") throw err;
    await stream("/v1/completions", { prompt: text }, (choice) => choice.text);
  }
}

async function run() {
  showError("");
  if (isText(state.task)) {
    try { await converse(); } catch (err) { showError(err.message); }
    return;
  }
  const path = isTextToImage(state.task) ? "/v1/generate" : ENDPOINTS[state.task];
  try {
    const { body, tier } = await call(path, request());
    $("result-tier").textContent = tier;
    $("result").replaceChildren(render(body));
    $("result-card").hidden = false;
  } catch (err) {
    showError(err.message);
  }
}

async function compare() {
  showError("");
  try {
    const { body } = await call("/v1/compare?top_k=3", request());
    const cards = body.results.map((result) => {
      const card = document.createElement("div");
      card.className = "tier-result";
      card.dataset.tier = result.tier;
      const title = document.createElement("h3");
      title.textContent = result.tier;
      card.append(title, render(result));
      return card;
    });
    $("compare-results").replaceChildren(...cards);
    $("compare-card").hidden = false;
  } catch (err) {
    showError(err.message);
  }
}

function preview() {
  const file = $("file").files[0];
  if (file) {
    $("preview").src = URL.createObjectURL(file);
    $("preview").hidden = false;
  }
  updateButtons();
}

$("key-form").addEventListener("submit", useKey);
$("file").addEventListener("change", preview);
$("prompt").addEventListener("input", updateButtons);
$("run").addEventListener("click", run);
$("compare").addEventListener("click", compare);
loadModelInfo().catch((err) => showError(`cannot reach the server: ${err.message}`));
