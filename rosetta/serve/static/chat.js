// The chat page: a conversation sent to /v1/chat/completions, the reply streamed in as server-sent events.
"use strict";

const KEY = "rosetta.apiKey";
const $ = (id) => document.getElementById(id);
let history = [];

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

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
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
  const body = { messages: history, stream: true, max_tokens: Number($("max-tokens").value) || 256 };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  $("send").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error ? error.error.message : `HTTP ${response.status}`);
    }
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

async function showModel() {
  try {
    const info = await (await fetch("/v1/info", { headers: headers() })).json();
    $("model").textContent = info.model || "";
  } catch (e) { /* the badge stays empty */ }
}

$("chat-form").addEventListener("submit", send);
$("reset").addEventListener("click", () => { history = []; $("conversation").textContent = ""; say(""); });
$("api-key").value = localStorage.getItem(KEY) || "";
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  showModel();
});
showModel();
