// The official @fal-ai/client against a real server, run by tests/test_js_client.py after the
// README's snippet (which configures `fal` with its requestMiddleware, and runs fal.subscribe).
// Each check prints one JSON line, `{"check": name, ...facts}`, for the Python test to judge; an
// exception fails the run (node exits non-zero).

import { fal, ApiError } from "@fal-ai/client";
import { readFileSync } from "node:fs";
import assert from "node:assert/strict";

const APP = "fal-ai/flux-lora/inpainting";
const example = JSON.parse(readFileSync(new URL("../../examples/request.json", import.meta.url)));
const { sync_mode, ...base } = example;
const FAST = { ...base, num_inference_steps: 3 };
const SLOW = { ...base, image_size: "square_hd", num_inference_steps: 50, strength: 1.0 }; // long on the tiny model
const SLOW_PROMPT = "take your time"; // tests/faults/sitecustomize.py: each step of such a request sleeps 0.3 s or more

const report = (check, facts) => console.log(JSON.stringify({ check, ...facts }));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(requestId, wanted) {
  for (let i = 0; i < 600; i++) {
    const status = await fal.queue.status(APP, { requestId, logs: true });
    if (wanted.includes(status.status)) return status;
    await sleep(200);
  }
  throw new Error(`${requestId} never reached ${wanted}`);
}

// fal.subscribe, polling, with logs: progress ("step i/N") seen through onQueueUpdate
{
  const updates = [];
  const result = await fal.subscribe(APP, {
    input: { ...FAST, seed: 5 },
    logs: true,
    onQueueUpdate: (update) => updates.push(update),
  });
  const steps = updates.flatMap((u) => (u.logs || []).map((l) => l.message)).filter((m) => /^step \d+\/\d+$/.test(m));
  report("subscribe", {
    statuses: [...new Set(updates.map((u) => u.status))],
    steps: [...new Set(steps)],
    seed: result.data.seed,
    size: [result.data.images[0].width, result.data.images[0].height],
    url: result.data.images[0].url,
    requestId: result.requestId,
  });
}

// fal.subscribe in streaming mode: the status stream drives onQueueUpdate. Its steps sleep (the
// server runs tests/faults): 4 steps of 0.3 s or more, longer than the stream's and the progress
// poll's intervals on any CPU, so updates arrive while it runs, not only the final one.
{
  const updates = [];
  const result = await fal.subscribe(APP, {
    input: { ...FAST, num_inference_steps: 4, prompt: `${FAST.prompt}, ${SLOW_PROMPT}` },
    logs: true,
    mode: "streaming",
    // A copy of each update as it arrives: in streaming mode the client hands every update the same
    // logs array, which it keeps appending to, so read afterwards they would all hold every line.
    onQueueUpdate: (update) => updates.push({ status: update.status, logs: [...(update.logs || [])] }),
  });
  const steps = (some) => some.flatMap((u) => (u.logs || []).map((l) => l.message)).filter((m) => /^step \d+\/\d+$/.test(m));
  report("subscribe_streaming", {
    statuses: [...new Set(updates.map((u) => u.status))],
    steps: [...new Set(steps(updates))],
    stepsWhileInProgress: [...new Set(steps(updates.filter((u) => u.status === "IN_PROGRESS")))],
    images: result.data.images.length,
  });
}

// fal.run: the synchronous route
{
  const result = await fal.run(APP, { input: { ...FAST, seed: 9, num_images: 2 } });
  report("run", { seed: result.data.seed, images: result.data.images.length, requestId: result.requestId });
}

// fal.queue.submit, then status (with logs) and result
{
  const { request_id: requestId, status } = await fal.queue.submit(APP, { input: FAST });
  const done = await waitFor(requestId, ["COMPLETED"]);
  const result = await fal.queue.result(APP, { requestId });
  report("queue", {
    submitted: status,
    completed: done.status,
    logs: done.logs.map((l) => l.message),
    requestId: result.requestId === requestId,
    images: result.data.images.length,
  });
}

// fal.queue.streamStatus: the status stream, until COMPLETED
{
  const { request_id: requestId } = await fal.queue.submit(APP, { input: FAST });
  const stream = await fal.queue.streamStatus(APP, { requestId, logs: true });
  const seen = [];
  stream.on("data", (status) => seen.push(status.status));
  const last = await stream.done();
  report("stream_status", { seen: [...new Set(seen)], last: last.status });
}

// fal.queue.cancel of a running request: its status ends COMPLETED with the error, its result is the error
{
  const { request_id: requestId } = await fal.queue.submit(APP, { input: SLOW });
  await waitFor(requestId, ["IN_PROGRESS", "COMPLETED"]);
  await fal.queue.cancel(APP, { requestId });
  const done = await waitFor(requestId, ["COMPLETED"]);
  let error = null;
  try {
    await fal.queue.result(APP, { requestId });
  } catch (e) {
    assert.ok(e instanceof ApiError, String(e));
    error = { status: e.status, error_type: e.body?.error_type };
  }
  report("cancel", { error_type: done.error_type, error: done.error, result_error: error });
}
