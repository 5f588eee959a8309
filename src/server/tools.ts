// Tool calling. `required` and a named tool_choice are enforced by a grammar (the output
// is a JSON array of calls, or one call's arguments, valid by construction); `auto` lets
// the model write free text and parses the tool-call syntax of its chat template's
// family: Hermes/Qwen `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS][...]`, Llama 3.x
// JSON `{"name", "parameters"}` (after `<|python_tag|>`), or plain JSON.
import { randomBytes } from "node:crypto";
import type { GrammarSpec } from "../engine/grammar.ts";
import { ApiError } from "./errors.ts";
import type { ChatCompletionRequest } from "./schemas.ts";
import { jsonSchemaSpec } from "./structured.ts";

export type Tool = NonNullable<ChatCompletionRequest["tools"]>[number];
export type ToolFamily = "hermes" | "mistral" | "llama3" | "json";

export interface ToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** How a request's tools shape its output: none, forced by a grammar, or parsed after the fact. */
export type ToolMode =
  { kind: "forced"; named: string | null; parallel: boolean } | { kind: "auto"; family: ToolFamily };

export function toolFamilyOf(chatTemplate: string): ToolFamily {
  if (chatTemplate.includes("<tool_call>")) return "hermes";
  if (chatTemplate.includes("[TOOL_CALLS]")) return "mistral";
  if (chatTemplate.includes("<|python_tag|>") || chatTemplate.includes("ipython")) return "llama3";
  return "json";
}

const newCallId = () => `call_${randomBytes(12).toString("hex")}`;

/** The tool mode and, when forced, the grammar for a chat request; 400s for a choice that names no tool. */
export function toolModeOf(
  body: ChatCompletionRequest,
  family: ToolFamily,
): { mode: ToolMode | null; grammar: GrammarSpec | null } {
  const tools = body.tools ?? [];
  const choice = body.tool_choice ?? (tools.length > 0 ? "auto" : "none");
  if (choice === "none") return { mode: null, grammar: null };
  if (tools.length === 0)
    throw new ApiError(
      400,
      `tool_choice '${typeof choice === "string" ? choice : choice.function.name}' needs tools`,
      "invalid_request_error",
      "tool_choice",
    );
  const names = new Set<string>();
  for (const t of tools) {
    if (names.has(t.function.name))
      throw new ApiError(400, `two tools are named '${t.function.name}'`, "invalid_request_error", "tools");
    names.add(t.function.name);
  }
  if (choice === "auto") return { mode: { kind: "auto", family }, grammar: null };
  if (body.structured_outputs || (body.response_format && body.response_format.type !== "text")) {
    throw new ApiError(
      400,
      "response_format and a tool_choice that forces a call both constrain the output; send one",
      "invalid_request_error",
      "response_format",
    );
  }
  const parameters = (t: Tool) => {
    const schema = t.function.parameters ?? { type: "object" };
    // The same checks as response_format: valid JSON Schema, only keywords the grammar honours.
    const where = `tools.${tools.indexOf(t)}.function.parameters`;
    jsonSchemaSpec(schema, where, where);
    return schema;
  };
  if (typeof choice === "object") {
    const tool = tools.find((t) => t.function.name === choice.function.name);
    if (!tool)
      throw new ApiError(
        400,
        `tool_choice names '${choice.function.name}', which is not among the tools`,
        "invalid_request_error",
        "tool_choice",
      );
    return {
      mode: { kind: "forced", named: tool.function.name, parallel: false },
      grammar: { kind: "json_schema", schema: parameters(tool) },
    };
  }
  const parallel = body.parallel_tool_calls !== false;
  const call = (t: Tool) => ({
    type: "object",
    properties: { name: { const: t.function.name }, parameters: parameters(t) },
    required: ["name", "parameters"],
    additionalProperties: false,
  });
  const schema = {
    type: "array",
    items: { anyOf: tools.map(call) },
    minItems: 1,
    ...(parallel ? {} : { maxItems: 1 }),
  };
  return { mode: { kind: "forced", named: null, parallel }, grammar: { kind: "json_schema", schema } };
}

/** A call from an object of {name, arguments | parameters}; null if it is not one. */
function callOf(v: unknown): ToolCall | null {
  if (v === null || typeof v !== "object" || Array.isArray(v)) return null;
  const o = v as { name?: unknown; arguments?: unknown; parameters?: unknown };
  if (typeof o.name !== "string") return null;
  const args = o.arguments ?? o.parameters ?? {};
  return {
    id: newCallId(),
    type: "function",
    function: { name: o.name, arguments: typeof args === "string" ? args : JSON.stringify(args) },
  };
}

