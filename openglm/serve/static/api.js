// Calls to the server's API with the signed-in key, and what their errors mean to a person.
import { t } from "./i18n.js";

const KEY = "openglm-key";  // sessionStorage: gone when the tab closes, never in a URL

export function getKey() { return sessionStorage.getItem(KEY) || ""; }
export function setKey(secret) { sessionStorage.setItem(KEY, secret); }
export function clearKey() { sessionStorage.removeItem(KEY); }

// An answer that was not 2xx, with the API's error object; `kind` says what a person should be told.
export class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type;
    this.code = error.code;
    this.retryAfter = Number(headers && headers.get("retry-after")) || null;
    this.kind = kindOf(status, error);
  }
}

// A fetch that never reached an answer (server down, network gone), or a stream cut in the middle.
export class NetworkError extends Error {
  constructor(midStream) {
    super(midStream ? "connection lost mid-stream" : "network error");
    this.kind = midStream ? "midStream" : "network";
  }
}

function kindOf(status, error) {
  if (status === 401) {
    if (/revoked|expired/.test(error.message || "")) return "revoked";
    if (/malformed/.test(error.message || "")) return "malformedKey";
    return "badKey";
  }
  if (status === 429) return error.type === "insufficient_quota" || error.code === "insufficient_quota"
    ? "balance" : "rateLimited";
  if (status >= 500) return "server";
  return "other";
}

// The message to show for any error thrown by `api`, `stream` or the code around them.
export function describe(error) {
  if (error instanceof ApiError) {
    return t("err." + error.kind, {status: error.status, message: error.message, seconds: error.retryAfter || 1});
  }
  if (error instanceof NetworkError) return t("err." + error.kind);
  return String(error && error.message || error);
}

async function request(path, {method = "GET", body, signal, key = getKey()} = {}) {
  const headers = {"Authorization": "Bearer " + key};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                  signal, cache: "no-store"});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new NetworkError(false);
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new ApiError(response.status, data, response.headers);
  }
  return response;
}

// A JSON API call: resolves to the parsed body; rejects with ApiError or NetworkError.
export async function api(path, options = {}) {
  const response = await request(path, options);
  return response.json();
}

// A streamed call (server-sent events): calls onEvent with each JSON event until [DONE].
// Aborting `signal` ends it with an AbortError; a connection cut before [DONE] is a NetworkError.
export async function stream(path, body, onEvent, signal) {
  const response = await request(path, {method: "POST", body, signal});
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError" || (signal && signal.aborted)) throw new DOMException("stopped", "AbortError");
      throw new NetworkError(true);
    }
    if (chunk.done) throw new NetworkError(true);  // the server always ends with [DONE]
    buffer += chunk.value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed, null);
        onEvent(parsed);
      }
    }
  }
}
