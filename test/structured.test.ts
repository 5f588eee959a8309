// Structured output on a random-weight model, whose free text is noise: with a JSON schema
// in response_format, every answer over 20 bounded schemas finishes with "stop", parses,
// and validates (ajv); streamed and non-streamed answers agree for the same seed; schemas
// the grammar cannot honour are 400s before any compute.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import Ajv2020 from "ajv/dist/2020.js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { postJson, settled, startTestServer, type TestServer } from "./helpers/server.ts";

setDefaultTimeout(180_000);

const M = "tiny";
const dir = mkdtempSync(join(tmpdir(), "inferneo-structured-"));
let s: TestServer;
beforeAll(async () => {
  const shape = { ...TINY, ctx: 8192 }; // room for json_object's unbounded answers
  s = await startTestServer(writeHfModel(dir, shape, "f32", makeWeights(shape, "f32")), [
    "--served-model-name",
    M,
    "--max-num-seqs",
    "16",
  ]);
});
afterAll(async () => {
  await s?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const str = (maxLength: number, extra: object = {}) => ({ type: "string", maxLength, ...extra });
const int = (minimum: number, maximum: number) => ({ type: "integer", minimum, maximum });
const obj = (properties: Record<string, unknown>, required = Object.keys(properties)) => ({
  type: "object",
  properties,
  required,
  additionalProperties: false,
});

const SCHEMAS: Record<string, object> = {
  integer: obj({ a: int(0, 9) }),
  boolean: obj({ ok: { type: "boolean" } }),
  enum: obj({ color: { type: "string", enum: ["red", "green", "blue"] } }),
  nested: obj({ user: obj({ name: str(6), age: int(0, 120) }) }),
  arrayBounds: obj({ xs: { type: "array", items: int(-5, 5), minItems: 1, maxItems: 3 } }),
  anyOf: obj({ v: { anyOf: [str(4), int(0, 99)] } }),
  pattern: obj({ code: { type: "string", pattern: "^[a-c]{2,4}$" } }),
  number: obj({ p: { type: "number" }, q: { type: "number" } }),
  const: obj({ kind: { const: "point" }, x: int(0, 3) }),
  nullable: obj({ note: { type: ["string", "null"], maxLength: 5 } }),
  optional: obj({ id: int(1, 1000), label: str(5) }, ["id"]),
  refs: {
    $defs: { pt: obj({ x: int(0, 9), y: int(0, 9) }) },
    ...obj({ from: { $ref: "#/$defs/pt" }, to: { $ref: "#/$defs/pt" } }),
  },
  arrayOfObjects: obj({ items: { type: "array", items: obj({ k: str(3), v: { type: "boolean" } }), maxItems: 2 } }),
  numberEnum: obj({ level: { type: "integer", enum: [1, 2, 3, 5, 8] } }),
  tuple: obj({ pair: { type: "array", prefixItems: [str(3), int(0, 9)], items: false, minItems: 2, maxItems: 2 } }),
  exclusive: obj({ n: { type: "integer", exclusiveMinimum: 0, exclusiveMaximum: 10 } }),
  stringLengths: obj({ word: str(4, { minLength: 2 }) }),
  threeFields: obj({ a: str(3), b: int(0, 5), c: { type: "boolean" } }),
  oneOf: obj({ shape: { oneOf: [obj({ r: int(1, 9) }), obj({ w: int(1, 9), h: int(1, 9) })] } }),
  enumArray: obj({
    flags: { type: "array", items: { type: "string", enum: ["x", "y"] }, maxItems: 4 },
    on: { type: "boolean" },
  }),
};
const REQUESTS_PER_SCHEMA = 10;

const ajv = new Ajv2020({ strict: false });

async function inBatches<T>(jobs: (() => Promise<T>)[], size: number): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < jobs.length; i += size) out.push(...(await Promise.all(jobs.slice(i, i + size).map((j) => j()))));
  return out;
}

