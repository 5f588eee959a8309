// One validation for every transport: a body is checked against its schema (the single
// source of truth, also behind /docs), and the first error becomes one OpenAI-shaped 400
// that names the field and says what its value must be. HTTP routes get their errors
// from Elysia, WebSocket messages and prompt files from checkBody; both end here.
import type { TSchema } from "@sinclair/typebox";
import { Value, type ValueError } from "@sinclair/typebox/value";
import { preview } from "./body.ts";
import { ApiError } from "./errors.ts";

/** A schema in words: "an integer >= 1 or null". */
function describe(schema: TSchema): string {
  const range = (x: TSchema) =>
    [
      x.minimum !== undefined ? `>= ${x.minimum}` : null,
      x.exclusiveMinimum !== undefined ? `> ${x.exclusiveMinimum}` : null,
      x.maximum !== undefined ? `<= ${x.maximum}` : null,
    ]
      .filter(Boolean)
      .join(" and ");
  if (Array.isArray(schema.anyOf)) {
    // A description that names the value ("A string, a list of ...") says it best; others
    // are notes for the docs ("Default 16."), not what the value must be.
    if (typeof schema.description === "string" && /^An? /.test(schema.description))
      return schema.description.replace(/^A/, "a").replace(/\.$/, "");
    return (schema.anyOf as TSchema[]).map(describe).join(" or ");
  }
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  switch (schema.type) {
    case "integer":
    case "number": {
      const r = range(schema);
      return `${schema.type === "integer" ? "an integer" : "a number"}${r ? ` ${r}` : ""}`;
    }
    case "string":
      return schema.minLength ? "a non-empty string" : "a string";
    case "array":
      return schema.minItems
        ? `a non-empty array${schema.maxItems ? ` of at most ${schema.maxItems} items` : ""}`
        : schema.maxItems
          ? `an array of at most ${schema.maxItems} items`
          : "an array";
    case "null":
      return "null";
    default:
      return schema.type ? `a${/^[aeiou]/.test(String(schema.type)) ? "n" : ""} ${schema.type}` : "a valid value";
  }
}

interface SchemaError {
  path?: string;
  message: string;
  schema?: TSchema;
  value?: unknown;
}

const jsonType = (v: unknown) =>
  v === null ? "null" : Array.isArray(v) ? "array" : Number.isInteger(v) ? "integer" : typeof v;

/**
 * A union's error says only that no branch fits; when the value is an array or object and
 * one branch is (a list where "a list of tools or null" is wanted), that branch's own
 * first error names the part that is wrong.
 */
function narrowUnion(error: SchemaError): SchemaError {
  const branches = error.schema?.anyOf as TSchema[] | undefined;
  if (!branches || error.value === undefined) return error;
  const t = jsonType(error.value);
  if (t !== "array" && t !== "object") return error; // for a plain value, "an integer >= 1 or null" says it best
  const matching = branches.filter((b) => b.type === t);
  if (matching.length !== 1) return error;
  const inner = Value.Errors(matching[0], error.value).First();
  if (!inner) return error;
  return narrowUnion({ ...inner, path: `${error.path ?? ""}${inner.path}` });
}

/** The first schema error as a 400 naming the field. */
export function validationError(errors: readonly SchemaError[], what = "body"): ApiError {
  const found = errors.find((e) => e.path !== undefined);
  const first = found ? narrowUnion(found) : undefined;
  if (!first) return new ApiError(400, `The ${what} is not valid.`, "invalid_request_error");
  const parts = first
    .path!.replace(/^\//, "")
    .split("/")
    .filter((p) => p !== "");
  const param = parts.join(".") || null;
  if (/unexpected property/i.test(first.message)) {
    if (parts.length > 1) {
      const parent = parts.slice(0, -1).join(".");
      return new ApiError(400, `Invalid key ${preview(parts.at(-1))} in '${parent}'.`, "invalid_request_error", parent);
    }
    return new ApiError(400, `Unrecognized request argument supplied: ${param}`, "invalid_request_error", param);
  }
  if (first.value === undefined)
    return new ApiError(400, `Missing required parameter: '${param}'.`, "invalid_request_error", param);
  const expected = first.schema ? describe(first.schema) : first.message;
  return new ApiError(
    400,
    `Invalid value for '${param ?? what}': ${preview(first.value)} is not ${expected}.`,
    "invalid_request_error",
    param,
  );
}

/** Checks a parsed value against a schema: the value, typed, or a 400. */
export function checkBody<S extends TSchema>(schema: S, value: unknown, what = "body"): S["static"] {
  if (Value.Check(schema, value)) return value;
  const errors: ValueError[] = [];
  for (const e of Value.Errors(schema, value)) {
    errors.push(e);
    if (errors.length >= 8) break;
  }
  throw validationError(errors, what);
}
