// The nnobfuscator owner page: paste an owner key, see traffic per tier, downgrades, the
// brownout state, the policy in force and every key (stubs only), refreshed every 5 s.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const STORAGE = "nnobf-owner-key"; // sessionStorage only: gone when the tab closes
const REFRESH_MS = 5000;
const OWNER_HINT = "this page needs an owner key: nnobf keys create --owner";
const COLOURS = ["#3056d3", "#e07a10", "#0e9f6e", "#9e36c9", "#d92d20", "#0891b2", "#7a5c00"];
const DOWNGRADES = ["quota", "load", "schedule"];
const SIGNALS = {
  queue_wait_p95_ms: ["queue wait p95", "ms"],
  batch_p95_ms: ["batch time p95", "ms"],
  queue_depth: ["queue depth", "requests"],
};
const state = { key: "", tiers: [], timer: null, busy: false };

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- small helpers -------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(epochS) { return new Date(epochS * 1000).toISOString().slice(11, 16); }
function stamp(epochS) { return new Date(epochS * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC"; }
function num(value) { return Number.isInteger(value) ? String(value) : value.toFixed(value < 10 ? 2 : 1); }
function sum(values) { return (values || []).reduce((a, b) => a + b, 0); }
function colour(tier) {
  const index = state.tiers.indexOf(tier);
  return COLOURS[(index < 0 ? state.tiers.length : index) % COLOURS.length];
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Every tier, lowest first: the model's tiers, then any other name the data mentions.
function knownTiers(data) {
  const names = [...state.tiers];
  const add = (tier) => { if (tier && !names.includes(tier)) names.push(tier); };
  Object.keys(data.history.tiers).forEach(add);
  data.keys.forEach((key) => { add(key.tier); Object.keys(key.requests_7d || {}).forEach(add); });
  return names;
}

// --- data ----------------------------------------------------------------------------------
async function call(path) {
  let response;
  try {
    response = await fetch(path, { headers: { "X-API-Key": state.key }, cache: "no-store" });
  } catch (err) {
    throw new HttpError(0, `cannot reach the server (${err.message})`);
  }
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    let message = `${response.status}: ${body.detail || body.error || response.statusText}`;
    if (response.status === 401 || response.status === 403) message += ` — ${OWNER_HINT}`;
    throw new HttpError(response.status, message);
  }
  return body;
}

async function loadTiers() {
  try {
    const info = await (await fetch("/v1/tiers")).json();
    state.tiers = info.tiers.map((t) => t.name);
    $("model-info").textContent = `${info.model} · ${info.task} · tiers: ${state.tiers.join(" → ")}`;
  } catch (err) {
    state.tiers = [];
  }
}

async function refresh() {
  if (!state.key || state.busy) return;
  state.busy = true;
  try {
    const data = await call(`/v1/owner/stats?minutes=${$("range").value}`);
    render(data);
    showError("");
    $("dashboard").hidden = false;
    $("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      forget(false);
      $("key-status").textContent = "No owner key yet.";
    } else if (err.status === 0 && $("auto-refresh").checked) {
      err.message += "; retrying every 5 s";
    }
    showError(err.message);
  } finally {
    state.busy = false;
  }
}

function schedule() {
  clearInterval(state.timer);
  state.timer = null;
  if (state.key && $("auto-refresh").checked) state.timer = setInterval(refresh, REFRESH_MS);
}

function useKey(event) {
  event.preventDefault();
  state.key = $("owner-key").value.trim();
  $("owner-key").value = "";
  sessionStorage.setItem(STORAGE, state.key);
  $("key-status").textContent = "Key kept for this tab only.";
  refresh();
  schedule();
}

function forget(clearError = true) {
  state.key = "";
  sessionStorage.removeItem(STORAGE);
  $("dashboard").hidden = true;
  $("key-status").textContent = "Key forgotten.";
  if (clearError) showError("");
  schedule();
}

// --- rendering -----------------------------------------------------------------------------
function render(data) {
  const tiers = knownTiers(data);
  renderChart(data.history, tiers);
  renderTotals(data.history, tiers);
  renderBrownout(data.status);
  renderLoad(data.status);
  renderPolicy(data.status, tiers);
  renderKeys(data.keys, tiers);
}

function downgradesOf(counters, length) {
  const out = new Array(length).fill(0);
  for (const reason of DOWNGRADES) (counters[reason] || []).forEach((v, i) => { out[i] += v; });
  return out;
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
  for (const factor of [1, 2, 5, 10]) if (factor * power >= raw) return Math.max(1, factor * power);
  return 10 * power;
}

function renderChart(history, tiers) {
  const length = Number($("range").value);
  const W = 900, H = 280, left = 56, right = 16, top = 14, bottom = 46;
  const plotW = W - left - right, plotH = H - top - bottom;
  const series = [];
  for (const tier of tiers) {
    const counters = history.tiers[tier] || {};
    const requests = counters.requests || new Array(length).fill(0);
    const downgrades = downgradesOf(counters, requests.length);
    if (sum(requests) > 0) series.push({ tier, kind: "requests", values: requests });
    if (sum(downgrades) > 0) series.push({ tier, kind: "downgrades", values: downgrades });
  }
  const n = Math.max(length, ...series.map((s) => s.values.length));
  const peak = Math.max(1, ...series.map((s) => Math.max(...s.values)));
  const step = niceStep(peak / 4);
  const yMax = Math.ceil(peak / step) * step;
  const x = (i) => left + (n === 1 ? plotW / 2 : (i * plotW) / (n - 1));
  const y = (v) => top + plotH - (v * plotH) / yMax;

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "requests per tier per minute" });
  const grid = svg("g", { class: "axis" });
  for (let v = 0; v <= yMax; v += step) {
    grid.append(svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: v ? "grid" : "base" }));
    grid.append(svg("text", { x: left - 8, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  const startMinute = Math.round(history.start / 60);
  const tick = [5, 10, 15, 30, 60, 120, 180].find((t) => n / t <= 7) || 240;
  for (let i = 0; i < n; i += 1) {
    if ((startMinute + i) % tick !== 0) continue;
    grid.append(svg("line", { x1: x(i), x2: x(i), y1: top + plotH, y2: top + plotH + 5, class: "base" }));
    grid.append(svg("text", { x: x(i), y: top + plotH + 19, "text-anchor": "middle" },
      clock((startMinute + i) * 60)));
  }
  grid.append(svg("text", { x: left + plotW / 2, y: H - 6, "text-anchor": "middle", class: "title" },
    "time (UTC, HH:MM)"));
  grid.append(svg("text", { x: 14, y: top + plotH / 2, "text-anchor": "middle", class: "title",
    transform: `rotate(-90 14 ${top + plotH / 2})` }, "requests / min"));
  root.append(grid);

  for (const s of series) {
    const points = s.values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)} ${y(v).toFixed(1)}`);
    const dashed = s.kind === "downgrades";
    root.append(svg("path", { d: points.join(""), class: `series ${s.kind}`, "data-tier": s.tier,
      stroke: colour(s.tier), "stroke-dasharray": dashed ? "6 4" : "none" }));
    const marks = s.values.filter((v) => v > 0).length;
    if (marks > 24) continue; // dots only for sparse series, where a lone minute needs one
    s.values.forEach((v, i) => {
      if (v <= 0) return;
      const dot = svg("circle", { cx: x(i), cy: y(v), r: dashed ? 3.5 : 3, class: `dot ${s.kind}`,
        stroke: colour(s.tier), fill: dashed ? "#fff" : colour(s.tier) });
      const what = dashed ? "moved down to" : "served at";
      dot.append(svg("title", {}, `${clock((startMinute + i) * 60)} UTC: ${v} ${what} ${s.tier}`));
      root.append(dot);
    });
  }
  if (!series.length) {
    root.append(svg("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle",
      class: "empty" }, "no requests in this window"));
  }
  $("chart").replaceChildren(root);

  const items = series.map((s) => {
    const swatch = svg("svg", { width: 28, height: 10, "aria-hidden": "true" });
    swatch.append(svg("line", { x1: 1, x2: 27, y1: 5, y2: 5, stroke: colour(s.tier), "stroke-width": 2.5,
      "stroke-dasharray": s.kind === "downgrades" ? "6 4" : "none" }));
    const label = s.kind === "downgrades" ? `${s.tier} · moved down` : `${s.tier} · served`;
    return el("span", { className: "item", "data-tier": s.tier, "data-kind": s.kind }, swatch, label);
  });
  $("legend").replaceChildren(...items);
}

function renderTotals(history, tiers) {
  let downgrades = 0, refused = 0;
  const rows = tiers.map((tier) => {
    const c = history.tiers[tier] || {};
    const moved = DOWNGRADES.map((reason) => sum(c[reason]));
    const movedTotal = sum(moved);
    const refusals = [sum(c.refused_rate), sum(c.refused_quota)];
    downgrades += movedTotal;
    refused += sum(refusals);
    const cells = [sum(c.requests), ...moved, movedTotal, ...refusals].map((v) =>
      el("td", { className: v ? "num" : "num zero", text: String(v) }));
    const name = el("td", {}, el("span", { className: "swatch", style: `background:${colour(tier)}` }), tier);
    return el("tr", { "data-tier": tier }, name, ...cells);
  });
  $("totals").tBodies[0].replaceChildren(...rows);
  $("downgrades").textContent = String(downgrades);
  $("refused").textContent = String(refused);
}

function pair(term, value, id) {
  const dd = el("dd", id ? { id, text: value } : { text: value });
  return [el("dt", { text: term }), dd];
}

function renderBrownout(status) {
  const b = status.brownout;
  if (!b) {
    $("brownout").replaceChildren(el("p", { className: "muted", id: "brownout-state",
      text: "off (the policy has no brownout rule)" }));
  } else {
    const serve = ((status.policy || {}).brownout || {}).serve || {};
    const moves = Object.entries(serve).map(([from, to]) => `${from} → ${to}`).join(", ") || "nothing";
    const line = el("p", { className: "state-line" },
      el("span", { id: "brownout-state", className: `pill ${b.active ? "on" : "off"}`, text: b.active ? "on" : "off" }),
      ` ${b.signal} = ${num(b.value)}`);
    const facts = el("dl", { className: "pairs" },
      ...pair("turns on above", num(b.above), "brownout-above"),
      ...pair("turns off below", num(b.below), "brownout-below"),
      ...pair("while on, serves", moves),
      ...pair("since", b.since ? stamp(b.since) : "—", "brownout-since"),
      ...pair("changes", String(b.changes), "brownout-changes"));
    $("brownout").replaceChildren(line, gauge(b), facts);
  }
  const inForce = status.schedules_in_force || [];
  $("schedules").textContent = inForce.length ? inForce.join(", ") : "none";
  $("schedules").className = inForce.length ? "" : "muted";
}

// A bar from 0 to a little past `above`, with the value and both thresholds marked.
function gauge(b) {
  const W = 400, H = 34, span = Math.max(b.above * 1.25, b.value, 1);
  const x = (v) => 6 + (Math.min(v, span) * (W - 12)) / span;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "gauge", "aria-hidden": "true" });
  root.append(svg("rect", { x: 6, y: 6, width: W - 12, height: 8, rx: 4, class: "track" }));
  root.append(svg("rect", { x: 6, y: 6, width: Math.max(0, x(b.value) - 6), height: 8, rx: 4,
    class: b.active ? "fill on" : "fill" }));
  for (const [v, label] of [[b.below, "below"], [b.above, "above"]]) {
    root.append(svg("line", { x1: x(v), x2: x(v), y1: 2, y2: 18, class: "mark" }));
    root.append(svg("text", { x: x(v), y: 30, "text-anchor": "middle" }, `${label} ${num(v)}`));
  }
  return root;
}

function renderLoad(status) {
  const signal = status.brownout ? status.brownout.signal : null;
  const items = Object.entries(status.signals || {}).flatMap(([name, value]) => {
    const [label, unit] = SIGNALS[name] || [name, ""];
    const note = name === signal ? " (brownout signal)" : "";
    return pair(label + note, `${num(value)} ${unit}`.trim(), `signal-${name}`);
  });
  items.push(...pair("higher tiers batched first", status.priority ? "yes" : "no"));
  $("load").replaceChildren(...items);
}

// A key's rule overrides its tier's field by field: what it leaves out comes from the tier.
function limitText(value, inherit) { return value || (inherit ? "as its tier" : "no limit"); }
function exhaustedText(rule, inherit) {
  const e = rule.on_exhausted;
  if (e && typeof e === "object" && e.downgrade) return `serve ${e.downgrade}`;
  if (e === "reject") return "refuse (429)";
  if (inherit) return "as its tier";
  return rule.quota ? "refuse (429)" : "—";
}

function rulesTable(id, heading, rules, order, inherit = false) {
  const names = [...order.filter((n) => n in rules), ...Object.keys(rules).filter((n) => !order.includes(n))];
  const head = el("tr", {}, ...[heading, "rate", "quota", "once the quota is used up"].map((t) => el("th", { text: t })));
  const rows = names.map((name) => {
    const rule = rules[name] || {};
    return el("tr", { "data-name": name }, el("td", { text: name === "*" ? "* (other tiers)" : name }),
      el("td", { text: limitText(rule.rate, inherit) }), el("td", { text: limitText(rule.quota, inherit) }),
      el("td", { text: exhaustedText(rule, inherit) }));
  });
  return el("table", { id, className: "data" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function renderPolicy(status, tiers) {
  const policy = status.policy || {};
  const parts = [el("p", {}, "source: ", el("code", { id: "policy-source", text: status.source || "—" }))];
  const tierRules = policy.tiers || {};
  const rows = Object.keys(tierRules).length ? tierRules : null;
  parts.push(el("h3", { text: "Tier rules" }));
  parts.push(rows ? rulesTable("policy-tiers", "tier", rows, tiers)
    : el("p", { className: "muted", text: "no limits on any tier" }));
  if (Object.keys(policy.keys || {}).length) {
    parts.push(el("h3", { text: "Key overrides" }), rulesTable("policy-keys", "key", policy.keys, [], true));
  }
  parts.push(el("h3", { text: "Brownout" }));
  const b = policy.brownout;
  parts.push(el("p", { id: "policy-brownout", text: b
    ? `on when ${b.signal} is above ${num(b.above)}, off again below ${num(b.below)} ` +
      `(over ${num(b.window_s)} s); meanwhile serves ` +
      Object.entries(b.serve || {}).map(([f, t]) => `${f} → ${t}`).join(", ")
    : "no brownout rule" }));
  parts.push(el("h3", { text: "Schedules" }));
  const schedules = policy.schedules || [];
  if (schedules.length) {
    const head = el("tr", {}, ...["name", "days", "UTC window", "serves"].map((t) => el("th", { text: t })));
    const rows = schedules.map((s) => el("tr", {}, el("td", { text: s.name }),
      el("td", { text: (s.days || []).join(", ") }), el("td", { text: `${s.from}–${s.to}` }),
      el("td", { text: Object.entries(s.serve || {}).map(([f, t]) => `${f} → ${t}`).join(", ") })));
    parts.push(el("table", { id: "policy-schedules", className: "data" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  } else {
    parts.push(el("p", { className: "muted", text: "no schedules" }));
  }
  parts.push(el("p", { className: "muted small",
    text: `priority: ${policy.priority === false ? "off, first come first served" : "higher tiers are batched first under load"}` }));
  $("policy").replaceChildren(...parts);
}

function renderKeys(keys, tiers) {
  const head = el("tr", {}, ...["stub", "name", "tier", "status"].map((t) => el("th", { text: t })),
    ...tiers.map((t) => el("th", { className: "num", text: t })), el("th", { className: "num", text: "total" }));
  const rows = keys.map((key) => {
    const used = key.requests_7d || {};
    const tier = key.owner ? el("span", { className: "tier-badge", text: "owner" }) : (key.tier || "—");
    const counts = tiers.map((t) => el("td", { className: used[t] ? "num" : "num zero",
      "data-tier": t, text: String(used[t] || 0) }));
    return el("tr", { "data-stub": key.stub },
      el("td", {}, el("code", { text: key.stub })), el("td", { text: key.name || "—" }),
      el("td", {}, tier), el("td", {}, el("span", { className: `pill ${key.status}`, text: key.status })),
      ...counts, el("td", { className: "num total", text: String(sum(Object.values(used))) }));
  });
  $("keys").tHead.replaceChildren(head);
  $("keys").tBodies[0].replaceChildren(...rows);
}

// --- wiring --------------------------------------------------------------------------------
$("key-form").addEventListener("submit", useKey);
$("forget-key").addEventListener("click", () => forget());
$("range").addEventListener("change", refresh);
$("auto-refresh").addEventListener("change", () => { schedule(); if ($("auto-refresh").checked) refresh(); });
loadTiers().finally(() => {
  state.key = sessionStorage.getItem(STORAGE) || "";
  if (state.key) {
    $("key-status").textContent = "Using the key kept for this tab.";
    refresh();
    schedule();
  }
});
