// The playground page: the image and mask (mask-painter.js), the form from /openapi.json
// (schema-form.js), a run through the queue routes with its status stream (server.js), the result,
// "copy as" snippets (snippets.js) and the runs of this visit.

import { MaskPainter } from "./mask-painter.js";
import { SchemaForm, markFieldErrors } from "./schema-form.js";
import { Server, ServerError, describeError } from "./server.js";
import { parseExact } from "./json.js";
import { snippet } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};
const KEY_STORAGE = "flux-playground.api-key";
const STEP = /^step (\d+)\/(\d+)$/;

const page = { server: null, form: null, painter: null, running: null, lang: "curl", runs: [] };

function setupKey() {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, input.value.trim()));
}

function setupImage(painter) {
  const failed = (error) => showError(error);
  $("image-file").addEventListener("change", (e) => e.target.files[0] && painter.loadFile(e.target.files[0]).catch(failed));
  $("mask-file").addEventListener("change", (e) => e.target.files[0] && painter.loadMaskFile(e.target.files[0]).catch(failed));
  $("image-url-use").addEventListener("click", () => $("image-url").value.trim() && painter.loadUrl($("image-url").value.trim()).catch(failed));
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("dragging");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    const text = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
    if (file) painter.loadFile(file).catch(failed);
    else if (text) painter.loadUrl(text.trim()).catch(failed);
  });
  document.addEventListener("paste", (e) => {
    const file = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) {
      e.preventDefault();
      painter.loadFile(file).catch(failed);
    }
  });
  const tools = { brush: $("tool-brush"), eraser: $("tool-eraser") };
  for (const [name, button] of Object.entries(tools)) {
    button.addEventListener("click", () => {
      painter.tool = name;
      for (const [other, b] of Object.entries(tools)) {
        b.classList.toggle("active", other === name);
        b.setAttribute("aria-pressed", String(other === name));
      }
    });
  }
  const size = $("brush-size");
  const setSize = () => {
    painter.size = Number(size.value);
    $("brush-size-value").value = size.value;
  };
  size.addEventListener("input", setSize);
  setSize();
  $("mask-undo").addEventListener("click", () => painter.undo());
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("mask-invert").addEventListener("click", () => painter.invert());
}

// The image and mask as form fields: their value comes from the painter.
function painterWidget(read, describe) {
  const element = el("output", { className: "source-state" });
  return { element, kind: "image", value: read, refresh: () => (element.textContent = describe()) };
}

function refresh() {
  const { painter, widgets } = page;
  for (const widget of widgets) widget.refresh();
  const mask = painter.maskUrl();
  const download = $("mask-download");
  download.hidden = !(mask && mask.startsWith("data:") && painter.canPaint());
  if (!download.hidden) download.href = mask;
  renderSnippet();
}

function renderSnippet() {
  const { painter, form, server } = page;
  const files = {};
  if (painter.source && painter.source.fileName) files.image_url = painter.source.fileName;
  if (painter.maskUrl()) files.mask_url = "mask.png"; // painted: the page offers it for download
  const text = snippet(page.lang, { server: location.origin, appId: server.appId, args: form.values(), files });
  $("snippet").textContent = text;
}

function setupSnippets() {
  for (const tab of document.querySelectorAll(".snippet-tab")) {
    tab.addEventListener("click", () => {
      page.lang = tab.dataset.lang;
      for (const t of document.querySelectorAll(".snippet-tab")) t.classList.toggle("active", t === tab);
      renderSnippet();
    });
  }
  $("copy-snippet").addEventListener("click", async () => {
    await navigator.clipboard.writeText($("snippet").textContent);
    $("copy-snippet").textContent = "Copied";
    setTimeout(() => ($("copy-snippet").textContent = "Copy"), 1500);
  });
}

function setState(text, kind = "") {
  const state = $("run-state");
  state.textContent = text;
  state.dataset.kind = kind;
}

function showError(error) {
  const box = $("error");
  const { title, lines } = describeError(error);
  box.replaceChildren(el("strong", {}, title), el("ul", {}, ...lines.map((line) => el("li", {}, line))));
  box.hidden = false;
  if (error instanceof ServerError && error.status === 422) markFieldErrors($("fields"), error.body.detail);
}

function clearError() {
  $("error").hidden = true;
  markFieldErrors($("fields"), []);
}

function onStatus(status) {
  if (status.status === "IN_QUEUE") setState(`In queue (position ${status.queue_position})`, "queued");
  else if (status.status === "IN_PROGRESS") setState("Running", "running");
  // in time order: the queue's lines and the worker's arrive as two lists
  const logs = [...(status.logs || [])].sort((a, b) => (a.timestamp || "").localeCompare(b.timestamp || ""));
  if (logs.length) $("logs").textContent = logs.map((l) => `${(l.timestamp || "").slice(11, 19)} ${l.message}`).join("\n");
  $("logs").scrollTop = $("logs").scrollHeight;
  const steps = logs.map((l) => STEP.exec(l.message)).filter(Boolean).pop();
  if (steps) $("progress").value = Number(steps[1]) / Number(steps[2]);
}

