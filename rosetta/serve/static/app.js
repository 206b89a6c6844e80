// Rosetta's page: search by text and/or an image, a sound or a video; zero-shot classification; uploads. Sounds and
// videos found play from their best-matching window. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "rosetta.apiKey";
const state = { searchFile: null, classifyImage: null, thumbs: [], infoFailed: false };

// What an upload is, as the API names its fields: "image", "audio" or "video".
function kindOf(file) {
  const type = (file.type || "").split("/")[0];
  return type === "audio" || type === "video" ? type : "image";
}

function headers() {
  const key = localStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

function show(text, ok = false) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}

// fetch with the API key; throws Error(message) built from the server's {"error": {"code", "message"}}.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = `${body.error.message} (${body.error.code})`;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) message += " — enter the API key at the top right";
    throw new Error(message);
  }
  return response;
}

async function refreshInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    $("model").textContent = `${info.model} · ${info.dim}d`;
    $("store").textContent = info.store ? `${info.store.items} stored` : "no store";
    if (state.infoFailed) show("");  // clear only our own earlier error, not another action's
    state.infoFailed = false;
  } catch (e) {
    $("model").textContent = "";
    $("store").textContent = "";
    state.infoFailed = true;
    show(e.message);
  }
}

// Image pickers: a label around a file input, plus drag-and-drop onto it.
// A sound or a video is previewed by `soundId`'s player, where the picker has one.
function picker(dropId, inputId, previewId, onPick, soundId = null) {
  const drop = $(dropId), input = $(inputId), preview = $(previewId), sound = soundId && $(soundId);
  const take = (file) => {
    if (!file) return;
    const shown = sound && kindOf(file) !== "image" ? sound : preview;
    for (const element of [preview, sound]) {
      if (!element) continue;
      if (element.src) URL.revokeObjectURL(element.src);
      element.removeAttribute("src");
      element.hidden = element !== shown;
    }
    shown.src = URL.createObjectURL(file);
    onPick(file);
  };
  input.addEventListener("change", () => take(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    take(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  return () => {
    input.value = "";
    for (const element of [preview, sound]) if (element) { element.hidden = true; element.removeAttribute("src"); }
    onPick(null);
  };
}

function updateWeights() {
  const both = Boolean($("query-text").value.trim() && state.searchFile);
  $("weight").disabled = !both;
  const image = Number($("weight").value);
  $("weight-label").textContent = both ? `${100 - image} / ${image}` : "—";
}

async function search() {
  const text = $("query-text").value.trim();
  if (!text && !state.searchFile) { show("Type a query or choose an image, a sound or a video first."); return; }
  const k = Number($("k").value), where = $("where").value.trim();
  const image = Number($("weight").value) / 100;
  let request;
  if (state.searchFile) {
    const form = new FormData();
    if (text) {
      form.append("text", text);
      form.append("weights", String(1 - image));
      form.append("weights", String(image));
    }
    form.append(kindOf(state.searchFile), state.searchFile);
    form.append("k", String(k));
    if (where) form.append("where", where);
    request = { method: "POST", body: form };
  } else {
    const body = { text, k };
    if (where) body.where = where;
    request = { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  }
  const button = $("search-btn");
  button.disabled = true;
  try {
    const { hits } = await (await api("/v1/search", request)).json();
    renderHits(hits);
    show(hits.length ? "" : "No results: the store is empty or nothing passes the filter.");
  } catch (e) {
    show(e.message);
  } finally {
    button.disabled = false;
  }
}

function renderHits(hits) {
  state.thumbs.forEach((url) => URL.revokeObjectURL(url));
  state.thumbs = [];
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("figure");
    card.className = "result";
    card.style.margin = "0";
    const recording = Boolean(hit.media);
    const img = document.createElement(recording ? (hit.metadata.media === "audio" ? "audio" : "video") : "img");
    img.className = "thumb";
    if (recording) img.controls = true; else img.alt = hit.path || hit.id;
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = (hit.path || hit.id).split("/").pop();
    name.title = hit.path || hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(name, score);
    card.append(img, meta);
    if (recording) {
      const when = document.createElement("div");
      when.className = "when";
      when.textContent = `${clock(hit.start)} – ${hit.end === null ? "end" : clock(hit.end)}`;
      card.append(when);
    }
    grid.append(card);
    if (hit.thumbnail) loadThumb(img, hit.thumbnail);
    if (recording) loadMedia(img, hit.media, hit.start, hit.end);
  }
}

function clock(seconds) {
  const s = Math.max(0, seconds);
  return `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;
}

// A sound or video found: fetched with the API key (a media element could not send it), then cued at the matched
// window with a media fragment (#t=start,end), so that playing it plays that window.
async function loadMedia(player, url, start, end) {
  try {
    const blob = await (await api(url)).blob();
    const src = URL.createObjectURL(blob);
    state.thumbs.push(src);
    player.preload = "metadata";
    player.src = `${src}#t=${start}${end === null ? "" : `,${end}`}`;
  } catch (e) {
    player.title = `cannot load it: ${e.message}`;
  }
}

// Thumbnails go through fetch so that the API key header is sent; <img src> could not send it.
async function loadThumb(img, url) {
  try {
    const blob = await (await api(url)).blob();
    const src = URL.createObjectURL(blob);
    state.thumbs.push(src);
    img.src = src;
  } catch (_) {
    img.alt = "no thumbnail";
  }
}

async function classify() {
  if (!state.classifyImage) { show("Choose an image to classify first."); return; }
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!labels.length) { show("Type at least one label."); return; }
  const form = new FormData();
  form.append("image", state.classifyImage);
  labels.forEach((label) => form.append("labels", label));
  form.append("templates", $("templates").value);
  const button = $("classify-btn");
  button.disabled = true;
  try {
    const result = await (await api("/v1/classify", { method: "POST", body: form })).json();
    renderClassification(result);
    show("");
  } catch (e) {
    show(e.message);
  } finally {
    button.disabled = false;
  }
}

function renderClassification(result) {
  const out = $("classify-result");
  out.replaceChildren();
  const top = document.createElement("div");
  const label = document.createElement("span");
  label.className = "top-label";
  label.textContent = result.label;
  const score = document.createElement("span");
  score.className = "top-score";
  score.textContent = `${(100 * result.score).toFixed(1)}%`;
  top.append(label, score);
  out.append(top);
  const rows = Object.entries(result.probs).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of rows) {
    const bar = document.createElement("div");
    bar.className = "bar";
    const n = document.createElement("span");
    n.className = "label";
    n.textContent = name;
    n.title = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    bar.append(n, track, pct);
    out.append(bar);
  }
}

