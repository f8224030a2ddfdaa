// The /v1 API as the page uses it: every call carries the key the user entered.

const KEY_NAME = "tuneq.apiKey";

export function getKey() {
  return localStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, message, param);
}

// json: a body sent as JSON; form: a FormData sent as multipart (uploads).
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// Every item of a cursor-paged list (OpenAI's {data, has_more}), following `after`.
export async function allPages(path, { signal, limit = 100, max = 10000 } = {}) {
  const items = [];
  let after = null;
  const sep = path.includes("?") ? "&" : "?";
  while (items.length < max) {
    const q = `${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const page = await api(path + q, { signal });
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return items;
}

// A download that needs the key: a link cannot send a header, so the file is fetched as a blob
// and saved through an object URL.
export async function download(path, filename) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

export class NotAStream extends Error {}

// Server-sent events over fetch(). EventSource cannot send an Authorization header, and a key in
// the query string would end up in access logs, so the stream is read and parsed here.
// Calls onMessage({event, id, data}) per message; resolves when the server ends the stream.
// Throws NotAStream when the server answers with something else (a server without SSE).
// json: POST it as the body (a chat completion with stream: true).
export async function readEventStream(path, onMessage, signal, { json } = {}) {
  const init = { headers: headers({ Accept: "text/event-stream" }), signal };
  if (json !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  const type = resp.headers.get("content-type") || "";
  if (!type.startsWith("text/event-stream") || !resp.body) {
    try { await resp.body?.cancel(); } catch { /* already closed */ }
    throw new NotAStream(type);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { event: "message", id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        if (message.data.length) onMessage({ event: message.event, id: message.id, data: message.data.join("\n") });
        message = { event: "message", id: null, data: [] };
        continue;
      }
      if (line.startsWith(":")) continue; // a keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") message.data.push(val);
      else if (field === "event") message.event = val;
      else if (field === "id") message.id = val;
    }
  }
}
