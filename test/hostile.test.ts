// A hostile-input suite: each class of input the server parses (the body's bytes and
// JSON, prompts, messages, sampling fields, stop strings, token ids, headers and query
// strings), on each transport (the JSON routes and WebSocket messages). Every case gets
// its status in OpenAI's error shape, the server stays up, and afterwards the KV pool is
// whole and no request is left in the queues.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { settled, startTestServer, type TestServer } from "./helpers/server.ts";

setDefaultTimeout(120_000);

const M = "tiny";
const dir = mkdtempSync(join(tmpdir(), "inferneo-hostile-"));
let s: TestServer;
beforeAll(async () => {
  const SHAPE = { ...TINY, ctx: 512 };
  s = await startTestServer(writeHfModel(dir, SHAPE, "f32", makeWeights(SHAPE, "f32")), [
    "--served-model-name",
    M,
    "--max-body-bytes",
    "262144",
  ]);
});
afterAll(async () => {
  await s?.stop();
  rmSync(dir, { recursive: true, force: true });
});

type Json = Record<string, unknown>;
const isErrorShape = (body: unknown) => {
  const e = (body as Json | null)?.error as Json | undefined;
  return typeof e?.message === "string" && typeof e?.type === "string" && "param" in e && "code" in e;
};

const chat = (over: Json) => ({ model: M, messages: [{ role: "user", content: "hi" }], max_tokens: 2, ...over });
const cmpl = (over: Json) => ({ model: M, prompt: "hi", max_tokens: 2, ...over });

/** Field values no client should send, each refused with a 400 wherever the field is read. */
const BAD_FIELDS: [string, Json][] = [
  ["max_tokens as an object", { max_tokens: { $gt: 1 } }],
  ["max_tokens past 2^53", { max_tokens: 2 ** 60 }],
  ["temperature as a string", { temperature: "hot" }],
  ["temperature as a list", { temperature: [1] }],
  ["negative top_p", { top_p: -1 }],
  ["top_k fractional", { top_k: 2.5 }],
  ["seed past 2^53", { seed: 2 ** 60 }],
  ["stop with an empty string", { stop: [""] }],
  ["stop as an object", { stop: { a: 1 } }],
  ["stop_token_ids out of vocabulary", { stop_token_ids: [1e9] }],
  ["logit_bias with a negative id", { logit_bias: { "-5": 1 } }],
  ["logit_bias values as strings", { logit_bias: { "5": "100" } }],
  ["logit_bias with a fractional id", { logit_bias: { "5.5": 1 } }],
  ["min_tokens above max_tokens", { min_tokens: 50 }],
  ["n as a string", { n: "2" }],
  ["n past the sequence bound", { n: 17 }],
  ["a prototype key", JSON.parse('{"__proto__": {"admin": true}}') as Json],
  ["a constructor key", { constructor: { name: "x" } }],
  ["user over 256 characters", { user: "u".repeat(300) }],
];