function callsOfJson(text: string): ToolCall[] | null {
  try {
    const v = JSON.parse(text) as unknown;
    const calls = (Array.isArray(v) ? v : [v]).map(callOf);
    return calls.length > 0 && calls.every((c) => c !== null) ? (calls as ToolCall[]) : null;
  } catch {
    return null;
  }
}

/** The text before a family's calls begin, and where they begin (-1: none). */
function callStart(text: string, family: ToolFamily): number {
  switch (family) {
    case "hermes":
      return text.indexOf("<tool_call>");
    case "mistral":
      return text.indexOf("[TOOL_CALLS]");
    case "llama3": {
      const tag = text.indexOf("<|python_tag|>");
      if (tag >= 0) return tag;
      return text.trimStart().startsWith("{") ? text.length - text.trimStart().length : -1;
    }
    case "json": {
      const t = text.trimStart();
      return t.startsWith("{") || t.startsWith("[") ? text.length - t.length : -1;
    }
  }
}

/** Auto mode: the content and the calls the model wrote in its family's syntax. */
export function parseAutoCalls(text: string, family: ToolFamily): { content: string; calls: ToolCall[] } {
  const start = callStart(text, family);
  if (start < 0) return { content: text, calls: [] };
  const content = text.slice(0, start);
  const rest = text.slice(start);
  let calls: ToolCall[] | null = null;
  if (family === "hermes") {
    const bodies = [...rest.matchAll(/<tool_call>\s*([\s\S]*?)\s*(?:<\/tool_call>|$)/g)].map((m) => m[1]);
    const parsed = bodies.map((b) => callsOfJson(b));
    calls = parsed.every((p) => p !== null) ? parsed.flatMap((p) => p!) : null;
  } else if (family === "mistral") calls = callsOfJson(rest.slice("[TOOL_CALLS]".length).trim());
  else if (family === "llama3") {
    const body = rest.replace("<|python_tag|>", "").trim();
    calls =
      callsOfJson(body) ?? (body.includes(";") ? mergeCalls(body.split(";").map((p) => callsOfJson(p.trim()))) : null);
  } else calls = callsOfJson(rest.trim());
  return calls === null ? { content: text, calls: [] } : { content, calls };
}

function mergeCalls(parts: (ToolCall[] | null)[]): ToolCall[] | null {
  return parts.every((p) => p !== null) ? parts.flatMap((p) => p!) : null;
}

/** A piece of a streamed call: the first of each call carries its id, type and name. */
export interface ToolCallDelta {
  index: number;
  id?: string;
  type?: "function";
  function: { name?: string; arguments: string };
}

const wholeDeltas = (calls: ToolCall[]): ToolCallDelta[] => calls.map((c, index) => ({ index, ...c }));

/**
 * Forced output as it grows, call by call: the grammar makes it `[{"name":N,"parameters":A},...]`
 * (or, for a named tool, A alone), so each call's name goes out once it is whole and its
 * arguments as they are written, the raw text of A (a number keeps the digits the model wrote).
 */
class ForcedCallScanner {
  private depth = 0;
  private inString = false;
  private escaped = false;
  private stringStart = 0;
  private expectKey = false;
  private key = "";
  private inArgs = false;
  private argsBegun = false; // whitespace before an argument value is not part of it
  private calls: { id: string; name: string | null; pending: string }[] = [];
  private text = "";

  constructor(private readonly named: string | null) {
    if (named !== null) this.calls.push({ id: newCallId(), name: named, pending: "" });
  }

  get called(): boolean {
    return this.calls.some((c) => c.name !== null);
  }

  push(delta: string): ToolCallDelta[] {
    const out: ToolCallDelta[] = [];
    if (this.named !== null) {
      // The text is the arguments: the first piece carries the call's header.
      if (this.text === "") out.push(this.header(0));
      this.text += delta;
      if (delta !== "") this.add(out, 0, delta);
      return out;
    }
    const from = this.text.length;
    this.text += delta;
    for (let i = from; i < this.text.length; i++) this.step(i, out);
    return out;
  }

  private header(index: number): ToolCallDelta {
    const c = this.calls[index];
    return { index, id: c.id, type: "function", function: { name: c.name!, arguments: "" } };
  }

  /** Appends argument text to the call's last delta of this push (or holds it until the name is known). */
  private add(out: ToolCallDelta[], index: number, text: string) {
    const call = this.calls[index];
    if (call.name === null) {
      call.pending += text;
      return;
    }
    const last = out.at(-1);
    if (last?.index === index) last.function.arguments += text;
    else out.push({ index, function: { arguments: text } });
  }

