// The chat page: conversations in the sidebar, a streamed reply rendered as Markdown, settings, server status.
import "./style.css";
import { addCopyButtons, copyText, renderMarkdown } from "./markdown.js";
import { APIError, listModels, serverStatus, streamChat } from "./api.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const state = {
  conversations: store.loadConversations(),
  currentId: store.loadCurrent(),
  settings: store.loadSettings(),
  models: [],
  streaming: null, // {controller, convId, message}
  confirmDelete: null,
  editing: null, // index of the user message being edited
};

// ---- conversations ---------------------------------------------------------------------------------------
function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function ensureCurrent() {
  let conv = current();
  if (!conv) {
    conv = { id: store.newId(), title: "New chat", messages: [], created: Date.now(), updated: Date.now() };
    state.conversations.unshift(conv);
    select(conv.id);
  }
  return conv;
}

function select(id) {
  state.currentId = id;
  state.editing = null;
  store.saveCurrent(id);
  document.body.classList.remove("side-open");
  render();
}

function persist() {
  if (!store.saveConversations(state.conversations)) toast("The browser's storage is full: delete or export old conversations.", true);
}

function touch(conv) {
  conv.updated = Date.now();
  state.conversations.sort((a, b) => b.updated - a.updated);
}

// ---- rendering -------------------------------------------------------------------------------------------
function render() {
  renderSidebar();
  renderMessages();
  const conv = current();
  $("title").textContent = conv ? conv.title : "New chat";
  document.title = conv && conv.messages.length ? `${conv.title} · qwen15` : "qwen15 chat";
  const busy = Boolean(state.streaming);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("streaming", busy);
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = el("li", conv.id === state.currentId ? "active" : "");
    li.dataset.id = conv.id;
    const open = el("button", "conv-title", conv.title);
    open.title = conv.title;
    open.addEventListener("click", () => select(conv.id));
    const rename = el("button", "icon rename", "✎");
    rename.title = "Rename";
    rename.setAttribute("aria-label", `Rename ${conv.title}`);
    rename.addEventListener("click", () => startRename(li, conv));
    const del = el("button", "icon delete", state.confirmDelete === conv.id ? "Delete?" : "×");
    del.title = "Delete";
    del.setAttribute("aria-label", `Delete ${conv.title}`);
    if (state.confirmDelete === conv.id) del.classList.add("confirm");
    del.addEventListener("click", () => removeConversation(conv.id));
    li.append(open, rename, del);
    list.appendChild(li);
  }
}

function startRename(li, conv) {
  const input = el("input", "rename-input");
  input.value = conv.title;
  input.setAttribute("aria-label", "New name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (keep && title) {
      conv.title = title.slice(0, 200);
      persist();
    }
    render();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

function removeConversation(id) {
  if (state.confirmDelete !== id) { // a second click confirms
    state.confirmDelete = id;
    renderSidebar();
    setTimeout(() => { if (state.confirmDelete === id) { state.confirmDelete = null; renderSidebar(); } }, 3000);
    return;
  }
  state.confirmDelete = null;
  if (state.streaming?.convId === id) stop();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  persist();
  select(state.currentId === id ? state.conversations[0]?.id || null : state.currentId);
}

function statsText(s) {
  if (!s) return "";
  const parts = [];
  if (s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.ttft_ms !== undefined) parts.push(`TTFT ${(s.ttft_ms / 1000).toFixed(2)} s`);
  if (s.tok_s !== undefined) parts.push(`${s.tok_s.toFixed(1)} tok/s`);
  if (s.stopped) parts.push("stopped");
  if (s.finish === "length") parts.push("max tokens reached");
  return parts.join(" · ");
}

function messageView(conv, m, i) {
  const last = i === conv.messages.length - 1;
  const live = state.streaming?.message === m;
  const box = el("div", `msg ${m.role}${live ? " live" : ""}`);
  box.dataset.index = i;
  box.dataset.role = m.role;
  const body = el("div", "body");
  if (m.role === "assistant") {
    body.innerHTML = renderMarkdown(m.content);
    addCopyButtons(body);
    if (live && !m.content) body.appendChild(el("span", "typing", "…"));
  } else if (state.editing === i) {
    body.appendChild(editor(conv, m, i));
  } else {
    body.textContent = m.content; // the user's own text is shown as typed
  }
  if (m.role === "system") box.prepend(el("div", "label", "system prompt"));
  box.appendChild(body);
  if (m.stats?.error) box.appendChild(el("div", "error", m.stats.error));
  const bar = el("div", "actions");
  if (m.role === "assistant" && !live) {
    const stats = el("span", "stats", statsText(m.stats));
    stats.title = "tokens from the server's usage; TTFT from sending to the first text; tok/s over the tokens after the first";
    bar.appendChild(stats);
    const copy = el("button", "copy-msg", "Copy");
    copy.type = "button";
    copy.addEventListener("click", async () => toast(await copyText(m.content) ? "Copied" : "Copy failed", false));
    bar.appendChild(copy);
    if (last && !state.streaming) {
      const again = el("button", "regenerate", "Regenerate");
      again.type = "button";
      again.addEventListener("click", regenerate);
      bar.appendChild(again);
    }
  }
  if (m.role === "user" && state.editing !== i && !state.streaming) {
    const edit = el("button", "edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => { state.editing = i; renderMessages(); });
    bar.appendChild(edit);
  }
  if (bar.childElementCount) box.appendChild(bar);
  return box;
}

function editor(conv, m, i) {
  const wrap = el("div", "editor");
  const area = el("textarea", "edit-input");
  area.value = m.content;
  area.rows = Math.min(12, m.content.split("\n").length + 1);
  const save = el("button", "primary edit-send", "Send");
  save.type = "button";
  const cancel = el("button", "edit-cancel", "Cancel");
  cancel.type = "button";
  save.addEventListener("click", () => {
    const text = area.value.trim();
    if (!text) return;
    state.editing = null;
    conv.messages = conv.messages.slice(0, i);
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  });
  cancel.addEventListener("click", () => { state.editing = null; renderMessages(); });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save.click(); }
    if (e.key === "Escape") { e.stopPropagation(); cancel.click(); }
  });
  setTimeout(() => area.focus());
  wrap.append(area, el("div", "row", ""));
  wrap.lastChild.append(cancel, save);
  return wrap;
}

