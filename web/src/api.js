// The server's own OpenAI-compatible API, relative to the page (so a reverse proxy's sub-path works).
import { loadKey } from "./store.js";

export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = loadKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch { /* not JSON */ }
  return new APIError(response.status, message);
}

export async function listModels() {
  const r = await fetch("v1/models", { headers: headers() });
  if (!r.ok) throw await failure(r);
  return (await r.json()).data.map((m) => m.id);
}

/** Streams a chat completion: onText(piece) per content delta; resolves with the usage (or null). */
export async function streamChat(body, signal, onText) {
  const r = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // server-sent events: "data: {json}\n\n"
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { usage, finish };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(500, chunk.error.message || "the server failed");
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) onText(choice.delta.content);
        if (choice?.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return { usage, finish };
}

/** The few gauges of /metrics (Prometheus text) the status view shows. */
export async function serverStatus() {
  const r = await fetch("metrics");
  if (!r.ok) throw await failure(r);
  const values = {};
  for (const line of (await r.text()).split("\n")) {
    const m = /^(qwen15_[a-z_]+) ([0-9.eE+-]+)$/.exec(line);
    if (m) values[m[1]] = Number(m[2]);
  }
  return {
    running: values.qwen15_running_sequences, queued: values.qwen15_queue_depth,
    kvUsed: values.qwen15_kv_blocks_used, kvTotal: values.qwen15_kv_blocks_total,
  };
}
