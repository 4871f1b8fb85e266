// vggserve web page: upload an image to /v1/classify and show what the API returns.
// Plain browser JavaScript, no build step and no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file-input");
const dropZone = $("drop-zone");
const statusLine = $("status");
const errorBox = $("error");
const resultCard = $("result");
const preview = $("preview");
const canvas = $("heatmap");
const options = {
  scales: $("opt-scales"),
  mode: $("opt-mode"),
  flip: $("opt-flip"),
  heatmap: $("opt-heatmap"),
};

let currentFile = null;
let previewUrl = null;
let lastHeatmap = null;
let requestCounter = 0;

function setState(state, message) {
  document.body.dataset.state = state;
  statusLine.textContent = message || "";
}

function showError(title, detail) {
  errorBox.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  const text = document.createElement("span");
  text.className = "detail";
  text.textContent = detail;
  errorBox.append(strong, text);
  errorBox.hidden = false;
}

function percent(p) {
  return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";
}

// One <li> per class: stable classes (.label, .probability) and exact values in data-*.
function predictionList(items) {
  const list = document.createElement("ol");
  list.className = "predictions";
  for (const item of items) {
    const li = document.createElement("li");
    li.className = "prediction";
    li.dataset.index = item.index;
    li.dataset.probability = String(item.probability);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = item.label;
    label.title = `${item.label} (class ${item.index})`;
    const prob = document.createElement("span");
    prob.className = "probability";
    prob.textContent = percent(item.probability);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, item.probability)) * 100}%`;
    bar.append(fill);
    li.append(label, prob, bar);
    list.append(li);
  }
  return list;
}

// Inferno-like ramp: dark purple -> red -> yellow; low scores stay nearly transparent.
const RAMP = [
  [0.0, [20, 11, 52]],
  [0.35, [120, 28, 109]],
  [0.6, [212, 72, 66]],
  [0.8, [250, 151, 21]],
  [1.0, [252, 255, 164]],
];

function rampColor(t) {
  for (let i = 1; i < RAMP.length; i++) {
    const [t1, c1] = RAMP[i];
    const [t0, c0] = RAMP[i - 1];
    if (t <= t1) {
      const f = (t - t0) / (t1 - t0);
      return c0.map((v, k) => Math.round(v + f * (c1[k] - v)));
    }
  }
  return RAMP[RAMP.length - 1][1];
}

// The score map is a few cells a side: draw it at its own size and let CSS stretch it over
// the image (the browser interpolates smoothly).
function drawHeatmap(heatmap) {
  const { width, height, scores } = heatmap;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const flat = scores.flat();
  const lo = Math.min(...flat);
  const hi = Math.max(...flat);
  const span = hi - lo || 1;
  const pixels = ctx.createImageData(width, height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const t = (scores[y][x] - lo) / span;
      const [r, g, b] = rampColor(t);
      const o = 4 * (y * width + x);
      pixels.data[o] = r;
      pixels.data[o + 1] = g;
      pixels.data[o + 2] = b;
      pixels.data[o + 3] = Math.round(255 * (0.12 + 0.55 * t));
    }
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.drawn = "true";
  canvas.hidden = false;
  $("heatmap-caption").textContent =
    `Score map of “${heatmap.label}” at Q = ${heatmap.scale} (${width}×${height} cells; ` +
    `brighter = higher class score).`;
}

function clearHeatmap() {
  canvas.hidden = true;
  canvas.dataset.drawn = "false";
  $("heatmap-caption").textContent = "";
}

function addMeta(dl, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dl.append(dt, dd);
}

function showResult(body) {
  $("predictions").replaceWith(Object.assign(predictionList(body.predictions), { id: "predictions" }));
  const perModel = $("per-model");
  perModel.replaceChildren();
  for (const [name, items] of Object.entries(body.per_model)) {
    const block = document.createElement("section");
    block.className = "model";
    block.dataset.model = name;
    const title = document.createElement("h3");
    title.textContent = name;
    block.append(title, predictionList(items));
    perModel.append(block);
  }
  const meta = $("meta");
  meta.replaceChildren();
  const t = body.timing_ms;
  addMeta(meta, "image", `${body.image.width} × ${body.image.height}`);
  addMeta(meta, "scales Q", body.scales.join(", ") + (body.flip ? " (+ flips)" : ""));
  addMeta(meta, "models", body.models.join(" + ") + ` · ${body.mode}`);
  addMeta(
    meta,
    "time",
    `${t.total.toFixed(0)} ms (decode ${t.decode.toFixed(0)}, pre-process ` +
      `${t.preprocess.toFixed(0)}, inference ${t.inference.toFixed(0)})`,
  );
  lastHeatmap = body.heatmap || null;
  if (lastHeatmap) drawHeatmap(lastHeatmap);
  else clearHeatmap();
  resultCard.hidden = false;
}

function queryString() {
  const params = new URLSearchParams();
  params.set("top_k", "5");
  const scales = options.scales.value.replace(/\s+/g, "");
  if (scales) params.set("scales", scales);
  params.set("mode", options.mode.value);
  params.set("flip", options.flip.checked ? "true" : "false");
  params.set("heatmap", options.heatmap.checked ? "true" : "false");
  return params.toString();
}

async function classify(file) {
  const id = ++requestCounter;
  errorBox.hidden = true;
  setState("loading", `Classifying ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  let body;
  try {
    response = await fetch(`/v1/classify?${queryString()}`, { method: "POST", body: form });
    body = await response.json().catch(() => ({}));
  } catch (err) {
    if (id !== requestCounter) return;
    setState("error", "");
    showError("Could not reach the server", String(err));
    return;
  }
  if (id !== requestCounter) return; // a newer upload replaced this one
  if (!response.ok) {
    resultCard.hidden = true;
    setState("error", "");
    const hint = response.status === 429 ? ` Retry in ${response.headers.get("Retry-After") || "a few"} s.` : "";
    showError(`${file.name}: ${response.status} ${response.statusText}`, (body.detail || "unknown error") + hint);
    return;
  }
  showResult(body);
  setState("done", `${file.name}: ${body.predictions[0].label} (${percent(body.predictions[0].probability)})`);
}

function useFile(file) {
  if (!file) return;
  currentFile = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  preview.src = previewUrl;
  classify(file);
}

fileInput.addEventListener("change", () => useFile(fileInput.files[0]));

for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});
// A file dropped outside the zone would make the browser navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});

for (const control of Object.values(options)) {
  control.addEventListener("change", () => {
    if (currentFile) classify(currentFile);
  });
}

async function loadModels() {
  const info = $("models-info");
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    const names = body.models.map((m) => `${m.name} (${m.arch}, ${m.classes} classes, Q ≥ ${m.min_size})`);
    info.textContent = `Serving ${names.join(" + ")} on ${body.models[0].backend}; ` +
      `default scales Q = ${body.default_scales.join(", ")}.`;
    options.scales.placeholder = body.default_scales.join(",");
  } catch (err) {
    info.textContent = "Could not list the served models.";
  }
}

loadModels();