function renderMessages() {
  const box = $("messages");
  const conv = current();
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  box.replaceChildren();
  if (!conv || !conv.messages.length) {
    box.appendChild(welcome());
    return;
  }
  conv.messages.forEach((m, i) => box.appendChild(messageView(conv, m, i)));
  if (atBottom || state.streaming) box.scrollTop = box.scrollHeight;
}

function welcome() {
  const w = el("div", "welcome");
  w.appendChild(el("h2", "", "What can I help with?"));
  w.appendChild(el("p", "", state.models.length ? `Talking to ${state.settings.model || state.models[0]}.` : ""));
  const ideas = el("div", "ideas");
  for (const idea of ["Write a Python function that checks whether a number is prime.",
    "Explain the quadratic formula, with the math.", "Compare lists, tuples and sets in Python as a table."]) {
    const b = el("button", "idea", idea);
    b.type = "button";
    b.addEventListener("click", () => { $("input").value = idea; send(); });
    ideas.appendChild(b);
  }
  w.appendChild(ideas);
  return w;
}

// The streamed reply re-renders at most once a frame, not once per token.
let pending = false;
function scheduleLiveUpdate() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const s = state.streaming;
    if (!s || s.convId !== state.currentId) return;
    const node = $("messages").querySelector(".msg.live .body");
    if (!node) return;
    node.innerHTML = renderMarkdown(s.message.content);
    addCopyButtons(node);
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 160) box.scrollTop = box.scrollHeight;
  });
}

// ---- talking to the server -------------------------------------------------------------------------------
function requestBody(conv) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim() && !conv.messages.some((m) => m.role === "system")) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  return {
    model: s.model || state.models[0], messages, temperature: s.temperature, top_p: s.top_p, top_k: s.top_k,
    max_tokens: s.max_tokens, repetition_penalty: s.repetition_penalty,
  };
}

async function generate(conv) {
  const body = requestBody(conv); // before the reply's placeholder joins the conversation
  const message = { role: "assistant", content: "", stats: {} };
  conv.messages.push(message);
  touch(conv);
  persist();
  const controller = new AbortController();
  state.streaming = { controller, convId: conv.id, message };
  render();
  const t0 = performance.now();
  let first = null;
  try {
    const { usage, finish } = await streamChat(body, controller.signal, (piece) => {
      if (first === null) first = performance.now();
      message.content += piece;
      scheduleLiveUpdate();
    });
    const end = performance.now();
    const tokens = usage?.completion_tokens;
    if (tokens !== undefined) message.stats.tokens = tokens;
    if (first !== null) {
      message.stats.ttft_ms = Math.round(first - t0);
      if (tokens > 1 && end > first) message.stats.tok_s = (tokens - 1) / ((end - first) / 1000);
    }
    if (finish) message.stats.finish = finish;
  } catch (e) {
    if (e.name === "AbortError") {
      message.stats.stopped = true;
      if (first !== null) message.stats.ttft_ms = Math.round(first - t0);
    } else {
      message.stats.error = e.message;
      if (e instanceof APIError && e.status === 401) askForKey(e.message);
    }
  } finally {
    state.streaming = null;
    touch(conv);
    persist();
    render();
  }
}

function send() {
  const input = $("input");
  const text = input.value.trim();
  if (!text || state.streaming) return;
  const conv = ensureCurrent();
  if (!conv.messages.length && conv.title === "New chat") conv.title = shorten(text.replace(/\s+/g, " "), 48);
  conv.messages.push({ role: "user", content: text });
  input.value = "";
  autosize();
  generate(conv);
}

function shorten(text, n) {
  return text.length > n ? `${text.slice(0, n - 1).trimEnd()}…` : text;
}

