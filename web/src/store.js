// Conversations and settings, kept in this browser's localStorage.
const CONVERSATIONS = "qwen15.conversations";
const CURRENT = "qwen15.current";
const SETTINGS = "qwen15.settings";
const KEY = "qwen15.apiKey";

// Qwen's recommended sampling (its generation_config.json), and a reply length that fits a chat.
export const DEFAULTS = Object.freeze({
  system: "", temperature: 0.7, top_p: 0.8, top_k: 20, max_tokens: 1024, repetition_penalty: 1.05, model: "",
});

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

export function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter((c) => validConversation(c) === null) : [];
}

export function saveConversations(list) {
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
    return true;
  } catch {
    return false; // quota: the caller says so
  }
}

export const loadCurrent = () => localStorage.getItem(CURRENT);
export const saveCurrent = (id) => (id ? localStorage.setItem(CURRENT, id) : localStorage.removeItem(CURRENT));
export const loadSettings = () => ({ ...DEFAULTS, ...read(SETTINGS, {}) });
export const saveSettings = (s) => localStorage.setItem(SETTINGS, JSON.stringify(s));
export const loadKey = () => localStorage.getItem(KEY) || "";
export const saveKey = (k) => (k ? localStorage.setItem(KEY, k) : localStorage.removeItem(KEY));

const ROLES = new Set(["system", "user", "assistant"]);

/** null when c is a conversation this page can show, else what is wrong with it. */
function validConversation(c) {
  if (!c || typeof c !== "object" || Array.isArray(c)) return "is not an object";
  if (c.title !== undefined && typeof c.title !== "string") return "title must be a string";
  if (!Array.isArray(c.messages)) return "messages must be a list";
  for (let i = 0; i < c.messages.length; i++) {
    const m = c.messages[i];
    if (!m || typeof m !== "object") return `messages[${i}] is not an object`;
    if (!ROLES.has(m.role)) return `messages[${i}].role must be system, user or assistant`;
    if (typeof m.content !== "string") return `messages[${i}].content must be a string`;
  }
  return null;
}

/** Conversations from an export file (ours, a list of conversations, or one conversation); throws on bad data. */
export function parseImport(text, existingIds) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error(`the file is not JSON (${e.message})`);
  }
  const list = Array.isArray(data) ? data : Array.isArray(data?.conversations) ? data.conversations
    : data && Array.isArray(data.messages) ? [data] : null;
  if (!list) throw new Error("expected a qwen15 export: {\"conversations\": [{\"title\", \"messages\": [...]}]}");
  return list.map((c, i) => {
    const why = validConversation(c);
    if (why) throw new Error(`conversations[${i}] ${why}`);
    const id = typeof c.id === "string" && c.id && !existingIds.has(c.id) ? c.id : newId();
    existingIds.add(id);
    // Keep only the fields this page knows: nothing else from the file is carried along.
    const messages = c.messages.map((m) => {
      const out = { role: m.role, content: m.content };
      if (m.stats && typeof m.stats === "object") {
        const s = {};
        for (const k of ["tokens", "ttft_ms", "tok_s"]) if (Number.isFinite(m.stats[k])) s[k] = m.stats[k];
        if (m.stats.stopped === true) s.stopped = true;
        out.stats = s;
      }
      return out;
    });
    const updated = Number.isFinite(c.updated) ? c.updated : Date.now();
    return { id, title: (c.title || "Imported chat").slice(0, 200), messages, created: updated, updated };
  });
}

export function exportJSON(list) {
  return JSON.stringify({ format: "qwen15-chat", version: 1, exported: new Date().toISOString(), conversations: list }, null, 2);
}
