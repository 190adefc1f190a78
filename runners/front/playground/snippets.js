// "Copy as": the page's arguments as curl, Python (fal_client) and JavaScript (@fal-ai/client)
// pointed at this server, in the README's style. Inline images are read from local files (an
// uploaded image by its file name; a painted mask as mask.png, which the page lets you download),
// and the key comes from FAL_KEY, never from the page.

import { toJson } from "./json.js";

// `files` maps an argument holding an inline image to the local file a snippet reads it from.
export function snippet(lang, { server, appId, args, files }) {
  const parts = Object.entries(args).map(([name, value]) => [name, files[name] ? { file: files[name] } : value]);
  return { curl, python, javascript }[lang](server, appId, parts);
}

function curl(server, appId, parts) {
  // An unquoted heredoc: $(base64 ...) runs, and \ $ ` in the JSON are escaped to stay literal.
  const body = parts
    .map(([name, value]) => {
      const json = value && value.file ? `"data:${mediaType(value.file)};base64,$(base64 -w0 ${shellWord(value.file)})"` : escapeHeredoc(inlineJson(value));
      return `  ${JSON.stringify(name)}: ${json}`;
    })
    .join(",\n");
  return [
    "# export FAL_KEY=<key>  (only if the server has FLUX_API_KEYS)",
    `curl -s -X POST ${server}/${appId} \\`,
    "  -H 'Content-Type: application/json' \\",
    '  -H "Authorization: Key $FAL_KEY" \\',
    "  -d @- <<EOF",
    `{\n${body}\n}`,
    "EOF",
  ].join("\n");
}

function python(server, appId, parts) {
  const lines = parts.map(([name, value]) => `        ${JSON.stringify(name)}: ${value && value.file ? `fal_client.encode_file(${JSON.stringify(value.file)})` : pythonLiteral(value)},`);
  return [
    "import os",
    "",
    "import fal_client, fal_client.client",
    "",
    `fal_client.client.RUN_URL_FORMAT = "${server}/"  # fal_client.run`,
    `fal_client.client.QUEUE_URL_FORMAT = "${server}/queue/"  # submit / subscribe / status / result / cancel`,
    'client = fal_client.SyncClient(key=os.environ.get("FAL_KEY", "none"))  # the server\'s key, if it has FLUX_API_KEYS',
    "",
    "result = client.subscribe(",
    `    ${JSON.stringify(appId)},`,
    "    arguments={",
    ...lines,
    "    },",
    "    with_logs=True,",
    "    on_queue_update=lambda update: print(update),",
    ")",
    'print(result["images"][0]["url"])',
  ].join("\n");
}

function javascript(server, appId, parts) {
  const anyFile = parts.some(([, value]) => value && value.file);
  const lines = parts.map(([name, value]) => {
    const js = value && value.file ? `dataUri(${JSON.stringify(value.file)})` : inlineJson(value);
    return `    ${/^[A-Za-z_$][\w$]*$/.test(name) ? name : JSON.stringify(name)}: ${js},`;
  });
  return [
    'import { fal } from "@fal-ai/client";',
    ...(anyFile ? ['import { readFileSync } from "node:fs";'] : []),
    "",
    `const SERVER = "${server}";`,
    "fal.config({",
    '  credentials: process.env.FAL_KEY ?? "none", // the server\'s key, if it has FLUX_API_KEYS',
    "  requestMiddleware: async (request) => {",
    "    const url = new URL(request.url);               // https://fal.run/... or https://queue.fal.run/...",
    '    const prefix = url.hostname.startsWith("queue.") ? "/queue" : "";',
    "    return { ...request, url: `${SERVER}${prefix}${url.pathname}${url.search}` };",
    "  },",
    "});",
    ...(anyFile
      ? ["", "const dataUri = (path) =>", '  `data:${path.endsWith(".png") ? "image/png" : "image/jpeg"};base64,${readFileSync(path).toString("base64")}`;']
      : []),
    "",
    `const result = await fal.subscribe(${JSON.stringify(appId)}, {`,
    "  input: {",
    ...lines,
    "  },",
    "  logs: true,",
    "  onQueueUpdate: (update) => console.log(update.status),",
    "});",
    "console.log(result.data.images[0].url);",
  ].join("\n");
}

// JSON on one line, spaced as people write it: {"path": "x", "scale": 0.5}
function inlineJson(value) {
  if (Array.isArray(value)) return `[${value.map(inlineJson).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${inlineJson(v)}`).join(", ")}}`;
  }
  return toJson(value);
}

function mediaType(file) {
  const ext = file.split(".").pop().toLowerCase();
  return { png: "image/png", webp: "image/webp", gif: "image/gif", avif: "image/avif" }[ext] || "image/jpeg";
}

function shellWord(text) {
  return /^[\w./-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
}

function escapeHeredoc(text) {
  return text.replace(/[\\$`]/g, (c) => `\\${c}`);
}

function pythonLiteral(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "bigint") return value.toString();
  if (Array.isArray(value)) return `[${value.map(pythonLiteral).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pythonLiteral(v)}`).join(", ")}}`;
  return JSON.stringify(value); // numbers, and strings (JSON's escapes are Python's)
}
