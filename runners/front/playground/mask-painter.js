// The input image and the mask painted over it. The mask canvas has the image's own pixel size
// (whatever size it is shown at), so the mask sent is the image's size: painted pixels white
// (repaint), the rest black (keep). Pointer events paint, so mouse, pen and touch all work.

const PAINT = "rgb(255, 40, 150)"; // shown at the canvas's CSS opacity; only alpha is exported
const UNDO_DEPTH = 30;

export class MaskPainter {
  constructor({ stage, image, canvas, hint, note, onChange }) {
    Object.assign(this, { stage, image, canvas, hint, note, onChange });
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.source = null; // {url, fileName, width, height}: what image_url sends and snippets name
    this.uploadedMask = null; // a mask file's data URI, when there is no image in the page to paint on
    this.tool = "brush";
    this.size = 24;
    this.undoStack = [];
    this.painted = false;
    this.maskCache = null; // the exported mask, until the next change
    this.last = null;
    for (const type of ["pointerdown", "pointermove", "pointerup", "pointercancel"]) {
      canvas.addEventListener(type, (event) => this[type](event));
    }
  }

  // An image file (upload, drop, paste): sent inline as a data URI, painted on in the page.
  async loadFile(file) {
    const url = await readAsDataUrl(file);
    await this.show(url, file.name || "image.png", url);
  }

  // An image URL: the server fetches it. The page loads it only from its own origin (its
  // Content-Security-Policy allows nothing else), so a mask can be painted on those; for other
  // hosts, upload a mask instead.
  async loadUrl(text) {
    const url = new URL(text, location.href);
    if (url.origin === location.origin || url.protocol === "data:") {
      await this.show(url.href, null, url.href);
    } else {
      this.reset();
      this.source = { url: url.href, fileName: null, width: null, height: null };
      this.setNote(`The server fetches ${url.host}; this page loads nothing from other hosts, so there is no preview to paint on: upload a mask.`);
      this.onChange();
    }
  }

  async show(previewUrl, fileName, url) {
    const image = this.image;
    await new Promise((resolve, reject) => {
      image.onload = resolve;
      image.onerror = () => reject(new Error("this browser cannot decode that image"));
      image.src = previewUrl;
    });
    this.reset();
    const [width, height] = [image.naturalWidth, image.naturalHeight];
    this.source = { url, fileName, width, height };
    Object.assign(this.canvas, { width, height });
    image.hidden = this.canvas.hidden = false;
    this.hint.hidden = true;
    this.stage.classList.remove("empty");
    this.setNote(`${width}×${height}: paint the region to repaint. The mask is sent at this size.`);
    this.onChange();
  }

  reset() {
    this.undoStack = [];
    this.painted = false;
    this.maskCache = null;
    this.uploadedMask = null;
    this.image.hidden = this.canvas.hidden = true;
    this.hint.hidden = false;
    this.stage.classList.add("empty");
  }

  setNote(text) {
    this.note.textContent = text;
  }