function stop() {
  state.streaming?.controller.abort(); // the server sees the disconnect and frees the sequence
}

function regenerate() {
  const conv = current();
  if (!conv || state.streaming) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  if (conv.messages.length) generate(conv);
}

// ---- models, API key, settings ---------------------------------------------------------------------------
async function loadModels() {
  try {
    state.models = await listModels();
  } catch (e) {
    if (e instanceof APIError && e.status === 401) return askForKey();
    return toast(`Could not list models: ${e.message}`, true);
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((id) => { const o = el("option", "", id); o.value = id; return o; }));
  if (!state.models.includes(state.settings.model)) state.settings.model = state.models[0] || "";
  select.value = state.settings.model;
  document.body.classList.add("ready");
  render();
}

function askForKey(why) {
  const dialog = $("key-dialog");
  $("key-error").textContent = why && store.loadKey() ? why : "";
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

async function submitKey(e) {
  e.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  store.saveKey(key);
  try {
    await listModels();
  } catch (err) {
    $("key-error").textContent = err.message;
    if (err instanceof APIError && err.status === 401) store.saveKey("");
    return;
  }
  $("key-dialog").close();
  loadModels();
}

const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty"];

function openSettings() {
  const s = state.settings;
  $("set-system").value = s.system;
  for (const k of NUMBERS) $(`set-${k}`).value = s[k];
  $("settings").showModal();
}

function saveSettingsFromForm() {
  const s = state.settings;
  s.system = $("set-system").value;
  for (const k of NUMBERS) {
    const v = Number($(`set-${k}`).value);
    s[k] = $(`set-${k}`).value !== "" && Number.isFinite(v) ? v : store.DEFAULTS[k];
  }
  s.top_k = Math.max(0, Math.round(s.top_k));
  s.max_tokens = Math.max(1, Math.round(s.max_tokens));
  store.saveSettings(s);
}

// ---- server status ---------------------------------------------------------------------------------------
async function pollStatus() {
  if (document.visibilityState !== "visible") return;
  try {
    const s = await serverStatus();
    $("st-running").textContent = s.running ?? "–";
    $("st-queued").textContent = s.queued ?? "–";
    $("st-kv").textContent = s.kvTotal ? `${s.kvUsed} / ${s.kvTotal}` : "–";
    $("st-kv-bar").style.width = s.kvTotal ? `${(100 * s.kvUsed) / s.kvTotal}%` : "0";
    $("status-dot").className = "dot up";
  } catch {
    $("status-dot").className = "dot down";
  }
}

// ---- small things ----------------------------------------------------------------------------------------
let toastTimer;
function toast(text, error) {
  const t = $("toast");
  t.textContent = text;
  t.className = error ? "show error" : "show";
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = ""; }, error ? 6000 : 2500);
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
}

function exportAll() {
  const blob = new Blob([store.exportJSON(state.conversations)], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = `qwen15-chats-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function importFile(e) {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    const added = store.parseImport(await file.text(), new Set(state.conversations.map((c) => c.id)));
    state.conversations.unshift(...added);
    persist();
    select(added[0]?.id || state.currentId);
    toast(`Imported ${added.length} conversation${added.length === 1 ? "" : "s"}`);
  } catch (err) {
    toast(`Import failed: ${err.message}`, true);
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------
function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.streaming && !document.querySelector("dialog[open]")) { e.preventDefault(); stop(); }
  });
  $("messages").addEventListener("click", async (e) => {
    const button = e.target.closest("pre.code button.copy");
    if (!button) return;
    const ok = await copyText(button.closest("pre").querySelector("code").textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  $("new-chat").addEventListener("click", () => {
    const conv = current();
    if (conv && !conv.messages.length) return select(conv.id);
    state.currentId = null;
    ensureCurrent();
    persist();
    $("input").focus();
  });
  $("export").addEventListener("click", exportAll);
  $("import-file").addEventListener("change", importFile);
  $("menu").addEventListener("click", () => document.body.classList.toggle("side-open"));
  $("scrim").addEventListener("click", () => document.body.classList.remove("side-open"));
  $("model").addEventListener("change", (e) => { state.settings.model = e.target.value; store.saveSettings(state.settings); });
  $("settings-button").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", (e) => { if (e.submitter?.value === "save") saveSettingsFromForm(); });
  $("set-defaults").addEventListener("click", () => {
    $("set-system").value = store.DEFAULTS.system;
    for (const k of NUMBERS) $(`set-${k}`).value = store.DEFAULTS[k];
  });
  $("forget-key").addEventListener("click", () => {
    store.saveKey("");
    $("settings").close();
    loadModels();
  });
  $("key-form").addEventListener("submit", submitKey);
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // nothing works without the key
  window.addEventListener("beforeunload", () => { if (state.streaming) persist(); });

  if (!current()) state.currentId = state.conversations[0]?.id || null;
  render();
  loadModels();
  pollStatus();
  setInterval(pollStatus, 2000);
  $("input").focus();
}

init();
