// The request form, built from the server's /openapi.json: one field per property of the request
// schema, with its default, bounds and description, so the page follows the schema as it changes.
// Values are sent as typed, unchecked: the server validates, and its 422 is shown on the field.

import { integer, toJson } from "./json.js";

const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

export class SchemaForm {
  // `custom` maps a property name to a widget {element, value(), describe?} (the image and mask).
  constructor(container, document_, schemaName, custom = {}) {
    this.doc = document_;
    this.schema = this.resolve({ $ref: `#/components/schemas/${schemaName}` });
    this.custom = custom;
    this.readers = {}; // name -> () => value or undefined (unset)
    container.replaceChildren(...this.fields(this.schema, [], this.readers));
  }

  resolve(schema) {
    while (schema && schema.$ref) {
      const path = schema.$ref.replace(/^#\//, "").split("/");
      schema = path.reduce((node, part) => node[part], this.doc);
    }
    return schema;
  }

  // [non-null variants, nullable] of a property schema
  variants(schema) {
    const options = (schema.anyOf || schema.oneOf || [schema]).map((s) => this.resolve(s));
    const real = options.filter((s) => s.type !== "null");
    return [real, real.length < options.length];
  }

  fields(schema, path, readers) {
    const required = new Set(schema.required || []);
    return Object.entries(schema.properties || {}).map(([name, property]) =>
      this.field(name, property, [...path, name], required.has(name), readers),
    );
  }

  field(name, property, path, required, readers) {
    const id = `field-${path.join("-")}`;
    const [variants, nullable] = this.variants(property);
    const widget = this.custom[path.join(".")] || this.control(id, property, variants, nullable, path);
    // A top-level value equal to its default is left out: the request and its snippets say only what differs.
    const isDefault = (v) => path.length === 1 && "default" in property && toJson(v) === toJson(property.default);
    readers[name] = () => {
      const value = widget.value();
      return isDefault(value) ? undefined : value;
    };
    const label = el("label", { htmlFor: id, className: "field-name" }, property.title || name, " ", el("code", {}, name));
    const meta = el("small", { className: "meta" }, this.metaText(property, variants, required));
    const description = property.description ? el("small", { className: "description" }, property.description) : null;
    const error = el("small", { className: "field-error", hidden: true });
    const box = el("div", { className: `field field-${widget.kind || "plain"}` }, label, widget.element, meta, description, error);
    box.dataset.field = path.join(".");
    return box;
  }

  metaText(property, variants, required) {
    const parts = [];
    if (required) parts.push("required");
    if ("default" in property) parts.push(`default ${property.default === null ? "unset" : toJson(property.default)}`);
    for (const variant of variants) parts.push(...bounds(variant));
    return parts.join(" · ");
  }

  // A control for one property: {element, value(), kind}
  control(id, property, variants, nullable, path) {
    if (variants.length > 1) return this.choice(id, property, variants, nullable, path);
    const schema = variants[0];
    const initial = property.default ?? schema.default;
    if (schema.enum) return this.select(id, schema.enum, initial, nullable);
    if (schema.type === "boolean") {
      const input = el("input", { id, type: "checkbox", checked: Boolean(initial) });
      return { element: input, kind: "boolean", value: () => input.checked };
    }
    if (schema.type === "integer" || schema.type === "number") {
      const input = el("input", { id, type: "number", step: schema.type === "integer" ? "1" : "any" });
      if (initial !== undefined && initial !== null) input.value = initial;
      if (nullable) input.placeholder = "unset";
      for (const [attr, key] of [["min", "minimum"], ["max", "maximum"]]) if (key in schema) input[attr] = schema[key];
      const parse = schema.type === "integer" ? integer : Number;
      return { element: input, kind: "number", value: () => (input.value.trim() === "" ? undefined : parse(input.value)) };
    }
    if (schema.type === "array" && schema.items) return this.rows(id, this.resolve(schema.items), path);
    if (schema.type === "object" && schema.properties) {
      const readers = {};
      const element = el("div", { id, className: "nested" }, ...this.fields(schema, path, readers));
      return { element, kind: "object", value: () => collect(readers) };
    }
    const long = (schema.maxLength || Infinity) > 200;
    const input = el(long ? "textarea" : "input", { id, rows: 3 });
    if (typeof initial === "string") input.value = initial;
    return { element: input, kind: "text", value: () => (input.value === "" ? undefined : input.value) };
  }

  select(id, values, initial, nullable) {
    const select = el("select", { id });
    if (nullable) select.append(el("option", { value: "" }, "(unset)"));
    for (const value of values) select.append(el("option", { value: String(value) }, String(value)));
    select.value = initial === null || initial === undefined ? "" : String(initial);
    return { element: select, kind: "select", value: () => (select.value === "" ? undefined : select.value) };
  }

  // Several shapes (image_size: a preset name or {width, height}): pick a shape, then its value.
  choice(id, property, variants, nullable, path) {
    const select = el("select", { id });
    const panes = [];
    if (nullable) select.append(el("option", { value: "" }, "(unset)"));
    variants.forEach((variant, index) => {
      if (variant.enum) {
        for (const value of variant.enum) select.append(el("option", { value: `e:${value}` }, String(value)));
      } else {
        const inner = this.control(`${id}-${index}`, variant, [variant], false, path);
        const pane = el("div", { className: "choice-pane", hidden: true }, inner.element);
        panes.push([`v:${index}`, pane, inner]);
        select.append(el("option", { value: `v:${index}` }, variant.title || variant.type));
      }
    });
    const show = () => panes.forEach(([key, pane]) => (pane.hidden = select.value !== key));
    select.addEventListener("change", show);
    const initial = property.default;
    select.value = initial === null || initial === undefined ? "" : `e:${initial}`;
    show();
    const element = el("div", { className: "choice" }, select, ...panes.map(([, pane]) => pane));
    const value = () => {
      if (select.value === "") return undefined;
      if (select.value.startsWith("e:")) return select.value.slice(2);
      return panes.find(([key]) => key === select.value)[2].value();
    };
    return { element, kind: "choice", value };
  }

  // A list of objects (loras): rows of the item's fields, added and removed.
  rows(id, item, path) {
    const list = el("div", { className: "rows" });
    const rows = [];
    const add = el("button", { type: "button", className: "add-row" }, `Add ${item.title || "item"}`);
    add.addEventListener("click", () => {
      const readers = {};
      const index = rows.length;
      const remove = el("button", { type: "button", className: "remove-row", title: "remove" }, "Remove");
      const row = el("div", { className: "row" }, ...this.fields(item, [...path, String(index)], readers), remove);
      const entry = { row, readers };
      rows.push(entry);
      remove.addEventListener("click", () => {
        rows.splice(rows.indexOf(entry), 1);
        row.remove();
      });
      list.append(row);
    });
    const element = el("div", { id, className: "rows-box" }, list, add);
    return { element, kind: "rows", value: () => (rows.length ? rows.map((r) => collect(r.readers)) : undefined) };
  }

  values() {
    return collect(this.readers);
  }
}

function collect(readers) {
  const values = {};
  for (const [name, read] of Object.entries(readers)) {
    const value = read();
    if (value !== undefined) values[name] = value;
  }
  return values;
}

function bounds(schema) {
  const out = [];
  const low = "minimum" in schema ? `${schema.minimum}` : "exclusiveMinimum" in schema ? `> ${schema.exclusiveMinimum}` : null;
  const high = "maximum" in schema ? `${schema.maximum}` : "exclusiveMaximum" in schema ? `< ${schema.exclusiveMaximum}` : null;
  if (low !== null && high !== null) out.push(`${low} … ${high}`);
  else if (low !== null) out.push(`from ${low}`);
  else if (high !== null) out.push(`up to ${high}`);
  if ("maxLength" in schema) out.push(`${schema.minLength || 0}–${schema.maxLength} characters`);
  if ("maxItems" in schema) out.push(`at most ${schema.maxItems}`);
  if (schema.enum) out.push(`one of ${schema.enum.join(", ")}`);
  return out;
}

// Marks the fields a 422 names (loc ["body", field, ...]); returns the messages it could not place.
export function markFieldErrors(container, detail) {
  for (const box of container.querySelectorAll(".field.invalid")) {
    box.classList.remove("invalid");
    box.querySelector(".field-error").hidden = true;
  }
  if (!Array.isArray(detail)) return;
  for (const issue of detail) {
    const path = (issue.loc || []).slice(1).map(String);
    // the deepest field shown that the location starts with
    for (let length = path.length; length > 0; length--) {
      const box = container.querySelector(`.field[data-field="${CSS.escape(path.slice(0, length).join("."))}"]`);
      if (box) {
        box.classList.add("invalid");
        const message = box.querySelector(".field-error");
        message.textContent = issue.msg;
        message.hidden = false;
        break;
      }
    }
  }
}
