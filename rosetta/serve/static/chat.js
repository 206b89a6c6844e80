// The chat page: a conversation sent to /v1/chat/completions, the reply streamed in as server-sent events. For a
// model that reads images, a panel: a dropped or chosen image is captioned (/v1/caption), and questions about it
// are answered under it (/v1/ask).
"use strict";

const KEY = "rosetta.apiKey";
const $ = (id) => document.getElementById(id);
let history = [];
let infoFailed = false;
// The image the questions are about, as the data: URL the API reads; `picks` tells a late caption of an
// image picked before from the current one's.
const vision = { image: null, preview: null, picks: 0 };

function headers() {
  const key = localStorage.getItem(KEY);
  return { "Content-Type": "application/json", ...(key ? { "X-API-Key": key } : {}) };
}

function say(text, bad = true) {
  const box = $("message");
  box.textContent = text;
  box.className = bad ? "bad" : "good";
  box.hidden = !text;
}

// The server's error ({"error": {"code", "message"}}) as an Error to show.
async function failure(response) {
  const error = await response.json().catch(() => ({}));
  let message = error.error ? error.error.message : `HTTP ${response.status}`;
  if (response.status === 401) message += " — enter the API key at the top right";
  return new Error(message);
}

// What every reply on the page is asked with: the token limit and, when one is set, the temperature.
function options() {
  const out = { max_tokens: Number($("max-tokens").value) || 256 };
  if ($("temperature").value !== "") out.temperature = Number($("temperature").value);
  return out;
}

function bubble(role, text, where = $("conversation")) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  where.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  say("");
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const body = { messages: history, stream: true, ...options() };
  $("send").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const line of events) {
        const data = line.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
        if (delta) reply.textContent += delta;
      }
    }
    history.push({ role: "assistant", content: reply.textContent });
  } catch (e) {
    reply.remove();
    history.pop();
    say(e.message);
  } finally {
    $("send").disabled = false;
  }
}

// The image panel.

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name}: could not be read`));
    reader.readAsDataURL(file);
  });
}

// A model may well say nothing; the element still says that it answered.
function written(element, text) {
  element.textContent = text || "(an empty reply)";
  element.classList.toggle("empty", !text);
  element.removeAttribute("aria-busy");
}

// A new image: previewed and captioned; the answers about the one before go.
async function pick(file) {
  if (!file) return;
  const pickNumber = ++vision.picks;
  say("");
  let image;
  try {
    image = await dataUrl(file);
  } catch (e) {
    say(e.message);
    return;
  }
  if (pickNumber !== vision.picks) return;
  vision.image = image;
  if (vision.preview) URL.revokeObjectURL(vision.preview);
  vision.preview = URL.createObjectURL(file);
  $("vision-preview").src = vision.preview;
  $("vision-preview").hidden = false;
  $("answers").replaceChildren();
  $("question").disabled = $("ask").disabled = false;
  const caption = $("caption");
  caption.hidden = false;
  caption.textContent = "";
  caption.setAttribute("aria-busy", "true");
  try {
    const { captions } = await post("/v1/caption", { images: [image], ...options() });
    if (pickNumber === vision.picks) written(caption, captions[0]);
  } catch (e) {
    if (pickNumber !== vision.picks) return;
    caption.hidden = true;
    say(e.message);
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !vision.image) return;
  $("question").value = "";
  say("");
  const answers = $("answers");
  const asked = bubble("user question", question, answers);
  const answer = bubble("assistant answer", "", answers);
  answer.setAttribute("aria-busy", "true");
  try {
    written(answer, (await post("/v1/ask", { images: [vision.image], question, ...options() })).answer);
  } catch (e) {
    asked.remove();
    answer.remove();
    say(e.message);
  }
}

function dropZone(drop, input, onFile) {
  input.addEventListener("change", () => {
    onFile(input.files[0]);
    input.value = "";  // choosing the same file again is a new pick
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    onFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
}

// The model's name, and the image panel when the model reads images.
async function showModel() {
  try {
    const response = await fetch("/v1/info", { headers: headers() });
    if (!response.ok) throw await failure(response);
    const info = await response.json();
    $("model").textContent = info.model || "";
    $("vision-card").hidden = !(info.capabilities || []).includes("see");
    if (infoFailed) say("");  // only our own earlier error, not another action's
    infoFailed = false;
  } catch (e) {
    $("model").textContent = "";
    infoFailed = true;
    say(e.message);
  }
}

$("chat-form").addEventListener("submit", send);
$("reset").addEventListener("click", () => { history = []; $("conversation").textContent = ""; say(""); });
dropZone($("vision-drop"), $("vision-file"), pick);
$("ask-form").addEventListener("submit", ask);
$("api-key").value = localStorage.getItem(KEY) || "";
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  showModel();
});
showModel();