async function indexFiles() {
  const files = $("index-files").files;
  if (!files.length) { show("Choose images, sounds or videos to add first."); return; }
  const form = new FormData();
  for (const file of files) form.append("files", file);
  const button = $("index-btn");
  button.disabled = true;
  try {
    const result = await (await api("/v1/index", { method: "POST", body: form })).json();
    show(`Added ${result.indexed.length} file(s); the store holds ${result.count}.`, true);
    $("index-files").value = "";
    refreshInfo();
  } catch (e) {
    show(e.message);
  } finally {
    button.disabled = false;
  }
}

function init() {
  $("api-key").value = localStorage.getItem(KEY) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
    refreshInfo();
  });
  const clearSearch = picker("search-drop", "search-file", "search-preview", (file) => {
    state.searchFile = file;
    $("search-clear").hidden = !file;
    updateWeights();
  }, "search-sound");
  $("search-clear").addEventListener("click", clearSearch);
  picker("classify-drop", "classify-file", "classify-preview", (file) => { state.classifyImage = file; });
  $("query-text").addEventListener("input", updateWeights);
  $("query-text").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
  $("weight").addEventListener("input", updateWeights);
  $("search-btn").addEventListener("click", search);
  $("classify-btn").addEventListener("click", classify);
  $("labels").addEventListener("keydown", (e) => { if (e.key === "Enter") classify(); });
  $("index-btn").addEventListener("click", indexFiles);
  updateWeights();
  refreshInfo();
}

init();