/** Request bodies per route: [name, body, status]. */
function httpCases(): [string, string, string | Uint8Array, number][] {
  const j = JSON.stringify;
  const cases: [string, string, string | Uint8Array, number][] = [];
  for (const [name, field] of BAD_FIELDS) {
    cases.push([`completions: ${name}`, "/v1/completions", j(cmpl(field)), 400]);
    cases.push([`chat: ${name}`, "/v1/chat/completions", j(chat(field)), 400]);
    cases.push([
      `batch: ${name}`,
      "/v1/completions/batch",
      j({ model: M, prompts: ["hi"], max_tokens: 2, ...field }),
      400,
    ]);
  }
  cases.push(
    [
      "bytes: a lone surrogate escape is fine JSON, refused as a model name",
      "/v1/completions",
      '{"model":"\\ud800","prompt":"x"}',
      404,
    ],
    ["bytes: a NUL byte in the body", "/v1/completions", new Uint8Array([0x7b, 0x00, 0x7d]), 400],
    [
      "bytes: a UTF-8 BOM before the JSON is skipped, as RFC 8259 allows",
      "/v1/completions",
      `\ufeff${j(cmpl({}))}`,
      200,
    ],
    ["bytes: overlong UTF-8", "/v1/completions", new Uint8Array([0x7b, 0xc0, 0xaf, 0x7d]), 400],
    ["json: a number body", "/v1/completions", "42", 400],
    ["json: null", "/v1/completions", "null", 400],
    ["json: a string body", "/v1/chat/completions", '"hello"', 400],
    [
      "json: duplicate keys, the last one bad",
      "/v1/completions",
      `{"model":"${M}","prompt":"x","max_tokens":2,"max_tokens":-4}`,
      400,
    ],
    ["json: 65 levels of objects", "/v1/completions", `${'{"a":'.repeat(65)}1${"}".repeat(65)}`, 400],
    ["json: a 200 KB string of escapes", "/v1/completions", j(cmpl({ prompt: "\\u0000".repeat(30_000) })), 400],
    ["prompt: 100,000 token ids", "/v1/completions", j(cmpl({ prompt: Array.from({ length: 30_000 }, () => 5) })), 400],
    ["prompt: ids as floats", "/v1/completions", j(cmpl({ prompt: [1.5, 2] })), 400],
    ["prompt: a mix of ids and strings", "/v1/completions", j(cmpl({ prompt: [1, "a"] })), 400],
    ["prompt: 65 prompts", "/v1/completions", j(cmpl({ prompt: Array.from({ length: 65 }, () => "a") })), 400],
    ["prompt: 100 KB of one character", "/v1/completions", j(cmpl({ prompt: "a".repeat(100_000) })), 400],
    [
      "prompt: emoji and combining marks past the context",
      "/v1/completions",
      j(cmpl({ prompt: "e\u0301\u{1F600}".repeat(20_000) })),
      400,
    ],
    [
      "messages: a role the API does not know",
      "/v1/chat/completions",
      j(chat({ messages: [{ role: "tool", content: "x" }] })),
      400,
    ],
    [
      "messages: 5,000 short messages past the context",
      "/v1/chat/completions",
      j(chat({ messages: Array.from({ length: 5000 }, () => ({ role: "user", content: "hello there" })) })),
      400,
    ],
    [
      "messages: a content part of an unknown type",
      "/v1/chat/completions",
      j(chat({ messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }] })),
      400,
    ],
    [
      "messages: Jinja in the content stays text",
      "/v1/chat/completions",
      j(
        chat({
          messages: [{ role: "user", content: "{{ raise_exception('x') }}{% for x in range(10**9) %}{% endfor %}" }],
        }),
      ),
      200,
    ],
    [
      "batch: 257 prompts",
      "/v1/completions/batch",
      j({ model: M, prompts: Array.from({ length: 257 }, () => "a") }),
      400,
    ],
    [
      "batch: 64 prompts x n=8 past the sequence bound",
      "/v1/completions/batch",
      j({ model: M, prompts: Array.from({ length: 64 }, () => "a"), n: 8 }),
      400,
    ],
    [
      "tokenize: both prompt and messages",
      "/tokenize",
      j({ model: M, prompt: "a", messages: [{ role: "user", content: "b" }] }),
      400,
    ],
    ["tokenize: 200 KB prompt", "/tokenize", j({ model: M, prompt: "z".repeat(200_000) }), 400],
    ["detokenize: negative ids", "/detokenize", j({ model: M, tokens: [-1] }), 400],
    [
      "detokenize: more ids than the context",
      "/detokenize",
      j({ model: M, tokens: Array.from({ length: 600 }, () => 5) }),
      400,
    ],
    ["detokenize: ids as strings", "/detokenize", j({ model: M, tokens: ["5"] }), 400],
  );
  return cases;
}