describe("structured output", () => {
  test(`${Object.keys(SCHEMAS).length} schemas x ${REQUESTS_PER_SCHEMA} sampled requests: every answer stops, parses and validates`, async () => {
    expect(Object.keys(SCHEMAS).length).toBeGreaterThanOrEqual(20);
    const jobs = Object.entries(SCHEMAS).flatMap(([name, schema]) =>
      Array.from({ length: REQUESTS_PER_SCHEMA }, (_, i) => async () => {
        const chat = i % 2 === 0;
        const response_format = { type: "json_schema", json_schema: { name, schema } };
        const body = chat
          ? {
              model: M,
              messages: [{ role: "user", content: `give ${name} ${i}` }],
              max_tokens: 400,
              seed: i,
              response_format,
            }
          : { model: M, prompt: `give ${name} ${i}`, max_tokens: 400, seed: i, response_format };
        const r = await postJson(`${s.url}/v1/${chat ? "chat/" : ""}completions`, body);
        const choice = (
          r.json.choices as { text?: string; message?: { content: string }; finish_reason: string }[] | undefined
        )?.[0];
        const text = choice?.message?.content ?? choice?.text ?? "";
        let value: unknown;
        try {
          value = JSON.parse(text);
        } catch {
          return `${name} #${i}: not JSON (${choice?.finish_reason}): ${text.slice(0, 120)}`;
        }
        if (choice?.finish_reason !== "stop") return `${name} #${i}: finished ${choice?.finish_reason}`;
        if (!ajv.validate(schema, value)) return `${name} #${i}: ${text} fails: ${ajv.errorsText()}`;
        return null;
      }),
    );
    const failures = (await inBatches(jobs, 16)).filter((f) => f !== null);
    expect(failures).toEqual([]);
    expect(await settled(s)).toBe(true);
  });

  test("json_object: 20 answers with room to finish all stop, parse, and are objects", async () => {
    // An object's size has no bound: a noise model writes strings hundreds of tokens long, so the
    // budget is most of the context (the longest of these seeds takes about 3,200 tokens).
    const jobs = Array.from({ length: 20 }, (_, i) => async () => {
      const chat = i % 2 === 0;
      const body = chat
        ? { model: M, messages: [{ role: "user", content: `an object ${i}` }], max_tokens: 8000, seed: i }
        : { model: M, prompt: `an object ${i}`, max_tokens: 8000, seed: i };
      const r = await postJson(`${s.url}/v1/${chat ? "chat/" : ""}completions`, {
        ...body,
        response_format: { type: "json_object" },
      });
      const choice = (r.json.choices as { text?: string; message?: { content: string }; finish_reason: string }[])[0];
      const text = choice.message?.content ?? choice.text ?? "";
      if (choice.finish_reason !== "stop") return `#${i}: finished ${choice.finish_reason}`;
      try {
        const value = JSON.parse(text) as unknown;
        return value !== null && typeof value === "object" && !Array.isArray(value) ? null : `#${i}: ${text}`;
      } catch {
        return `#${i}: not JSON: ${text.slice(0, 120)}`;
      }
    });
    expect((await inBatches(jobs, 10)).filter((f) => f !== null)).toEqual([]);
    expect(await settled(s)).toBe(true);
  });

  test("streamed and non-streamed answers are the same for the same seed", async () => {
    const body = {
      model: M,
      messages: [{ role: "user", content: "same" }],
      max_tokens: 200,
      seed: 11,
      response_format: { type: "json_schema", json_schema: { name: "n", schema: SCHEMAS.nested } },
    };
    const whole = await postJson(`${s.url}/v1/chat/completions`, body);
    const res = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      body: JSON.stringify({ ...body, stream: true }),
    });
    const streamed = (await res.text())
      .split("\n\n")
      .filter((f) => f.startsWith("data: {"))
      .map(
        (f) =>
          (JSON.parse(f.slice(6)) as { choices: { delta: { content?: string } }[] }).choices[0]?.delta.content ?? "",
      )
      .join("");
    expect(streamed).toBe((whole.json.choices as { message: { content: string } }[])[0].message.content);
  });

  test("schemas that are not valid JSON Schema, or that use what the grammar cannot honour, are 400s", async () => {
    const ask = (schema: unknown) =>
      postJson(`${s.url}/v1/chat/completions`, {
        model: M,
        messages: [{ role: "user", content: "x" }],
        response_format: { type: "json_schema", json_schema: { name: "bad", schema } },
      });
    for (const [schema, message] of [
      [{ type: 5 }, /not a valid JSON Schema/],
      [
        { type: "object", properties: { a: { type: "string", not: { const: "x" } } } },
        /'properties\.a\.not' is not supported by structured output/,
      ],
      [{ type: "object", if: { type: "object" } }, /'if' is not supported/],
      [{ type: "object", dependentRequired: { a: ["b"] } }, /'dependentRequired' is not supported/],
      [
        { type: "object", properties: { p: { type: "number", maximum: 1 } } },
        /'properties\.p\.maximum' is supported on integers only/,
      ],
    ] as const) {
      const r = await ask(schema);
      expect(r.status).toBe(400);
      expect((r.json.error as { message: string; param: string }).message).toMatch(message);
      expect((r.json.error as { param: string }).param).toBe("response_format");
    }
    const name = await postJson(`${s.url}/v1/chat/completions`, {
      model: M,
      messages: [{ role: "user", content: "x" }],
      response_format: { type: "json_schema", json_schema: { name: "has space", schema: {} } },
    });
    expect(name.status).toBe(400);
    // The server still serves constrained requests afterwards.
    const ok = await postJson(`${s.url}/v1/chat/completions`, {
      model: M,
      messages: [{ role: "user", content: "x" }],
      max_tokens: 50,
      response_format: { type: "json_schema", json_schema: { name: "ok", schema: SCHEMAS.integer } },
    });
    expect(ok.status).toBe(200);
  });

  test("structured_outputs (vLLM): choice, regex and json on completions and chat", async () => {
    const choice = ["positive", "negative", "neutral"];
    for (let seed = 0; seed < 6; seed++) {
      const r = await postJson(`${s.url}/v1/completions`, {
        model: M,
        prompt: "sentiment:",
        max_tokens: 40,
        seed,
        structured_outputs: { choice },
      });
      const c = (r.json.choices as { text: string; finish_reason: string }[])[0];
      expect(choice).toContain(c.text);
      expect(c.finish_reason).toBe("stop");
    }
    const regex = "[0-9]{3}-[a-z]{2}";
    for (let seed = 0; seed < 6; seed++) {
      const r = await postJson(`${s.url}/v1/chat/completions`, {
        model: M,
        messages: [{ role: "user", content: "code" }],
        max_tokens: 40,
        seed,
        structured_outputs: { regex },
      });
      expect((r.json.choices as { message: { content: string } }[])[0].message.content).toMatch(
        new RegExp(`^${regex}$`),
      );
    }
    const json = await postJson(`${s.url}/v1/completions`, {
      model: M,
      prompt: "x",
      max_tokens: 100,
      seed: 2,
      structured_outputs: { json: SCHEMAS.threeFields },
    });
    expect(ajv.validate(SCHEMAS.threeFields, JSON.parse((json.json.choices as { text: string }[])[0].text))).toBe(true);
    for (const [so, message] of [
      [{ choice: ["a"], regex: "b" }, /exactly one of choice, regex and json \(got choice, regex\)/],
      [{}, /exactly one of choice, regex and json \(got none\)/],
    ] as const) {
      const r = await postJson(`${s.url}/v1/completions`, { model: M, prompt: "x", structured_outputs: so });
      expect(r.status).toBe(400);
      expect((r.json.error as { message: string }).message).toMatch(message);
    }
    const both = await postJson(`${s.url}/v1/completions`, {
      model: M,
      prompt: "x",
      structured_outputs: { regex: "a" },
      response_format: { type: "json_object" },
    });
    expect((both.json.error as { message: string }).message).toMatch(/both constrain the output/);
    // A regex the grammar engine cannot compile is a 400, and the engine serves the next one.
    const broken = await postJson(`${s.url}/v1/completions`, {
      model: M,
      prompt: "x",
      structured_outputs: { regex: "(ab" },
    });
    expect(broken.status).toBe(400);
    expect((broken.json.error as { param: string }).param).toBe("structured_outputs");
    const after = await postJson(`${s.url}/v1/completions`, {
      model: M,
      prompt: "x",
      max_tokens: 20,
      structured_outputs: { choice: ["yes", "no"] },
    });
    expect(["yes", "no"]).toContain((after.json.choices as { text: string }[])[0].text);
    expect(await settled(s)).toBe(true);
  });
});
