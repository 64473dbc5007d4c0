// genlab web UI: streaming chat over /v1/chat/completions, feedback over /v1/feedback.
// Model output is always inserted as text (textContent), never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const conversation = []; // {role, content} sent with every request
let busy = false;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("genlab-api-key");
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (response.status === 401) return "The server needs an API key: enter it in the sidebar.";
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) return setStatus(await errorText(response), true);
  const { data } = await response.json();
  const select = $("#model");
  const previous = select.value || localStorage.getItem("genlab-model");
  select.replaceChildren(...data.map((m) => el("option", { value: m.id, textContent: m.id })));
  if (data.some((m) => m.id === previous)) select.value = previous;
  setStatus(`${data.length} model${data.length === 1 ? "" : "s"} available`);
}

function requestBody(messages, seed) {
  const body = {
    model: $("#model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("#temperature").value),
    top_p: Number($("#top-p").value),
    max_tokens: Number($("#max-tokens").value),
  };
  if (seed !== null && seed !== undefined) body.seed = seed;
  if ($("#json-mode").checked) body.response_format = { type: "json_object" };
  return body;
}

function fullConversation(extra) {
  const system = $("#system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...conversation, ...extra];
}

function addUser(text, parent = $("#messages")) {
  const node = el("div", { className: "message user" }, el("div", { className: "text", textContent: text }));
  parent.append(node);
  return node;
}

function addAssistant(parent = $("#messages")) {
  const text = el("div", { className: "text" });
  const meta = el("div", { className: "meta" });
  const node = el("div", { className: "message assistant" }, text, meta);
  parent.append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// Stream one chat completion into `node`; resolves to {id, text} once [DONE] arrives.
async function streamInto(node, body) {
  const textEl = node.querySelector(".text");
  const meta = node.querySelector(".meta");
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", id = null, text = "", usage = null, sources = null, citations = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        id = chunk.id || id;
        if (chunk.usage) usage = chunk.usage;
        if (chunk.sources) sources = chunk.sources;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            textEl.textContent = text;
          }
          if (choice.citations) citations = choice.citations;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  node.dataset.completionId = id;
  const seconds = (performance.now() - started) / 1000;
  const tokens = usage ? usage.completion_tokens : 0;
  meta.append(el("span", { className: "muted", textContent: `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tok/s · ${finish}` }));
  if (sources) node.append(renderSources(sources, citations));
  return { id, text };
}

function renderSources(sources, citations) {
  const cited = new Set((citations && citations.cited) || []);
  const box = el("div", { className: "sources" }, el("div", { textContent: "Sources" }));
  for (const s of sources) {
    const summary = el("summary", { textContent: `[${s.n}] ${s.source}${cited.has(s.n) ? " (cited)" : ""}` });
    box.append(el("details", { className: cited.has(s.n) ? "cited" : "" }, summary, el("pre", { textContent: s.text })));
  }
  if (citations && citations.invalid && citations.invalid.length) {
    box.append(el("div", { className: "error", textContent: `The answer cites ${citations.invalid.map((n) => `[${n}]`).join(", ")}, which match no source.` }));
  }
  return box;
}

async function postFeedback(body, statusEl) {
  statusEl.textContent = "saving…";
  statusEl.className = "feedback-status";
  const response = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (response.ok) {
    statusEl.textContent = "saved";
  } else {
    statusEl.textContent = await errorText(response);
    statusEl.className = "feedback-status error";
  }
  return response.ok;
}

function addFeedbackControls(node, answerText) {
  const meta = node.querySelector(".meta");
  const status = el("span", { className: "feedback-status" });
  const id = () => node.dataset.completionId;
  const up = el("button", { className: "thumbs-up", type: "button", textContent: "▲ Good", title: "Thumbs up" });
  const down = el("button", { className: "thumbs-down", type: "button", textContent: "▼ Bad", title: "Thumbs down" });
  const correct = el("button", { className: "correct", type: "button", textContent: "Edit to correct" });
  up.onclick = () => postFeedback({ completion_id: id(), rating: 1, rating_scale: "thumbs" }, status);
  down.onclick = () => postFeedback({ completion_id: id(), rating: -1, rating_scale: "thumbs" }, status);
  correct.onclick = () => {
    if (node.querySelector(".correction")) return;
    const area = el("textarea", { rows: 4, value: answerText });
    const comment = el("input", { placeholder: "comment (optional)" });
    const save = el("button", { type: "button", className: "save-correction", textContent: "Save correction" });
    const form = el("div", { className: "correction" }, area, comment, save);
    save.onclick = async () => {
      const body = { completion_id: id(), correction: area.value };
      if (comment.value.trim()) body.comment = comment.value.trim();
      if (await postFeedback(body, status)) form.remove();
    };
    node.append(form);
  };
  meta.append(up, down, correct, status);
}

function takePrompt() {
  const text = $("#prompt").value.trim();
  if (!text || busy || !$("#model").value) return null;
  $("#prompt").value = "";
  return text;
}

function setBusy(value) {
  busy = value;
  for (const id of ["#send", "#compare"]) $(id).disabled = value;
}

async function send() {
  const text = takePrompt();
  if (text === null) return;
  setBusy(true);
  addUser(text);
  const node = addAssistant();
  const messages = fullConversation([{ role: "user", content: text }]);
  const seed = $("#seed").value === "" ? null : Number($("#seed").value);
  try {
    const answer = await streamInto(node, requestBody(messages, seed));
    conversation.push({ role: "user", content: text }, { role: "assistant", content: answer.text });
    addFeedbackControls(node, answer.text);
  } catch (e) {
    node.querySelector(".meta").append(el("span", { className: "error", textContent: e.message }));
  } finally {
    setBusy(false);
  }
}

async function compare() {
  const text = takePrompt();
  if (text === null) return;
  setBusy(true);
  addUser(text);
  const pair = el("div", { className: "pair" });
  $("#messages").append(pair);
  const messages = fullConversation([{ role: "user", content: text }]);
  const base = $("#seed").value === "" ? Math.floor(Math.random() * 1e9) : Number($("#seed").value);
  const nodes = [addAssistant(pair), addAssistant(pair)];
  try {
    const answers = await Promise.all(nodes.map((node, i) => streamInto(node, requestBody(messages, base + i))));
    nodes.forEach((node, i) => {
      const status = el("span", { className: "feedback-status" });
      const better = el("button", { className: "better", type: "button", textContent: "This one is better" });
      better.onclick = async () => {
        const other = answers[1 - i].id;
        if (!(await postFeedback({ completion_id: answers[i].id, preferred: answers[i].id, rejected: other }, status))) return;
        node.classList.add("chosen");
        pair.querySelectorAll(".better").forEach((b) => (b.disabled = true));
        conversation.push({ role: "user", content: text }, { role: "assistant", content: answers[i].text });
      };
      node.querySelector(".meta").append(better, status);
    });
  } catch (e) {
    nodes[0].querySelector(".meta").append(el("span", { className: "error", textContent: e.message }));
  } finally {
    setBusy(false);
  }
}

function init() {
  const key = $("#api-key");
  key.value = localStorage.getItem("genlab-api-key") || "";
  key.onchange = () => {
    localStorage.setItem("genlab-api-key", key.value.trim());
    loadModels();
  };
  $("#model").onchange = () => localStorage.setItem("genlab-model", $("#model").value);
  $("#composer").onsubmit = (e) => {
    e.preventDefault();
    send();
  };
  $("#prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send();
    }
  };
  $("#compare").onclick = compare;
  $("#reset").onclick = () => {
    conversation.length = 0;
    $("#messages").replaceChildren();
  };
  loadModels();
}

if ($("#composer")) init();

// --- feedback history page -----------------------------------------------------------------
const PAGE = 50;
let offset = 0;

function promptText(row) {
  if (Array.isArray(row.messages) && row.messages.length) {
    const users = row.messages.filter((m) => m.role === "user");
    return (users.length ? users[users.length - 1] : row.messages[row.messages.length - 1]).content;
  }
  return row.prompt || "";
}

function feedbackText(row) {
  const parts = [];
  if (row.rating !== null && row.rating !== undefined) {
    parts.push(row.rating_scale === "stars" ? `${row.rating}/5 stars` : row.rating > 0 ? "▲ thumbs up" : "▼ thumbs down");
  }
  if (row.preferred) parts.push(row.preferred === row.completion_id ? "preferred over the other answer" : "the other answer was preferred");
  if (row.correction) parts.push(`correction: ${row.correction}`);
  if (row.comment) parts.push(`comment: ${row.comment}`);
  return parts.join("\n");
}

async function loadHistory() {
  const response = await fetch(`/v1/feedback?limit=${PAGE}&offset=${offset}`, { headers: headers() });
  const summary = $("#summary");
  if (!response.ok) {
    summary.textContent = await errorText(response);
    summary.className = "error";
    return;
  }
  const { data, total } = await response.json();
  summary.textContent = `${total} feedback rows; showing ${total ? offset + 1 : 0}–${offset + data.length}`;
  const clip = (text) => el("div", { className: "clip", textContent: text || "" });
  $("#history tbody").replaceChildren(...data.map((row) => el("tr", { className: "feedback-row" },
    el("td", { textContent: row.id }),
    el("td", { textContent: new Date(row.created * 1000).toLocaleString() }),
    el("td", { textContent: row.user || "" }),
    el("td", {}, clip(promptText(row))),
    el("td", {}, clip(row.choice_text)),
    el("td", {}, clip(feedbackText(row))))));
  $("#newer").disabled = offset === 0;
  $("#older").disabled = offset + data.length >= total;
}

if ($("#history")) {
  $("#newer").onclick = () => { offset = Math.max(0, offset - PAGE); loadHistory(); };
  $("#older").onclick = () => { offset += PAGE; loadHistory(); };
  loadHistory();
}