async function run(event) {
  event.preventDefault();
  if (page.running) return;
  clearError();
  const args = page.form.values();
  const started = performance.now();
  const entry = { args, output: null, error: null, when: new Date() };
  page.running = { requestId: null };
  $("submit").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("progress").removeAttribute("data-done");
  $("logs").textContent = "";
  setState("Submitting");
  try {
    const queued = await page.server.submit(args);
    page.running.requestId = queued.request_id;
    onStatus(queued);
    await page.server.follow(queued.request_id, onStatus);
    entry.output = await page.server.result(queued.request_id);
    $("progress").value = 1;
    $("progress").dataset.done = "true";
    setState(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`, "done");
    showResult(entry);
  } catch (error) {
    entry.error = error;
    const cancelled = error instanceof ServerError && error.body.error_type === "request_cancelled";
    setState(cancelled ? "Cancelled" : "Failed", cancelled ? "cancelled" : "failed");
    showError(error);
  } finally {
    page.running = null;
    $("submit").disabled = false;
    $("cancel").disabled = true;
    addToHistory(entry);
  }
}

async function cancel() {
  const running = page.running;
  if (!running || !running.requestId) return;
  $("cancel").disabled = true;
  try {
    const answer = await page.server.cancel(running.requestId);
    // The run may have ended while the cancel was on its way (it stops at its next step): its own
    // final state ("Cancelled", "Done") stands then, not "Cancelling".
    if (page.running !== running) return;
    setState(answer.status === "CANCELLATION_REQUESTED" ? "Cancelling" : answer.status, "cancelling");
  } catch (error) {
    showError(error);
  }
}

function showResult(entry) {
  const { output } = entry;
  const figures = output.images.map((image, index) =>
    el(
      "figure",
      {},
      el("img", { src: image.url, alt: `output ${index + 1}`, className: "output" }),
      el(
        "figcaption",
        {},
        el("span", {}, `${image.width}×${image.height} · seed ${typeof output.seed === "bigint" ? output.seed + BigInt(index) : output.seed + index} · `),
        el("span", { className: output.has_nsfw_concepts[index] ? "nsfw flagged" : "nsfw" }, output.has_nsfw_concepts[index] ? "NSFW: flagged" : "NSFW: no"),
        " · ",
        el("a", { href: image.url, download: image.file_name, className: "download" }, "Download"),
      ),
    ),
  );
  const timings = el(
    "dl",
    { className: "timings" },
    ...Object.entries(output.timings).flatMap(([stage, seconds]) => [el("dt", {}, stage), el("dd", {}, `${seconds.toFixed(2)} s`)]),
  );
  $("result").replaceChildren(el("div", { className: "figures" }, ...figures), el("div", { className: "facts" }, el("p", {}, `seed ${output.seed}`), timings));
}

function addToHistory(entry) {
  page.runs.push(entry);
  const { args, output, error } = entry;
  const summary = `${args.num_inference_steps ?? "default"} steps · seed ${output ? output.seed : args.seed ?? "random"}`;
  const item = el(
    "li",
    { className: output ? "ok" : "failed" },
    output ? el("img", { src: output.images[0].url, alt: "", className: "thumb" }) : el("span", { className: "thumb none" }, "×"),
    el(
      "div",
      {},
      el("strong", {}, (args.prompt || "(no prompt)").slice(0, 60)),
      el("small", {}, `${entry.when.toLocaleTimeString()} · ${summary} · ${output ? `${output.timings.total?.toFixed(2) ?? "?"} s` : describeError(error).title}`),
    ),
  );
  if (output) {
    item.tabIndex = 0;
    item.title = "show this result";
    item.addEventListener("click", () => showResult(entry));
  }
  $("history").prepend(item);
}

async function main() {
  setupKey();
  const painter = new MaskPainter({
    stage: $("stage"),
    image: $("image-preview"),
    canvas: $("mask-canvas"),
    hint: $("stage-hint"),
    note: $("stage-note"),
    onChange: () => page.form && refresh(),
  });
  page.painter = painter;
  setupImage(painter);
  setupSnippets();
  const response = await fetch("/openapi.json");
  const document_ = parseExact(await response.text());
  page.server = new Server(document_, () => $("api-key").value.trim());
  $("app-id").textContent = page.server.appId;
  const image = painterWidget(() => painter.imageUrl(), () => painter.describeImage());
  const mask = painterWidget(() => painter.maskUrl(), () => painter.describeMask());
  page.widgets = [image, mask];
  page.form = new SchemaForm($("fields"), document_, "InpaintRequest", { image_url: image, mask_url: mask });
  const form = $("request-form");
  form.addEventListener("input", renderSnippet);
  form.addEventListener("change", renderSnippet);
  form.addEventListener("click", (e) => e.target.matches(".add-row, .remove-row") && setTimeout(renderSnippet));
  form.addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  refresh();
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  showError(error);
  document.body.dataset.ready = "failed";
});