  canPaint() {
    return this.source !== null && this.source.width !== null;
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    };
  }

  pointerdown(event) {
    if (!this.canPaint() || event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.snapshot();
    this.last = this.point(event);
    this.stroke([this.last]);
  }

  pointermove(event) {
    if (!this.last) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    this.stroke((events.length ? events : [event]).map((e) => this.point(e)));
  }

  pointerup() {
    if (!this.last) return;
    this.last = null;
    this.changed();
  }

  pointercancel() {
    this.pointerup();
  }

  // Round-capped segments from the last point through `points`, in image pixels.
  stroke(points) {
    const ctx = this.ctx;
    ctx.save();
    ctx.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    Object.assign(ctx, { strokeStyle: PAINT, fillStyle: PAINT, lineWidth: this.size, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(this.last.x, this.last.y);
    for (const p of points) ctx.lineTo(p.x, p.y);
    if (points.length === 1 && points[0] === this.last) ctx.lineTo(this.last.x + 0.01, this.last.y); // a dot
    ctx.stroke();
    ctx.restore();
    this.last = points[points.length - 1];
  }

  snapshot() {
    this.undoStack.push(this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height));
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
  }

  changed() {
    this.painted = true;
    this.maskCache = null;
    this.onChange();
  }

  undo() {
    const previous = this.undoStack.pop();
    if (previous) {
      this.ctx.putImageData(previous, 0, 0);
      this.changed();
    }
  }

  clear() {
    if (!this.canPaint()) return;
    this.snapshot();
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.changed();
  }

  invert() {
    if (!this.canPaint()) return;
    this.snapshot();
    this.mapPixels((alpha) => 255 - alpha);
    this.changed();
  }

  // A mask file: drawn onto the canvas (stretched to the image) when there is one, where it can
  // be painted on further; otherwise sent as it is.
  async loadMaskFile(file) {
    const url = await readAsDataUrl(file);
    if (!this.canPaint()) {
      this.uploadedMask = url;
      this.setNote(`Mask ${file.name} uploaded; it is sent as it is.`);
      this.onChange();
      return;
    }
    const mask = new Image();
    await new Promise((resolve, reject) => {
      mask.onload = resolve;
      mask.onerror = () => reject(new Error("this browser cannot decode that mask"));
      mask.src = url;
    });
    this.snapshot();
    const { width, height } = this.canvas;
    this.ctx.clearRect(0, 0, width, height);
    this.ctx.drawImage(mask, 0, 0, width, height);
    // luminance to paint: white repaints, as the server reads it
    const data = this.ctx.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const light = (0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2]) * (px[i + 3] / 255);
      px[i + 3] = light >= 128 ? 255 : 0;
    }
    this.ctx.putImageData(data, 0, 0);
    this.mapPixels((alpha) => alpha); // recolour to the paint colour
    this.changed();
  }

  mapPixels(alphaOf) {
    const { width, height } = this.canvas;
    const data = this.ctx.getImageData(0, 0, width, height);
    const px = data.data;
    const [r, g, b] = PAINT.match(/\d+/g).map(Number);
    for (let i = 0; i < px.length; i += 4) {
      px[i] = r;
      px[i + 1] = g;
      px[i + 2] = b;
      px[i + 3] = alphaOf(px[i + 3]);
    }
    this.ctx.putImageData(data, 0, 0);
  }

  imageUrl() {
    return this.source ? this.source.url : undefined;
  }

  // The mask as a PNG data URI at the image's size, or undefined when nothing was painted or uploaded.
  maskUrl() {
    if (!this.canPaint()) return this.uploadedMask ?? undefined;
    if (!this.painted) return undefined;
    if (this.maskCache) return this.maskCache;
    const { width, height } = this.canvas;
    const out = Object.assign(document.createElement("canvas"), { width, height });
    const outCtx = out.getContext("2d");
    const data = this.ctx.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const value = px[i + 3] >= 128 ? 255 : 0;
      px[i] = px[i + 1] = px[i + 2] = value;
      px[i + 3] = 255;
    }
    outCtx.putImageData(data, 0, 0);
    this.maskCache = out.toDataURL("image/png");
    return this.maskCache;
  }

  describeImage() {
    if (!this.source) return "none yet: upload, drop, paste or give a URL on the left";
    const size = this.source.width ? `${this.source.width}×${this.source.height}` : "size unknown";
    return this.source.fileName ? `${this.source.fileName} (${size}, sent inline)` : `${this.source.url.slice(0, 80)} (${size})`;
  }

  describeMask() {
    if (this.uploadedMask) return "uploaded mask (sent as it is)";
    if (!this.canPaint()) return "none yet";
    return this.painted ? `painted, ${this.canvas.width}×${this.canvas.height} (sent inline)` : "none yet: paint over the image";
  }
}

export function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
