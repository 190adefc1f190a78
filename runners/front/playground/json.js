// JSON with whole numbers past 2^53 kept exact (the seed goes up to 2^63 - 1): parsed to BigInt
// where the browser gives a reviver the number's source text, and written back as raw digits.

export function parseExact(text) {
  return JSON.parse(text, (key, value, context) =>
    Number.isInteger(value) && !Number.isSafeInteger(value) && context?.source ? BigInt(context.source) : value,
  );
}

export function toJson(value, indent) {
  return JSON.stringify(value, (key, v) => (typeof v === "bigint" ? JSON.rawJSON(v.toString()) : v), indent);
}

// A typed integer: a Number while exact, else a BigInt.
export function integer(text) {
  const number = Number(text);
  return Number.isSafeInteger(number) || !/^-?\d+$/.test(text.trim()) ? number : BigInt(text.trim());
}
