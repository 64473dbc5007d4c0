// genlab web UI: streaming chat over /v1/chat/completions, feedback over /v1/feedback, and the
// feedback history page. Plain ES2020, no build step, no dependencies.
// Model output (and anything else from the server) is always inserted as text, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY_STORE = "genlab-api-key";
const MODEL_STORE = "genlab-model";

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else node[k] = v;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The message of an error response ({"error": {"message", ...}}), with a hint for a 401.
async function errorText(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    /* not JSON: keep the status */
  }
  if (response.status === 401) {
    return `API key needed (401): ${message}. Enter a valid key under "API key" in the sidebar.`;
  }
  return message;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message})`);
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

// ---------------------------------------------------------------------------------------------
// Chat page
// ---------------------------------------------------------------------------------------------

const conversation = []; // {role, content}: the turns sent with every request (system prompt aside)
let controller = null; // AbortController of the requests in flight (Stop)
let pendingPair = null; // a compare pair whose better answer was not picked yet

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.className = isError ? "status error" : "status muted";
}

async function loadModels() {
  const select = $("#model");
  try {
    const { data } = await (await api("/v1/models")).json();
    const previous = select.value || localStorage.getItem(MODEL_STORE);
    select.replaceChildren(...data.map((m) => el("option", {
      value: m.id,
      dataset: { modality: m.modality || "text" },
      textContent: m.id.endsWith("+docs") ? `${m.id}  (answers with sources)` : m.modality === "image" ? `${m.id}  (images)` : m.id,
    })));
    if (data.some((m) => m.id === previous)) select.value = previous;
    showMode();
    setStatus(`${data.length} model${data.length === 1 ? "" : "s"} available`);
  } catch (e) {
    select.replaceChildren();
    setStatus(e.message, true);
  }
}

function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// Check the sampling controls; returns an error message or null.
function checkControls() {
  const t = numberOf("#temperature"), p = numberOf("#top-p"), m = numberOf("#max-tokens"), s = numberOf("#seed");
  if (t !== null && !(t >= 0 && t <= 2)) return "Temperature must be between 0 and 2.";
  if (p !== null && !(p > 0 && p <= 1)) return "Top p must be in (0, 1].";
  if (m !== null && !(Number.isInteger(m) && m >= 1)) return "Max tokens must be a whole number ≥ 1.";
  if (s !== null && !Number.isInteger(s)) return "Seed must be a whole number.";
  return null;
}

function requestBody(messages, seed) {
  const body = { model: $("#model").value, messages, stream: true, stream_options: { include_usage: true } };
  const t = numberOf("#temperature"), p = numberOf("#top-p"), m = numberOf("#max-tokens");
  if (t !== null) body.temperature = t;
  if (p !== null) body.top_p = p;
  if (m !== null) body.max_tokens = m;
  if (seed !== null && seed !== undefined) body.seed = seed;
  if ($("#json-mode").checked) body.response_format = { type: "json_object" };
  return body;
}

function withSystem(turns) {
  const system = $("#system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...turns];
}

function scrollDown() {
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

function addUser(text) {
  const node = el("div", { className: "message user" }, el("div", { className: "text", textContent: text }));
  $("#messages").append(node);
  scrollDown();
  return node;
}

function addAssistant(parent) {
  const node = el("div", { className: "message assistant streaming" },
    el("div", { className: "text" }), el("div", { className: "meta" }));
  parent.append(node);
  scrollDown();
  return node;
}

// Parse a text/event-stream body: calls onData(json) for each `data: {...}` event; resolves when
// `data: [DONE]` arrives (throws if the stream ends without it, or on a `data: {"error": ...}`).
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const handle = (event) => {
    const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (data === "") return false;
    if (data === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new Error(`unreadable server event: ${data.slice(0, 200)}`);
    }
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    onData(chunk);
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      buffer += decoder.decode();
      if (buffer.trim() && handle(buffer.replace(/\r\n?/g, "\n").trim())) return;
      throw new Error("the answer stream ended early (no [DONE])");
    }
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (handle(event)) {
        reader.cancel().catch(() => {});
        return;
      }
    }
  }
}

// Stream one chat completion into `node`; resolves to {id, text} once it is complete (and
// recorded by the server: only then does the node get its data-completion-id).
async function streamInto(node, body, signal) {
  const textEl = $(".text", node);
  const meta = $(".meta", node);
  const started = performance.now();
  let firstToken = null, id = null, text = "", usage = null, sources = null, citations = null, finish = null, pieces = 0;
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal })
    .catch((e) => { throw e.name === "AbortError" ? e : new Error(`cannot reach the server (${e.message})`); });
  if (!response.ok) throw new Error(await errorText(response));
  await readEvents(response, (chunk) => {
    id = chunk.id || id;
    if (chunk.usage) usage = chunk.usage;
    if (chunk.sources) sources = chunk.sources;
    for (const choice of chunk.choices || []) {
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        firstToken = firstToken || performance.now();
        pieces += 1;
        text += piece;
        textEl.textContent = text;
        scrollDown();
      }
      if (choice.citations) citations = choice.citations;
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  });
  node.classList.remove("streaming");
  if (id) node.dataset.completionId = id;
  const seconds = (performance.now() - (firstToken || started)) / 1000;
  const tokens = usage ? usage.completion_tokens : pieces;
  const stats = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (seconds > 0 && tokens > 1) stats.push(`${(tokens / seconds).toFixed(1)} tok/s`);
  if (finish && finish !== "stop") stats.push(finish === "length" ? "cut at max tokens" : finish);
  meta.append(el("span", { className: "stats", textContent: stats.join(" · "), title: id || "" }));
  if (sources) node.insertBefore(renderSources(sources, citations), meta);
  return { id, text };
}

function renderSources(sources, citations) {
  const cited = new Set((citations && citations.cited) || []);
  const invalid = (citations && citations.invalid) || [];
  const box = el("div", { className: "sources" },
    el("div", { className: "sources-title", textContent: `Sources (${cited.size} of ${sources.length} cited)` }));
  for (const s of sources) {
    const name = [s.title || s.source || s.path || "untitled", s.heading].filter(Boolean).join(" › ");
    const summary = el("summary", {},
      el("span", { className: "marker", textContent: `[${s.n}]` }), ` ${name}`,
      cited.has(s.n) ? el("span", { className: "badge cited-badge", textContent: "cited" }) : null,
      typeof s.score === "number" ? el("span", { className: "muted", textContent: ` ${s.score.toFixed(3)}` }) : null);
    const where = s.source && s.source !== name ? el("div", { className: "muted", textContent: s.path || s.source }) : null;
    box.append(el("details", { className: `source${cited.has(s.n) ? " cited" : ""}`, dataset: { n: String(s.n) } },
      summary, where, el("pre", { textContent: s.text || "" })));
  }
  if (invalid.length) {
    box.append(el("div", { className: "invalid-citations error",
      textContent: `⚠ The answer cites ${invalid.map((n) => `[${n}]`).join(", ")}, which match${invalid.length === 1 ? "es" : ""} no source.` }));
  }
  return box;
}

async function postFeedback(body, statusEl) {
  statusEl.textContent = "saving…";
  statusEl.className = "feedback-status";
  try {
    await api("/v1/feedback", body);
    statusEl.textContent = "saved";
    return true;
  } catch (e) {
    statusEl.textContent = e.message;
    statusEl.className = "feedback-status error";
    return false;
  }
}

// An inline editor under the message (one at a time per kind).
function inlineForm(node, kind, field, saveLabel, onSave) {
  const old = $(`.${kind}`, node);
  if (old) return old.remove();
  const cancel = el("button", { type: "button", className: "cancel", textContent: "Cancel" });
  const save = el("button", { type: "button", className: `save-${kind} primary`, textContent: saveLabel });
  const form = el("div", { className: `inline-form ${kind}` }, field, el("div", { className: "row" }, save, cancel));
  cancel.onclick = () => form.remove();
  save.onclick = async () => {
    save.disabled = true;
    if (await onSave()) form.remove();
    else save.disabled = false;
  };
  node.append(form);
  field.focus();
}

function addFeedbackControls(node, answerText, status = el("span", { className: "feedback-status" })) {
  const meta = $(".meta", node);
  const id = () => node.dataset.completionId;
  const button = (className, textContent, title) => el("button", { className: `icon ${className}`, type: "button", textContent, title });
  const up = button("thumbs-up", "▲ Good", "Thumbs up: a good answer");
  const down = button("thumbs-down", "▼ Bad", "Thumbs down: a bad answer");
  const correct = button("correct", "✎ Edit to correct", "Write the answer it should have given");
  const comment = button("comment-button", "Comment", "Leave a comment");
  const rate = async (rating, button, other) => {
    if (await postFeedback({ completion_id: id(), rating, rating_scale: "thumbs" }, status)) {
      button.classList.add("on");
      other.classList.remove("on");
    }
  };
  up.onclick = () => rate(1, up, down);
  down.onclick = () => rate(-1, down, up);
  correct.onclick = () => {
    const area = el("textarea", { rows: Math.min(12, Math.max(3, answerText.split("\n").length + 1)), value: answerText });
    const note = el("input", { className: "correction-comment", placeholder: "why (optional)" });
    const field = el("div", { className: "fields" }, area, note);
    field.focus = () => area.focus();
    inlineForm(node, "correction", field, "Save correction", () => {
      if (!area.value.trim()) {
        status.textContent = "the correction is empty";
        status.className = "feedback-status error";
        return false;
      }
      const body = { completion_id: id(), correction: area.value };
      if (note.value.trim()) body.comment = note.value.trim();
      return postFeedback(body, status);
    });
  };
  comment.onclick = () => {
    const area = el("textarea", { rows: 2, placeholder: "Your comment on this answer" });
    inlineForm(node, "comment", area, "Save comment", () => {
      if (!area.value.trim()) return false;
      return postFeedback({ completion_id: id(), comment: area.value.trim() }, status);
    });
  };
  meta.append(up, down, correct, comment, status);
}

function showError(node, message) {
  node.classList.remove("streaming");
  node.classList.add("failed");
  $(".meta", node).append(el("span", { className: "error", textContent: message }));
}

function takePrompt() {
  if (controller) return null;
  const problem = checkControls() || (!$("#model").value && "No model: check the server (and the API key).");
  if (problem) {
    setStatus(problem, true);
    return null;
  }
  const text = $("#prompt").value.trim();
  if (!text) return null;
  $("#prompt").value = "";
  abandonPendingPair();
  return text;
}

function setBusy(value) {
  controller = value ? new AbortController() : null;
  $("#send").disabled = value;
  $("#compare").disabled = value;
  $("#stop").hidden = !value;
  if (!value) $("#prompt").focus();
}

function abandonPendingPair() {
  if (!pendingPair) return;
  pendingPair.querySelectorAll(".better").forEach((b) => (b.disabled = true));
  const hint = $(".pair-hint", pendingPair);
  if (hint) hint.textContent = "No answer picked: this turn is not part of the conversation.";
  pendingPair = null;
}

function stopped(e) {
  return e && e.name === "AbortError";
}

// ---- image mode: the selected model draws images (/v1/images/generations) -------------------

function imageMode() {
  const option = $("#model").selectedOptions[0];
  return Boolean(option && option.dataset.modality === "image");
}

function showMode() {
  document.body.classList.toggle("image-mode", imageMode());
  $("#prompt").placeholder = imageMode() ? "Caption, e.g. a cat wearing sunglasses (Enter draws two images)"
    : "Message (Enter sends, Shift+Enter for a new line)";
}

// Two images for a caption, each with thumbs, and an A/B pick between them.
async function sendImages() {
  const g = numberOf("#guidance");
  if (g !== null && !(g >= 0 && g <= 20)) return setStatus("Guidance must be between 0 and 20.", true);
  const best = numberOf("#candidates");
  if (best !== null && !(Number.isInteger(best) && best >= 1 && best <= 16)) return setStatus("Best of must be a whole number from 1 to 16.", true);
  const text = takePrompt();
  if (text === null) return;
  setBusy(true);
  addUser(text);
  const hint = el("div", { className: "pair-hint muted", textContent: "Rate each image, or pick the better one." });
  const pair = el("div", { className: "pair images" });
  $("#messages").append(el("div", { className: "compare" }, hint, pair));
  const body = { model: $("#model").value, prompt: text, n: 2, temperature: numberOf("#temperature") };
  if (g !== null) body.guidance = g;
  if (best !== null) body.candidates = best;
  if (numberOf("#seed") !== null) body.seed = numberOf("#seed");
  try {
    const { data, ignored_words: ignored } = await (await api("/v1/images/generations", body)).json();
    if (ignored.length) hint.textContent += ` Words the model does not know were left out: ${ignored.join(", ")}.`;
    const nodes = data.map((image, i) => {
      const node = el("div", { className: "message assistant image-card", dataset: { completionId: image.id } },
        el("img", { className: "generated", src: `data:image/png;base64,${image.b64_json}`, alt: `image ${i + 1} for: ${text}` }),
        el("div", { className: "meta" }));
      pair.append(node);
      return node;
    });
    nodes.forEach((node, i) => {
      const status = el("span", { className: "feedback-status" });
      addFeedbackControls(node, "", status);
      $(".correct", node).remove(); // an image has no text to correct
      const better = el("button", { className: "better", type: "button", textContent: "✓ This one is better" });
      better.onclick = async () => {
        const chosen = data[i].id, other = data[1 - i].id;
        if (await postFeedback({ completion_id: chosen, preferred: chosen, rejected: other }, status)) {
          node.classList.add("chosen");
          nodes[1 - i].classList.add("rejected");
          pair.querySelectorAll(".better").forEach((b) => b.remove());
        }
      };
      $(".meta", node).prepend(better);
    });
  } catch (e) {
    hint.textContent = e.message;
    hint.className = "pair-hint error";
  } finally {
    setBusy(false);
  }
}

async function send() {
  if (imageMode()) return sendImages();
  const text = takePrompt();
  if (text === null) return;
  setBusy(true);
  addUser(text);
  const node = addAssistant($("#messages"));
  const turns = [...conversation, { role: "user", content: text }];
  try {
    const answer = await streamInto(node, requestBody(withSystem(turns), numberOf("#seed")), controller.signal);
    conversation.push({ role: "user", content: text }, { role: "assistant", content: answer.text });
    addFeedbackControls(node, answer.text);
  } catch (e) {
    showError(node, stopped(e) ? "stopped (not recorded; not part of the conversation)" : e.message);
  } finally {
    setBusy(false);
  }
}

async function compare() {
  if (imageMode()) return sendImages();
  const text = takePrompt();
  if (text === null) return;
  setBusy(true);
  addUser(text);
  const hint = el("div", { className: "pair-hint muted", textContent: "Two answers to the same conversation: pick the better one to continue." });
  const pair = el("div", { className: "pair" });
  const wrap = el("div", { className: "compare" }, hint, pair);
  $("#messages").append(wrap);
  const turns = [...conversation, { role: "user", content: text }];
  const seed = numberOf("#seed");
  const base = seed === null ? Math.floor(Math.random() * 2 ** 31) : seed;
  const nodes = [addAssistant(pair), addAssistant(pair)];
  const signal = controller.signal;
  // both at once: the server batches them
  const results = await Promise.allSettled(nodes.map((node, i) => streamInto(node, requestBody(withSystem(turns), base + i), signal)));
  const failed = results.find((r) => r.status === "rejected");
  if (failed) {
    results.forEach((r, i) => {
      if (r.status === "rejected") showError(nodes[i], stopped(r.reason) ? "stopped" : r.reason.message);
    });
    hint.textContent = "The comparison did not complete; send again to retry.";
    setBusy(false);
    return;
  }
  const answers = results.map((r) => r.value);
  nodes.forEach((node, i) => {
    const status = el("span", { className: "feedback-status" });
    const better = el("button", { className: "better", type: "button", textContent: "✓ This one is better" });
    better.onclick = async () => {
      const chosen = answers[i].id, other = answers[1 - i].id;
      pair.querySelectorAll(".better").forEach((b) => (b.disabled = true));
      if (!(await postFeedback({ completion_id: chosen, preferred: chosen, rejected: other }, status))) {
        pair.querySelectorAll(".better").forEach((b) => (b.disabled = false));
        return;
      }
      if (pendingPair === wrap) pendingPair = null;
      node.classList.add("chosen");
      nodes[1 - i].classList.add("rejected");
      hint.textContent = "Preference saved; the chosen answer continues the conversation.";
      better.remove();
      $(".better", nodes[1 - i])?.remove();
      conversation.push({ role: "user", content: text }, { role: "assistant", content: answers[i].text });
      addFeedbackControls(node, answers[i].text, status);
    };
    $(".meta", node).append(better, status);
  });
  pendingPair = wrap;
  setBusy(false);
}

// The API key field (both pages): kept in localStorage; a change reloads what the page shows.
function bindApiKey(reload) {
  const key = $("#api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.onchange = () => {
    const v = key.value.trim();
    if (v) localStorage.setItem(KEY_STORE, v);
    else localStorage.removeItem(KEY_STORE);
    reload();
  };
}

function initChat() {
  bindApiKey(loadModels);
  $("#model").onchange = () => {
    localStorage.setItem(MODEL_STORE, $("#model").value);
    showMode();
  };
  $("#composer").onsubmit = (e) => {
    e.preventDefault();
    send();
  };
  $("#prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  };
  $("#compare").onclick = compare;
  $("#stop").onclick = () => controller && controller.abort();
  $("#reset").onclick = () => {
    if (controller) controller.abort();
    conversation.length = 0;
    pendingPair = null;
    $("#messages").replaceChildren();
    $("#prompt").focus();
  };
  loadModels();
}

// ---------------------------------------------------------------------------------------------
// Feedback history page (/history; ?limit=N sets the page size)
// ---------------------------------------------------------------------------------------------

const params = new URLSearchParams(location.search);
const PAGE = Math.min(500, Math.max(1, parseInt(params.get("limit"), 10) || 50));
let offset = Math.max(0, parseInt(params.get("offset"), 10) || 0);

function lastUserText(row) {
  if (Array.isArray(row.messages) && row.messages.length) {
    const users = row.messages.filter((m) => m.role === "user");
    const m = users.length ? users[users.length - 1] : row.messages[row.messages.length - 1];
    return typeof m.content === "string" ? m.content : JSON.stringify(m.content);
  }
  return row.prompt || "";
}

function feedbackCell(row) {
  const cell = el("td", { className: "feedback" });
  const line = (className, text) => cell.append(el("div", { className, textContent: text }));
  if (row.rating !== null && row.rating !== undefined) {
    if (row.rating_scale === "stars") line("rating", `${"★".repeat(row.rating)}${"☆".repeat(5 - row.rating)}`);
    else line(`rating ${row.rating > 0 ? "good" : "bad"}`, row.rating > 0 ? "▲ thumbs up" : "▼ thumbs down");
  }
  if (row.preferred) {
    line("preference", row.preferred === row.completion_id ? "✓ preferred over" : "✗ rejected for");
    line("muted mono", row.preferred === row.completion_id ? row.rejected : row.preferred);
  }
  if (row.correction) {
    cell.append(el("div", { className: "label", textContent: "correction" }), el("div", { className: "clip correction-text", textContent: row.correction }));
  }
  if (row.comment) {
    cell.append(el("div", { className: "label", textContent: "comment" }), el("div", { className: "clip", textContent: row.comment }));
  }
  return cell;
}

function historyRow(row) {
  const when = new Date(row.created * 1000);
  const clip = (text) => el("div", { className: "clip", textContent: text || "" });
  const prompt = el("td", {}, clip(lastUserText(row)));
  if (row.prompt) {
    prompt.append(el("details", {}, el("summary", { textContent: "full prompt" }), el("pre", { textContent: row.prompt })));
  }
  return el("tr", { className: "feedback-row", dataset: { completionId: row.completion_id || "" } },
    el("td", { textContent: String(row.id) }),
    el("td", { className: "nowrap", textContent: when.toLocaleString(), title: when.toISOString() }),
    el("td", {}, el("div", { textContent: row.model || "" }), el("div", { className: "muted mono", textContent: row.completion_id })),
    el("td", { textContent: row.user || "" }),
    prompt,
    el("td", {}, clip(row.choice_text)),
    feedbackCell(row));
}

async function loadHistory() {
  const summary = $("#summary");
  const body = $("#history tbody");
  try {
    const { data, total } = await (await api(`/v1/feedback?limit=${PAGE}&offset=${offset}`)).json();
    summary.className = "muted";
    summary.textContent = total
      ? `${total} feedback row${total === 1 ? "" : "s"}; showing ${data.length ? offset + 1 : 0}–${offset + data.length}, newest first`
      : "No feedback yet: rate an answer in the chat.";
    body.replaceChildren(...data.map(historyRow));
    $("#newer").disabled = offset === 0;
    $("#older").disabled = offset + data.length >= total;
    $("#page").textContent = total ? `page ${Math.floor(offset / PAGE) + 1} of ${Math.max(1, Math.ceil(total / PAGE))}` : "";
    const url = new URL(location.href);
    if (offset) url.searchParams.set("offset", String(offset));
    else url.searchParams.delete("offset");
    history.replaceState(null, "", url);
  } catch (e) {
    summary.textContent = e.message;
    summary.className = "error";
    body.replaceChildren();
  }
}

function initHistory() {
  $("#newer").onclick = () => { offset = Math.max(0, offset - PAGE); loadHistory(); };
  $("#older").onclick = () => { offset += PAGE; loadHistory(); };
  $("#refresh").onclick = loadHistory;
  bindApiKey(loadHistory);
  loadHistory();
}

if ($("#composer")) initChat();
if ($("#history")) initHistory();
