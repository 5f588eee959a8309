// Structured output's request side: response_format to a grammar spec, checked before
// any compute. A schema must be valid JSON Schema (checked by ajv against its
// meta-schema) and use only keywords the grammar compiler honours; anything else is
// a 400 that names the keyword, rather than output that only looks constrained.
import Ajv2020 from "ajv/dist/2020.js";
import type { GrammarSpec } from "../engine/grammar.ts";
import { ApiError } from "./errors.ts";
import type { ResponseFormat, StructuredOutputs } from "./schemas.ts";

/** Keywords that constrain what is generated (xgrammar's JSON-schema converter). */
const CONSTRAINING = new Set([
  "type",
  "properties",
  "required",
  "additionalProperties",
  "items",
  "prefixItems",
  "minItems",
  "maxItems",
  "enum",
  "const",
  "anyOf",
  "oneOf",
  "allOf",
  "$ref",
  "$defs",
  "definitions",
  "minLength",
  "maxLength",
  "pattern",
  "format",
  "minimum",
  "maximum",
  "exclusiveMinimum",
  "exclusiveMaximum",
  "minProperties",
  "maxProperties",
]);
/** Keywords that describe and constrain nothing: allowed and ignored. */
const ANNOTATIONS = new Set([
  "title",
  "description",
  "default",
  "examples",
  "$schema",
  "$id",
  "$comment",
  "deprecated",
  "readOnly",
  "writeOnly",
]);
/** Where subschemas sit: keywords whose value is a schema, a list of them, or a map of them. */
const ONE = ["items", "additionalProperties"];
const LIST = ["anyOf", "oneOf", "allOf", "prefixItems"];
const MAP = ["properties", "$defs", "definitions"];
const SCHEMA_NODES_MAX = 10_000;

const ajv = new Ajv2020({ strict: false, validateFormats: false });
/** Bounds the grammar enforces on integers only (xgrammar 0.1.27 ignores them on numbers). */
const INTEGER_ONLY = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];

type Unsupported = { path: string; why: string } | null;

/** The first keyword the grammar cannot honour, as a path ("properties.a.not") and why, or null. */
export function unsupportedKeyword(schema: unknown, path = "", budget = { nodes: SCHEMA_NODES_MAX }): Unsupported {
  if (typeof schema === "boolean") return null;
  if (schema === null || typeof schema !== "object" || Array.isArray(schema))
    return { path: path || "(root)", why: "is not a schema" };
  if (--budget.nodes < 0) return { path, why: `makes the schema larger than ${SCHEMA_NODES_MAX} parts` };
  const node = schema as Record<string, unknown>;
  const at = (k: string) => (path ? `${path}.${k}` : k);
  for (const key of Object.keys(node)) {
    if (!CONSTRAINING.has(key) && !ANNOTATIONS.has(key))
      return { path: at(key), why: "is not supported by structured output" };
    if (INTEGER_ONLY.includes(key) && node.type !== "integer")
      return { path: at(key), why: "is supported on integers only" };
  }
  for (const k of ONE)
    if (node[k] !== undefined && typeof node[k] === "object") {
      const bad = unsupportedKeyword(node[k], at(k), budget);
      if (bad) return bad;
    }
  for (const k of LIST)
    for (const [i, sub] of ((node[k] as unknown[]) ?? []).entries()) {
      const bad = unsupportedKeyword(sub, `${at(k)}.${i}`, budget);
      if (bad) return bad;
    }
  for (const k of MAP)
    for (const [name, sub] of Object.entries((node[k] as Record<string, unknown>) ?? {})) {
      const bad = unsupportedKeyword(sub, `${at(k)}.${name}`, budget);
      if (bad) return bad;
    }
  return null;
}

/** The grammar a response_format asks for (null for text), or a 400. */
export function grammarSpecOf(format: ResponseFormat | null | undefined): GrammarSpec | null {
  if (!format || format.type === "text") return null;
  if (format.type === "json_object") return { kind: "json_object" };
  return jsonSchemaSpec(format.json_schema.schema ?? {}, "response_format.json_schema.schema", "response_format");
}

/**
 * The grammar of a JSON schema, or a 400 naming `where` (its place in the request) and `param`:
 * a schema that is not valid JSON Schema, or one with a keyword the grammar cannot honour.
 */
export function jsonSchemaSpec(schema: Record<string, unknown>, where: string, param: string): GrammarSpec {
  const fail = (message: string) => new ApiError(400, `${where}${message}`, "invalid_request_error", param);
  // Judged by the 2020-12 meta-schema whatever $schema says (zod writes draft-07's URI).
  const { $schema: _declared, ...body } = schema;
  let valid: boolean;
  try {
    valid = ajv.validateSchema(body) as boolean;
  } catch (e) {
    throw fail(` cannot be read: ${(e as Error).message}`);
  }
  if (!valid) {
    const e = ajv.errors?.[0];
    throw fail(` is not a valid JSON Schema: ${e?.instancePath || "(root)"} ${e?.message ?? ""}`.trim());
  }
  const bad = unsupportedKeyword(schema);
  if (bad) throw fail(`: '${bad.path}' ${bad.why}`);
  return { kind: "json_schema", schema };
}

const escapeRegex = (text: string) => text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

/**
 * The grammar a request asks for: response_format (OpenAI) or structured_outputs (vLLM's
 * choice, regex or json), one of them; null when neither constrains the output.
 */
export function grammarSpecFor(body: {
  response_format?: ResponseFormat | null;
  structured_outputs?: StructuredOutputs | null;
}): GrammarSpec | null {
  const fromFormat = grammarSpecOf(body.response_format);
  const so = body.structured_outputs;
  if (!so) return fromFormat;
  const given = (["choice", "regex", "json"] as const).filter((k) => so[k] !== undefined);
  if (given.length !== 1) {
    throw new ApiError(
      400,
      `structured_outputs takes exactly one of choice, regex and json (got ${given.length === 0 ? "none" : given.join(", ")})`,
      "invalid_request_error",
      "structured_outputs",
    );
  }
  if (fromFormat !== null)
    throw new ApiError(
      400,
      "response_format and structured_outputs both constrain the output; send one",
      "invalid_request_error",
      "structured_outputs",
    );
  if (so.choice) return { kind: "regex", pattern: `(${so.choice.map(escapeRegex).join("|")})` };
  if (so.regex !== undefined) return { kind: "regex", pattern: so.regex };
  return jsonSchemaSpec(so.json as Record<string, unknown>, "structured_outputs.json", "structured_outputs");
}