  private step(i: number, out: ToolCallDelta[]) {
    const c = this.text[i];
    const index = this.calls.length - 1;
    if (this.inString) {
      if (this.escaped) this.escaped = false;
      else if (c === "\\") this.escaped = true;
      else if (c === '"') {
        this.inString = false;
        if (!this.inArgs) this.stringEnded(JSON.parse(this.text.slice(this.stringStart, i + 1)) as string, out);
      }
      if (this.inArgs) this.add(out, index, c);
      return;
    }
    if (this.inArgs && this.depth === 2 && (c === "," || c === "}")) this.inArgs = false;
    if (c === '"') [this.inString, this.stringStart] = [true, i];
    else if (c === "{" || c === "[") {
      this.depth += 1;
      if (this.depth === 2 && c === "{" && !this.inArgs) {
        this.calls.push({ id: newCallId(), name: null, pending: "" });
        this.expectKey = true;
      }
    } else if (c === "}" || c === "]") this.depth -= 1;
    else if (c === "," && this.depth === 2) this.expectKey = true;
    else if (c === ":" && this.depth === 2 && !this.inArgs) {
      this.inArgs = this.key === "parameters" || this.key === "arguments";
      this.argsBegun = false;
      return;
    }
    if (!this.inArgs || (!this.argsBegun && c.trim() === "")) return;
    this.argsBegun = true;
    this.add(out, index, c);
  }

  private stringEnded(value: string, out: ToolCallDelta[]) {
    if (this.depth !== 2) return;
    if (this.expectKey) [this.key, this.expectKey] = [value, false];
    else if (this.key === "name") {
      const index = this.calls.length - 1;
      const call = this.calls[index];
      call.name = value;
      out.push(this.header(index));
      if (call.pending !== "") this.add(out, index, call.pending);
      call.pending = "";
    }
  }
}

/**
 * One choice's text on its way out when tools are on. Forced output is the calls: they go
 * out as they are written (name, then argument text). In auto mode, text is held while it
 * could still be the start of a call and released as content as soon as it cannot; calls
 * found there go out whole at the end, since text that began like a call may turn out to be
 * content after all.
 */
export class ToolCallStream {
  private text = "";
  private released = 0; // characters of text already given out as content
  private inCall = false;
  // Forced output goes through the scanner; auto output is read in its family's syntax.
  private readonly forced: ForcedCallScanner | null;
  private readonly family: ToolFamily;

  constructor(mode: ToolMode) {
    this.forced = mode.kind === "forced" ? new ForcedCallScanner(mode.named) : null;
    this.family = mode.kind === "auto" ? mode.family : "json";
  }

  /** Takes new text; returns what may go out now: content and call pieces. */
  push(delta: string): { content: string; calls: ToolCallDelta[] } {
    if (this.forced) return { content: "", calls: this.forced.push(delta) };
    this.text += delta;
    if (this.inCall) return { content: "", calls: [] };
    const family = this.family;
    if (callStart(this.text, family) >= 0) {
      this.inCall = true; // a call has begun: everything from here waits for the end
      return { content: "", calls: [] };
    }
    // Hold a tail that might grow into a marker ("<tool", "[TOOL_", "<|python"), and
    // leading whitespace where a call may start with "{".
    const marker = { hermes: "<tool_call>", mistral: "[TOOL_CALLS]", llama3: "<|python_tag|>", json: "" }[family];
    let hold = 0;
    for (let k = Math.min(marker.length - 1, this.text.length); k > 0; k--) {
      if (this.text.endsWith(marker.slice(0, k))) {
        hold = k;
        break;
      }
    }
    if ((family === "json" || family === "llama3") && this.text.trim() === "") hold = this.text.length;
    const end = Math.max(this.released, this.text.length - hold);
    const out = this.text.slice(this.released, end);
    this.released = end;
    return { content: out, calls: [] };
  }

  /** At the end: what is still to go out, and whether the choice made calls (its finish reason). */
  finish(): { content: string; calls: ToolCallDelta[]; called: boolean } {
    if (this.forced) return { content: "", calls: [], called: this.forced.called };
    if (!this.inCall) return { content: this.text.slice(this.released), calls: [], called: false };
    const { content, calls } = parseAutoCalls(this.text, this.family);
    // Text before the calls was never released past the marker's start.
    const rest = (calls.length > 0 ? content : this.text).slice(this.released);
    return { content: rest, calls: wholeDeltas(calls), called: calls.length > 0 };
  }
}