describe("hostile input on every transport", () => {
  test("HTTP: every case gets its status in OpenAI's shape", async () => {
    const cases = httpCases();
    expect(cases.length).toBeGreaterThanOrEqual(70);
    const wrong: string[] = [];
    for (const [name, path, body, status] of cases) {
      const res = await fetch(s.url + path, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
        signal: AbortSignal.timeout(30_000),
      });
      const json = await res.json().catch(() => null);
      if (res.status !== status || (status !== 200 && !isErrorShape(json)))
        wrong.push(`${name}: ${res.status} ${JSON.stringify(json)?.slice(0, 200)}`);
    }
    expect(wrong).toEqual([]);
    expect(({} as Json).admin).toBeUndefined(); // no prototype was polluted
  });

  test("headers and query strings: keys, content types and methods in odd forms", async () => {
    const body = JSON.stringify(cmpl({}));
    const checks: [string, Promise<Response>, number][] = [
      [
        "an Authorization header with no key, keys off",
        fetch(`${s.url}/v1/completions`, { method: "POST", headers: { authorization: "Bearer " }, body }),
        200,
      ],
      [
        "a content type of XML",
        fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/xml" }, body }),
        200,
      ],
      [
        "a query string of 1,000 parameters",
        fetch(`${s.url}/v1/models?${Array.from({ length: 1000 }, (_, i) => `p${i}=1`).join("&")}`),
        200,
      ],
      ["a path with encoded traversal", fetch(`${s.url}/docs/assets/..%2F..%2Fpackage.json`), 404],
      ["a HEAD on a POST route", fetch(`${s.url}/v1/completions`, { method: "HEAD" }), 405],
    ];
    const wrong: string[] = [];
    for (const [name, pending, status] of checks) {
      const res = await pending;
      if (res.status !== status) wrong.push(`${name}: ${res.status}`);
      await res.body?.cancel();
    }
    expect(wrong).toEqual([]);
  });

  test("WebSocket: every hostile message gets an error frame with its request_id, and the socket keeps serving", async () => {
    const ws = new WebSocket(`${s.url.replace("http", "ws")}/v1/chat/completions`);
    const frames: Json[] = [];
    let wake: (() => void) | null = null;
    ws.onmessage = (e) => {
      frames.push(String(e.data) === "[DONE]" ? { done: true } : (JSON.parse(String(e.data)) as Json));
      wake?.();
    };
    await new Promise((r) => (ws.onopen = r));
    const reply = async (message: string | Uint8Array, id: string | null): Promise<Json> => {
      frames.length = 0;
      ws.send(message);
      const deadline = Date.now() + 20_000;
      for (;;) {
        const end = frames.find((f) => f.error || f.done);
        if (end) return end;
        if (Date.now() > deadline) throw new Error(`no answer to ${String(message).slice(0, 60)}`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 100);
        });
      }
    };
    const wrong: string[] = [];
    const messages: [string, string | Uint8Array, string | null][] = [
      ["not JSON", "{", null],
      ["binary garbage", new Uint8Array([0xff, 0xfe, 0x00]), null],
      ["an array", "[1,2,3]", null],
      ["nested 100 levels", "[".repeat(100) + "]".repeat(100), null],
      ["request_id a number", JSON.stringify({ ...chat({}), request_id: 5 }), null],
      ["request_id of 1,000 characters", JSON.stringify({ ...chat({}), request_id: "x".repeat(1000) }), null],
      ...BAD_FIELDS.map(([name, field], i): [string, string, string] => [
        name,
        JSON.stringify({ ...chat(field), request_id: `bad-${i}` }),
        `bad-${i}`,
      ]),
      [
        "messages past the context",
        JSON.stringify({ ...chat({ messages: [{ role: "user", content: "a".repeat(100_000) }] }), request_id: "long" }),
        "long",
      ],
    ];
    for (const [name, message, id] of messages) {
      const frame = await reply(message, id);
      if (!isErrorShape(frame) || (id !== null && frame.request_id !== id))
        wrong.push(`${name}: ${JSON.stringify(frame).slice(0, 200)}`);
    }
    expect(wrong).toEqual([]);
    expect(await reply(JSON.stringify({ ...chat({}), request_id: "fine" }), "fine")).toEqual({
      request_id: "fine",
      done: true,
    });
    ws.close();
  });

  test("afterwards the server is up, the pool is whole and the queues are empty", async () => {
    expect((await fetch(`${s.url}/health`)).status).toBe(200);
    expect(await settled(s)).toBe(true);
    expect(s.server.engine.numRunning).toBe(0);
    expect(s.server.engine.numWaiting).toBe(0);
    const metrics = (await (await fetch(`${s.url}/metrics`)).json()) as Json;
    expect(metrics.kv_cache_blocks_free).toBe(metrics.kv_cache_blocks_total);
  });
});
