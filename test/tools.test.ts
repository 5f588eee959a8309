// Tool calling: each template family's call syntax parsed from canned model text (random
// models never write calls on their own); `required` and named tool choices enforced by
// the grammar on a random model, every call valid against its tool's parameters; and the
// official openai client's parse helpers (zod schemas) working unchanged.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import Ajv2020 from "ajv/dist/2020.js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";
import { parseAutoCalls, ToolCallStream, toolFamilyOf, type ToolCallDelta } from "../src/server/tools.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { postJson, settled, startTestServer, type TestServer } from "./helpers/server.ts";

setDefaultTimeout(120_000);

describe("tool-call syntax by template family", () => {
  test("the family is read from the chat template", () => {
    expect(toolFamilyOf("{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}")).toBe("hermes");
    expect(toolFamilyOf("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]")).toBe("mistral");
    expect(toolFamilyOf("<|start_header_id|>ipython<|end_header_id|>")).toBe("llama3");
    expect(toolFamilyOf("{{ message['content'] }}")).toBe("json");
  });

  test("Hermes/Qwen, Mistral, Llama 3.x and plain JSON calls parse, with the text before them as content", () => {
    const hermes = parseAutoCalls(
      'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
      "hermes",
    );
    expect(hermes.content).toBe("Let me look.\n");
    expect(hermes.calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)])).toEqual([
      ["get_weather", { city: "Paris" }],
      ["get_time", {}],
    ]);
    const mistral = parseAutoCalls('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "mistral");
    expect(mistral.calls[0].function).toEqual({ name: "add", arguments: '{"a":1,"b":2}' });
    expect(mistral.content).toBe("");
    const llama = parseAutoCalls('<|python_tag|>{"name": "search", "parameters": {"q": "bun"}}', "llama3");
    expect(llama.calls[0].function).toEqual({ name: "search", arguments: '{"q":"bun"}' });
    const llamaPlain = parseAutoCalls('{"name": "search", "parameters": {"q": "zig"}}', "llama3");
    expect(llamaPlain.calls[0].function.name).toBe("search");
    const json = parseAutoCalls('[{"name": "a", "arguments": "{\\"x\\": 1}"}]', "json");
    expect(json.calls[0].function).toEqual({ name: "a", arguments: '{"x": 1}' });
    for (const c of [...hermes.calls, ...mistral.calls, ...llama.calls]) expect(c.id).toMatch(/^call_[0-9a-f]{24}$/);
    // Text that only looks like the start of a call is content.
    expect(parseAutoCalls("<tool_call>not json</tool_call>", "hermes")).toEqual({
      content: "<tool_call>not json</tool_call>",
      calls: [],
    });
    expect(parseAutoCalls("Hello there", "hermes")).toEqual({ content: "Hello there", calls: [] });
  });

  test("streaming in auto mode: plain text flows, a marker's prefix is held, calls go out whole at the end", () => {
    const plain = new ToolCallStream({ kind: "auto", family: "hermes" });
    expect(plain.push("Hello").content).toBe("Hello");
    expect(plain.push(" <tool").content).toBe(" "); // could still become <tool_call>
    expect(plain.push("box>").content).toBe("<toolbox>");
    expect(plain.finish()).toEqual({ content: "", calls: [], called: false });
    const call = new ToolCallStream({ kind: "auto", family: "hermes" });
    expect(call.push("Sure. <tool_").content).toBe("Sure. ");
    expect(call.push('call>{"name": "f", "arguments": {}}')).toEqual({ content: "", calls: [] });
    const end = call.finish();
    expect(end.content).toBe("");
    expect(end.called).toBe(true);
    expect(end.calls.map((c) => [c.index, c.function.name, c.function.arguments])).toEqual([[0, "f", "{}"]]);
  });

  // Folds streamed pieces the way a client does: by index, the first piece naming the call.
  const fold = (pieces: ToolCallDelta[]) => {
    const calls: { id: string; name: string; arguments: string }[] = [];
    for (const d of pieces) {
      if (d.id !== undefined) {
        expect(calls.length).toBe(d.index); // a call's header comes once, in order
        calls.push({ id: d.id, name: d.function.name!, arguments: "" });
      }
      calls[d.index].arguments += d.function.arguments;
    }
    return calls.map(({ name, arguments: args }) => [name, args]);
  };

  test("forced output streams each call's name, then its argument text as written, however it is cut", () => {
    const text =
      String.raw`[{"name":"get_weather","parameters":{"city":"a,}\\\"b\"","days":3}},` +
      String.raw`{"name":"set_alarm","parameters":{"hour":7e0,"on":true}}]`;
    const want = [
      ["get_weather", String.raw`{"city":"a,}\\\"b\"","days":3}`],
      ["set_alarm", '{"hour":7e0,"on":true}'],
    ];
    expect(JSON.parse(text)[0].parameters.city).toBe('a,}\\"b"');
    for (let cut = 0; cut <= text.length; cut++) {
      const s = new ToolCallStream({ kind: "forced", named: null, parallel: true });
      const pieces = [...s.push(text.slice(0, cut)).calls, ...s.push(text.slice(cut)).calls];
      const end = s.finish();
      expect(end.called).toBe(true);
      expect(fold([...pieces, ...end.calls])).toEqual(want);
    }
    // One character at a time: the name goes out before any of its arguments.
    const s = new ToolCallStream({ kind: "forced", named: null, parallel: true });
    const pieces = [...text].flatMap((c) => s.push(c).calls);
    expect(pieces[0]).toMatchObject({ index: 0, type: "function", function: { name: "get_weather", arguments: "" } });
    expect(fold(pieces)).toEqual(want);
    // A named tool's output is its arguments.
    const named = new ToolCallStream({ kind: "forced", named: "set_alarm", parallel: false });
    expect(fold([...named.push('{"hour":').calls, ...named.push("1}").calls])).toEqual([["set_alarm", '{"hour":1}']]);
  });
});

