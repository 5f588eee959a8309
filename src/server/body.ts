// Request bodies and WebSocket messages as JSON, with every cost bounded before it is
// paid: bytes (read as a stream, so a chunked upload stops at the limit), UTF-8, and
// nesting depth, scanned before JSON.parse (a 40 KB body of 20,000 nested arrays made
// schema validation run for half a minute and grow the process by gigabytes).
import { ApiError } from "./errors.ts";

/** Our schemas nest a few levels; JSON schemas in requests (tools) a few dozen at most. */
export const JSON_DEPTH_MAX = 64;

export const tooLarge = (limit: number) =>
  new ApiError(
    413,
    `The request body is over the limit of ${limit} bytes (--max-body-bytes).`,
    "invalid_request_error",
    null,
    "request_too_large",
  );

/** Reads a body as bytes, refusing it as soon as it passes `limit`. */
export async function readBody(request: Request, limit: number): Promise<Uint8Array> {
  if (!request.body) return new Uint8Array(0);
  const parts: Uint8Array[] = [];
  let size = 0;
  const reader = request.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      throw tooLarge(limit);
    }
    parts.push(value);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.byteLength;
  }
  return bytes;
}

/** The deepest nesting of arrays and objects in JSON text, stopping once past `max`. */
export function jsonDepth(text: string, max: number): number {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c)
        i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      depth++;
      if (depth > deepest) deepest = depth;
      if (deepest > max) return deepest;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return deepest;
}

/** JSON text to a value, refusing what is nested too deep before parsing it. */
export function parseJsonText(text: string, what = "request body"): unknown {
  if (jsonDepth(text, JSON_DEPTH_MAX) > JSON_DEPTH_MAX) {
    throw new ApiError(
      400,
      `The ${what} nests arrays or objects deeper than ${JSON_DEPTH_MAX} levels.`,
      "invalid_request_error",
      null,
      "too_deep",
    );
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new ApiError(400, `We could not parse the JSON ${what}: it is not valid JSON.`, "invalid_request_error");
  }
}

/** Bytes to JSON: UTF-8 (strictly), then parseJsonText. */
export function parseJsonBytes(bytes: Uint8Array, what = "request body"): unknown {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new ApiError(400, `The ${what} is not valid UTF-8.`, "invalid_request_error");
  }
  return parseJsonText(text, what);
}

/** A short rendering of a value for an error message, without serializing all of a large one. */
export function preview(value: unknown, chars = 80): string {
  if (typeof value === "number")
    return Number.isFinite(value) ? String(value) : value > 0 ? "Infinity" : value < 0 ? "-Infinity" : "NaN";
  if (typeof value === "string") return JSON.stringify(value.length > chars ? `${value.slice(0, chars)}...` : value);
  if (Array.isArray(value)) {
    const head = value.slice(0, 8).map((v) => preview(v, 20));
    return `[${head.join(",")}${value.length > 8 ? `,... (${value.length} items)` : ""}]`.slice(0, chars * 2);
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    const head = keys
      .slice(0, 6)
      .map((k) => `${JSON.stringify(k.slice(0, 20))}:${preview((value as Record<string, unknown>)[k], 20)}`);
    return `{${head.join(",")}${keys.length > 6 ? ",..." : ""}}`.slice(0, chars * 2);
  }
  return String(JSON.stringify(value));
}
