// This server's queue routes, found by operationId in its /openapi.json, called with the page's
// API key. The status stream is read with fetch, not EventSource: EventSource cannot send the
// Authorization header that a server with FLUX_API_KEYS needs.

import { parseExact, toJson } from "./json.js";

export class ServerError extends Error {
  constructor(status, body, retryAfter) {
    super(typeof body.detail === "string" ? body.detail : body.error_type || `HTTP ${status}`);
    Object.assign(this, { status, body, retryAfter });
  }
}

export class Server {
  constructor(document_, apiKey) {
    this.apiKey = apiKey; // () => the key typed on the page
    this.paths = {};
    for (const [path, item] of Object.entries(document_.paths)) {
      for (const operation of Object.values(item)) this.paths[operation.operationId] = path;
    }
    this.appId = this.paths.run.replace(/^\//, "");
  }

  url(operationId, requestId, query = "") {
    return this.paths[operationId].replace("{request_id}", encodeURIComponent(requestId ?? "")) + query;
  }

  headers(extra = {}) {
    const key = this.apiKey();
    return key ? { Authorization: `Key ${key}`, ...extra } : extra;
  }

  async call(method, url, body) {
    const init = { method, headers: this.headers(body ? { "Content-Type": "application/json" } : {}) };
    if (body) init.body = toJson(body);
    const response = await fetch(url, init);
    return [response, await readJson(response)];
  }

  async submit(args) {
    const [response, body] = await this.call("POST", this.url("submit"), args);
    if (!response.ok) throw errorOf(response, body);
    return body;
  }

  // Calls onStatus with each status body until COMPLETED; returns the last one. Falls back to
  // polling the status route if the stream breaks before the end.
  async follow(requestId, onStatus, signal) {
    let last = null;
    try {
      const response = await fetch(this.url("statusStream", requestId, "?logs=1"), {
        headers: this.headers({ Accept: "text/event-stream" }),
        signal,
      });
      if (!response.ok) throw errorOf(response, await readJson(response));
      for await (const status of serverSentEvents(response.body)) {
        last = status;
        onStatus(status);
        if (status.status === "COMPLETED") return status;
      }
    } catch (error) {
      if (error instanceof ServerError || signal?.aborted) throw error;
    }
    while (!last || last.status !== "COMPLETED") {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const [response, body] = await this.call("GET", this.url("status", requestId, "?logs=1"));
      if (!response.ok && response.status !== 202) throw errorOf(response, body);
      last = body;
      onStatus(body);
    }
    return last;
  }

  async result(requestId) {
    const [response, body] = await this.call("GET", this.url("result", requestId));
    if (!response.ok) throw errorOf(response, body);
    return body;
  }

  async cancel(requestId) {
    const [response, body] = await this.call("PUT", this.url("cancel", requestId));
    if (response.status === 401) throw errorOf(response, body);
    return body; // {status: CANCELLATION_REQUESTED | ALREADY_COMPLETED | NOT_FOUND}
  }
}

async function readJson(response) {
  const text = await response.text();
  try {
    return parseExact(text);
  } catch {
    return { detail: text || response.statusText, error_type: `http_${response.status}` };
  }
}

function errorOf(response, body) {
  return new ServerError(response.status, body, response.headers.get("Retry-After"));
}

// The `data:` payloads of a text/event-stream body, parsed as JSON (comments are keep-alives).
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield parseExact(data);
    }
  }
}

// What a person should read for an error, as the server sent it.
export function describeError(error) {
  if (!(error instanceof ServerError)) return { title: "The request failed", lines: [String(error.message || error)] };
  const { status, body, retryAfter } = error;
  const lines = Array.isArray(body.detail)
    ? body.detail.map((issue) => `${(issue.loc || []).filter((p) => p !== "body").join(".") || "body"}: ${issue.msg}`)
    : [String(body.detail)];
  let title = `${status} ${body.error_type || ""}`.trim();
  if (status === 401) lines.push("This server needs an API key: enter one of its FLUX_API_KEYS in the API key field above.");
  if (status === 429 || status === 503) lines.push(`Retry in ${retryAfter || "a few"} seconds.`);
  if (status === 422) title += " (the fields named below)";
  return { title, lines };
}