const M = "tiny";
const dir = mkdtempSync(join(tmpdir(), "inferneo-tools-"));
let s: TestServer;
const TOOLS = [
  {
    type: "function" as const,
    function: {
      name: "get_weather",
      description: "Weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", maxLength: 8 }, days: { type: "integer", minimum: 1, maximum: 7 } },
        required: ["city", "days"],
        additionalProperties: false,
      },
    },
  },
  {
    type: "function" as const,
    function: {
      name: "set_alarm",
      parameters: {
        type: "object",
        properties: { hour: { type: "integer", minimum: 0, maximum: 23 }, on: { type: "boolean" } },
        required: ["hour", "on"],
        additionalProperties: false,
      },
    },
  },
];
const ajv = new Ajv2020({ strict: false });
const validArgs = (name: string, args: string) =>
  ajv.validate(TOOLS.find((t) => t.function.name === name)!.function.parameters, JSON.parse(args));

describe("tool choice on a server", () => {
  beforeAll(async () => {
    const shape = { ...TINY, ctx: 512 };
    s = await startTestServer(writeHfModel(dir, shape, "f32", makeWeights(shape, "f32")), ["--served-model-name", M]);
  });
  afterAll(async () => {
    await s?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const ask = (over: Record<string, unknown>) =>
    postJson(`${s.url}/v1/chat/completions`, {
      model: M,
      messages: [{ role: "user", content: "weather?" }],
      max_tokens: 300,
      tools: TOOLS,
      ...over,
    });

  /** A streamed answer's calls (folded by index), how many pieces carried them, and its finish reason. */
  async function streamCalls(over: Record<string, unknown>) {
    const res = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      body: JSON.stringify({
        model: M,
        messages: [{ role: "user", content: "weather?" }],
        max_tokens: 300,
        tools: TOOLS,
        ...over,
        stream: true,
      }),
    });
    const calls: [string, string][] = [];
    let pieces = 0;
    let finish: string | null = null;
    for (const frame of (await res.text()).split("\n\n").filter((f) => f.startsWith("data: {"))) {
      const c = (
        JSON.parse(frame.slice(6)) as {
          choices: { delta: { tool_calls?: ToolCallDelta[] }; finish_reason: string | null }[];
        }
      ).choices[0];
      finish = c?.finish_reason ?? finish;
      for (const d of c?.delta.tool_calls ?? []) {
        pieces += 1;
        if (d.function.name !== undefined) calls[d.index] = [d.function.name, ""];
        calls[d.index][1] += d.function.arguments;
      }
    }
    return { calls, pieces, finish };
  }

  test("required: every answer is one or more valid calls of the given tools, finishing with tool_calls", async () => {
    const answers = await Promise.all(
      Array.from({ length: 12 }, (_, seed) =>
        ask({ tool_choice: "required", seed, parallel_tool_calls: seed % 2 === 0 }),
      ),
    );
    for (const [seed, r] of answers.entries()) {
      const choice = (
        r.json.choices as {
          message: {
            content: string | null;
            tool_calls: { id: string; type: string; function: { name: string; arguments: string } }[];
          };
          finish_reason: string;
        }[]
      )[0];
      expect(choice.finish_reason).toBe("tool_calls");
      expect(choice.message.content).toBeNull();
      expect(choice.message.tool_calls.length).toBeGreaterThanOrEqual(1);
      if (seed % 2 === 1) expect(choice.message.tool_calls.length).toBe(1); // parallel_tool_calls: false
      for (const c of choice.message.tool_calls) {
        expect(c.type).toBe("function");
        expect(validArgs(c.function.name, c.function.arguments)).toBe(true);
      }
    }
  });

  test("a named tool: one call of that tool, valid, finishing with stop; streamed deltas add up to the same", async () => {
    const body = { tool_choice: { type: "function", function: { name: "set_alarm" } }, seed: 5 };
    const r = await ask(body);
    const choice = (
      r.json.choices as {
        message: { tool_calls: { function: { name: string; arguments: string } }[] };
        finish_reason: string;
      }[]
    )[0];
    expect(choice.finish_reason).toBe("stop");
    expect(choice.message.tool_calls.map((c) => c.function.name)).toEqual(["set_alarm"]);
    expect(validArgs("set_alarm", choice.message.tool_calls[0].function.arguments)).toBe(true);
    const streamed = await streamCalls(body);
    expect(streamed.calls).toEqual([["set_alarm", choice.message.tool_calls[0].function.arguments]]);
    expect(streamed.pieces).toBeGreaterThan(2); // the header, then the arguments as they are written
    expect(streamed.finish).toBe("stop");
  });

  test("required, streamed: the same calls as the non-streamed answer, in pieces, ending with tool_calls", async () => {
    for (const seed of [1, 2, 3]) {
      const body = { tool_choice: "required", seed };
      const whole = (
        (await ask(body)).json.choices as {
          message: { tool_calls: { function: { name: string; arguments: string } }[] };
        }[]
      )[0].message.tool_calls.map((c): [string, string] => [c.function.name, c.function.arguments]);
      const streamed = await streamCalls(body);
      expect(streamed.calls).toEqual(whole);
      expect(streamed.pieces).toBeGreaterThan(whole.length);
      expect(streamed.finish).toBe("tool_calls");
    }
  });

  test("a conversation with tool calls and tool results renders and answers", async () => {
    const r = await postJson(`${s.url}/v1/chat/completions`, {
      model: M,
      max_tokens: 8,
      tools: TOOLS,
      messages: [
        { role: "user", content: "weather in Paris?" },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function",
              function: { name: "get_weather", arguments: '{"city":"Paris","days":1}' },
            },
          ],
        },
        { role: "tool", tool_call_id: "call_1", content: "sunny" },
      ],
    });
    expect(r.status).toBe(200);
  });

  test("bad tool requests are 400s naming the field", async () => {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [
        { tool_choice: { type: "function", function: { name: "nope" } } },
        "tool_choice",
        /names 'nope', which is not among the tools/,
      ],
      [
        { tools: [{ type: "function", function: { name: "has space" } }] },
        "tools.0.function.name",
        /Invalid value for 'tools\.0\.function\.name': "has space"/,
      ],
      [{ tools: [], tool_choice: "required" }, "tool_choice", /needs tools/],
      [
        { tool_choice: "required", response_format: { type: "json_object" } },
        "response_format",
        /both constrain the output/,
      ],
      [{ tools: [TOOLS[0], TOOLS[0]] }, "tools", /two tools are named 'get_weather'/],
      [
        {
          tool_choice: "required",
          tools: [{ type: "function", function: { name: "f", parameters: { type: "object", if: {} } } }],
        },
        "tools.0.function.parameters",
        /tools\.0\.function\.parameters: 'if' is not supported/,
      ],
    ];
    for (const [over, param, message] of cases) {
      const r = await ask(over);
      expect(r.status).toBe(400);
      expect((r.json.error as { param: string }).param).toBe(param);
      expect((r.json.error as { message: string }).message).toMatch(message);
    }
    const tool = await postJson(`${s.url}/v1/chat/completions`, {
      model: M,
      messages: [{ role: "tool", content: "x" }],
    });
    expect((tool.json.error as { message: string }).message).toMatch(/needs tool_call_id/);
    expect(await settled(s)).toBe(true);
  });

  test("the openai client's parse helpers work unchanged: a zod response format and a zod function", async () => {
    const openai = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: "unused" });
    const Person = z.object({ name: z.string().max(6), age: z.number().int().min(0).max(99) });
    const parsed = await openai.chat.completions.parse({
      model: M,
      messages: [{ role: "user", content: "a person" }],
      max_tokens: 200,
      seed: 3,
      response_format: zodResponseFormat(Person, "person"),
    });
    expect(Person.safeParse(parsed.choices[0].message.parsed).success).toBe(true);
    const Alarm = z.object({ hour: z.number().int().min(0).max(23), on: z.boolean() });
    const called = await openai.chat.completions.parse({
      model: M,
      messages: [{ role: "user", content: "wake me" }],
      max_tokens: 200,
      seed: 4,
      tools: [zodFunction({ name: "set_alarm", parameters: Alarm })],
      tool_choice: "required",
    });
    const call = called.choices[0].message.tool_calls?.[0];
    if (!call) throw new Error("no tool call");
    expect(call.type).toBe("function");
    if (call.type === "function") expect(Alarm.safeParse(call.function.parsed_arguments).success).toBe(true);
  });
});
