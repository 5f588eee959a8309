// The server under hostile input, disconnects, overload, keys, rate limits and
// shutdown, on a random model the test writes (needs nothing outside the repo).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, parseServeArgs, serveConfig } from "../src/server/serve.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { postJson, settled, spawnServer, startTestServer, type TestServer } from "./helpers/server.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-server-"));
const SHAPE = { ...TINY, ctx: 512 };
let modelPath: string;
beforeAll(() => {
  modelPath = writeHfModel(dir, SHAPE, "f32", makeWeights(SHAPE, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const M = "tiny";
const errorShape = (body: Record<string, unknown>) => {
  const e = body.error as Record<string, unknown>;
  return typeof e?.message === "string" && typeof e?.type === "string" && "param" in e && "code" in e;
};

describe("bad input", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer(modelPath, ["--served-model-name", M, "--max-body-bytes", "65536"]);
  });
  afterAll(async () => s?.stop());

  type Case = [string, string, string | Uint8Array, number, RegExp?];
  const cmp = (body: unknown) => JSON.stringify(body);
  const ok = { model: M, prompt: "hello", max_tokens: 2 };
  const chat = { model: M, messages: [{ role: "user", content: "hi" }], max_tokens: 2 };
  const cases: Case[] = [
    ["broken JSON", "/v1/completions", '{"model": ', 400, /parse the JSON/],
    ["not JSON at all", "/v1/completions", "hello", 400, /parse the JSON/],
    ["empty body", "/v1/completions", "", 400],
    ["JSON array body", "/v1/completions", "[1,2]", 400],
    ["invalid UTF-8", "/v1/completions", new Uint8Array([0x7b, 0x22, 0x6d, 0xff, 0xfe, 0x22, 0x7d]), 400, /UTF-8/],
    ["missing model", "/v1/completions", cmp({ prompt: "x" }), 400, /model/],
    ["missing prompt", "/v1/completions", cmp({ model: M }), 400, /prompt/],
    ["unknown model", "/v1/completions", cmp({ ...ok, model: "gpt-4" }), 404, /does not exist/],
    [
      "unknown field",
      "/v1/completions",
      cmp({ ...ok, frobnicate: 1 }),
      400,
      /Unrecognized request argument supplied: frobnicate/,
    ],
    ["model is a number", "/v1/completions", cmp({ ...ok, model: 5 }), 400],
    [
      "prompt is an object",
      "/v1/completions",
      cmp({ ...ok, prompt: { a: 1 } }),
      400,
      /^Invalid value for 'prompt': \{"a":1\} is not a string, a list of strings, a list of token ids, or a list of lists of token ids\.$/,
    ],
    ["prompt is an empty list", "/v1/completions", cmp({ ...ok, prompt: [] }), 400],
    ["prompt is an empty token list", "/v1/completions", cmp({ ...ok, prompt: [[]] }), 400],
    [
      "token id out of vocabulary",
      "/v1/completions",
      cmp({ ...ok, prompt: [1, 99999] }),
      400,
      /outside the vocabulary/,
    ],
    ["negative token id", "/v1/completions", cmp({ ...ok, prompt: [1, -5] }), 400],
    ["max_tokens 0", "/v1/completions", cmp({ ...ok, max_tokens: 0 }), 400, /max_tokens/],
    [
      "max_tokens negative",
      "/v1/completions",
      cmp({ ...ok, max_tokens: -1 }),
      400,
      /^Invalid value for 'max_tokens': -1 is not an integer >= 1 or null\.$/,
    ],
    ["max_tokens as a string", "/v1/completions", cmp({ ...ok, max_tokens: "5" }), 400],
    ["max_tokens fractional", "/v1/completions", cmp({ ...ok, max_tokens: 2.5 }), 400],
    [
      "max_tokens huge",
      "/v1/completions",
      cmp({ ...ok, max_tokens: 1e12 }),
      400,
      /maximum context length is 512 tokens/,
    ],
    [
      "prompt + max_tokens over the context",
      "/v1/completions",
      cmp({ ...ok, max_tokens: 510 }),
      400,
      /maximum context length is 512 tokens, but the request asks for \d+ \(\d+ in the prompt and 510 to generate\)/,
    ],
    ["temperature negative", "/v1/completions", cmp({ ...ok, temperature: -0.5 }), 400, /temperature/],
    [
      "temperature huge",
      "/v1/completions",
      cmp({ ...ok, temperature: 1e9 }),
      400,
      /^Invalid value for 'temperature': 1000000000 is not a number >= 0 and <= 2 or null\.$/,
    ],
    ["temperature NaN-ish string", "/v1/completions", cmp({ ...ok, temperature: "NaN" }), 400],
    ["top_p zero", "/v1/completions", cmp({ ...ok, top_p: 0 }), 400],
    ["top_p over one", "/v1/completions", cmp({ ...ok, top_p: 1.5 }), 400],
    ["top_k below -1", "/v1/completions", cmp({ ...ok, top_k: -7 }), 400],
    ["n zero", "/v1/completions", cmp({ ...ok, n: 0 }), 400],
    ["n huge", "/v1/completions", cmp({ ...ok, n: 1000 }), 400],
    ["logprobs over 20", "/v1/completions", cmp({ ...ok, logprobs: 50 }), 400],
    ["presence_penalty out of range", "/v1/completions", cmp({ ...ok, presence_penalty: 3 }), 400],
    ["stop as a number list", "/v1/completions", cmp({ ...ok, stop: [1, 2] }), 400],
    ["too many stop strings", "/v1/completions", cmp({ ...ok, stop: new Array(20).fill("x") }), 400],
    ["logit_bias with a non-numeric key", "/v1/completions", cmp({ ...ok, logit_bias: { abc: 1 } }), 400],
    ["logit_bias out of vocabulary", "/v1/completions", cmp({ ...ok, logit_bias: { "99999": 1 } }), 400, /logit_bias/],
    ["logit_bias value out of range", "/v1/completions", cmp({ ...ok, logit_bias: { "5": 500 } }), 400],
    ["suffix is not supported", "/v1/completions", cmp({ ...ok, suffix: "end" }), 400],
    ["stream is a string", "/v1/completions", cmp({ ...ok, stream: "yes" }), 400],
    [
      "stream_options without stream",
      "/v1/completions",
      cmp({ ...ok, stream_options: { include_usage: true } }),
      400,
      /stream_options/,
    ],
    ["chat: empty messages", "/v1/chat/completions", cmp({ ...chat, messages: [] }), 400],
    [
      "chat: invalid role",
      "/v1/chat/completions",
      cmp({ ...chat, messages: [{ role: "wizard", content: "hi" }] }),
      400,
    ],
    ["chat: missing content", "/v1/chat/completions", cmp({ ...chat, messages: [{ role: "user" }] }), 400],
    [
      "chat: content is a number",
      "/v1/chat/completions",
      cmp({ ...chat, messages: [{ role: "user", content: 42 }] }),
      400,
    ],
    ["chat: messages is a string", "/v1/chat/completions", cmp({ ...chat, messages: "hi" }), 400],
    [
      "chat: top_logprobs without logprobs",
      "/v1/chat/completions",
      cmp({ ...chat, top_logprobs: 3 }),
      400,
      /top_logprobs/,
    ],
    ["chat: unknown model", "/v1/chat/completions", cmp({ ...chat, model: "nope" }), 404],
    [
      "chat: tool_choice naming no tool",
      "/v1/chat/completions",
      cmp({ ...chat, tool_choice: "required" }),
      400,
      /tool_choice 'required' needs tools/,
    ],
    ["batch: empty prompts", "/v1/completions/batch", cmp({ model: M, prompts: [] }), 400],
    ["tokenize: no prompt", "/tokenize", cmp({ model: M }), 400],
    ["detokenize: id out of vocabulary", "/detokenize", cmp({ model: M, tokens: [1, 100000] }), 400],
    ["oversize body", "/v1/completions", cmp({ ...ok, prompt: "x".repeat(100_000) }), 413, /limit/],
  ];

  test(`${cases.length} malformed or hostile requests get the right status and OpenAI's error shape`, async () => {
    expect(cases.length).toBeGreaterThanOrEqual(40);
    const wrong: string[] = [];
    for (const [name, path, body, status, message] of cases) {
      const res = await fetch(s.url + path, { method: "POST", headers: { "content-type": "application/json" }, body });
      const json = (await res.json().catch(() => ({}))) as Record<string, unknown>;
      if (
        res.status !== status ||
        !errorShape(json) ||
        (message && !message.test((json.error as { message: string }).message))
      ) {
        wrong.push(`${name}: ${res.status} ${JSON.stringify(json)}`);
      }
    }
    expect(wrong).toEqual([]);
  });

  test("unknown routes are 404s in the same shape, and the server still serves", async () => {
    const res = await fetch(`${s.url}/v1/nothing-here`);
    expect(res.status).toBe(404);
    expect(errorShape((await res.json()) as Record<string, unknown>)).toBe(true);
    const good = await postJson(`${s.url}/v1/completions`, ok);
    expect(good.status).toBe(200);
    expect(await settled(s)).toBe(true);
  });
});

describe("disconnects and overload", () => {
  test("20 streams cut at random points leave no running request and a fully free pool", async () => {
    const s = await startTestServer(modelPath, ["--served-model-name", M]);
    try {
      let seed = 7;
      const rand = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
      await Promise.all(
        Array.from({ length: 20 }, async (_, i) => {
          const ctrl = new AbortController();
          const res = await fetch(`${s.url}/v1/completions`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ model: M, prompt: `story ${i}`, max_tokens: 400, stream: true, ignore_eos: true }),
            signal: ctrl.signal,
          });
          const reader = res.body!.getReader();
          const cutAfter = 1 + Math.floor(rand() * 30);
          for (let chunks = 0; chunks < cutAfter; chunks++) await reader.read();
          ctrl.abort();
          await reader.cancel().catch(() => {});
        }),
      );
      expect(await settled(s)).toBe(true);
      expect(s.server.engine.numRunning).toBe(0);
      expect(s.server.engine.numWaiting).toBe(0);
    } finally {
      await s.stop();
    }
  });

  test("with --max-num-seqs 4 --max-queue-len 8, 40 simultaneous requests: at most 12 in, clean 429s for the rest", async () => {
    const s = await startTestServer(modelPath, [
      "--served-model-name",
      M,
      "--max-num-seqs",
      "4",
      "--max-queue-len",
      "8",
    ]);
    try {
      const results = await Promise.all(
        Array.from({ length: 40 }, (_, i) =>
          fetch(`${s.url}/v1/completions`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ model: M, prompt: `request ${i}`, max_tokens: 64, ignore_eos: true }),
            signal: AbortSignal.timeout(60_000),
          }).then(async (r) => ({
            status: r.status,
            retryAfter: r.headers.get("retry-after"),
            body: (await r.json()) as Record<string, unknown>,
          })),
        ),
      );
      const ok = results.filter((r) => r.status === 200);
      const limited = results.filter((r) => r.status === 429);
      expect(ok.length + limited.length).toBe(40);
      expect(ok.length).toBeGreaterThanOrEqual(4);
      expect(ok.length).toBeLessThanOrEqual(12);
      for (const r of limited) {
        expect(r.retryAfter).not.toBeNull();
        expect(errorShape(r.body)).toBe(true);
      }
      expect(await settled(s)).toBe(true);
    } finally {
      await s.stop();
    }
  });
});

describe("keys, limits, metrics and docs", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer(modelPath, [
      "--served-model-name",
      M,
      "--api-key",
      "k1",
      "--api-key",
      "k2",
      "--rate-limit",
      "5/min",
    ]);
  });
  afterAll(async () => s?.stop());
  const auth = (key: string) => ({ authorization: `Bearer ${key}` });

  test("every /v1 route needs a valid key; /health and /metrics stay open", async () => {
    expect((await fetch(`${s.url}/v1/models`)).status).toBe(401);
    const wrong = await fetch(`${s.url}/v1/models`, { headers: auth("nope") });
    expect(wrong.status).toBe(401);
    expect(((await wrong.json()) as { error: { code: string } }).error.code).toBe("invalid_api_key");
    // A key check comes before validation: a bad body without a key is a 401, not a 400.
    expect((await postJson(`${s.url}/v1/completions`, { nonsense: true })).status).toBe(401);
    expect((await fetch(`${s.url}/v1/models`, { headers: auth("k2") })).status).toBe(200);
    expect((await fetch(`${s.url}/health`)).status).toBe(200);
    expect((await fetch(`${s.url}/metrics`)).status).toBe(200);
  });

  test("the rate limit answers 429 with Retry-After once a key spends its window", async () => {
    const statuses = [];
    for (let i = 0; i < 7; i++) statuses.push((await fetch(`${s.url}/v1/models`, { headers: auth("k1") })).status);
    // One k1 call was spent above; five per minute per key.
    expect(statuses.filter((x) => x === 429).length).toBeGreaterThanOrEqual(2);
    const limited = await fetch(`${s.url}/v1/models`, { headers: auth("k1") });
    expect(limited.status).toBe(429);
    expect(Number(limited.headers.get("retry-after"))).toBeGreaterThan(0);
  });

  test("/metrics: Prometheus text for a scraper, JSON otherwise", async () => {
    await postJson(
      `${s.url}/v1/completions`,
      { model: M, prompt: "count me", max_tokens: 3, ignore_eos: true },
      auth("k2"),
    );
    const text = await (await fetch(`${s.url}/metrics`, { headers: { accept: "text/plain;version=0.0.4" } })).text();
    for (const name of [
      "num_requests_running",
      "num_requests_waiting",
      "kv_cache_usage_perc",
      "prompt_tokens_total",
      "generation_tokens_total",
      "num_preemptions_total",
      "prefix_cache_queries_total",
      "prefix_cache_hits_total",
      "time_to_first_token_seconds_bucket",
      "inter_token_latency_seconds_bucket",
      "e2e_request_latency_seconds_bucket",
      "request_queue_time_seconds_bucket",
    ]) {
      expect(text).toContain(`inferneo:${name}`);
    }
    expect(text).toMatch(/inferneo:generation_tokens_total\{model_name="tiny"\} 3/);
    const json = (await (await fetch(`${s.url}/metrics`)).json()) as Record<string, unknown>;
    expect(json).toMatchObject({
      active_requests: 0,
      queue_size: 0,
      gpu_utilization: null,
      generation_tokens_total: 3,
    });
  });

  test("the OpenAPI document lists every route, and /docs works offline", async () => {
    const spec = (await (await fetch(`${s.url}/openapi.json`)).json()) as {
      paths: Record<string, Record<string, unknown>>;
    };
    const routes = Object.entries(spec.paths).flatMap(([p, ops]) =>
      Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`),
    );
    for (const r of [
      "POST /v1/completions",
      "POST /v1/chat/completions",
      "POST /v1/completions/batch",
      "GET /v1/models",
      "GET /health",
      "GET /version",
      "GET /metrics",
      "POST /tokenize",
      "POST /detokenize",
    ]) {
      expect(routes).toContain(r);
    }
    expect(routes.some((r) => r.startsWith("WS "))).toBe(false);
    // Every POST route declares its JSON body by a named schema, and its answers' schemas.
    const doc = spec as unknown as {
      info: { description: string };
      paths: Record<
        string,
        Record<
          string,
          {
            requestBody?: { content: Record<string, { schema: { $ref: string }; example: unknown }> };
            responses?: Record<string, unknown>;
          }
        >
      >;
      components: { schemas: Record<string, { properties?: Record<string, unknown> }> };
    };
    for (const [path, name] of [
      ["/v1/completions", "CompletionRequest"],
      ["/v1/chat/completions", "ChatCompletionRequest"],
      ["/v1/completions/batch", "BatchCompletionRequest"],
      ["/tokenize", "TokenizeRequest"],
      ["/detokenize", "DetokenizeRequest"],
    ]) {
      const op = doc.paths[path].post;
      expect(op.requestBody?.content["application/json"].schema.$ref).toBe(`#/components/schemas/${name}`);
      expect(op.requestBody?.content["application/json"].example).toMatchObject({ model: "tiny" });
      expect(Object.keys(op.responses ?? {})).toContain("200");
    }
    expect(Object.keys(doc.components.schemas.CompletionRequest.properties ?? {})).toContain("max_tokens");
    expect(doc.info.description).toContain("request_id");
    const html = await (await fetch(`${s.url}/docs`)).text();
    expect(html).toContain("/docs/assets/swagger-ui-bundle.js");
    expect(html).not.toContain("unpkg.com/swagger-ui-dist@latest/swagger-ui-bundle.js");
    const js = await fetch(`${s.url}/docs/assets/swagger-ui-bundle.js`);
    expect(js.status).toBe(200);
    expect((await js.text()).length).toBeGreaterThan(100_000);
  });

  test("tokenize and detokenize round-trip", async () => {
    const t = await postJson(`${s.url}/tokenize`, { model: M, prompt: "the cat" }, auth("k2"));
    expect(t.status).toBe(200);
    const tokens = t.json.tokens as number[];
    expect(t.json.count).toBe(tokens.length);
    const d = await postJson(`${s.url}/detokenize`, { model: M, tokens }, auth("k2"));
    expect(d.json.prompt).toBe("the cat");
  });
});

describe("configuration", () => {
  test("a YAML file sets options, flags override it, and unknown keys or bad values are refused by name", () => {
    const file = join(dir, "config.yaml");
    writeFileSync(
      file,
      "model: some/model\nport: 9001\nmax_num_seqs: 8\nmax_model_len: 256\napi_key: [a, b]\nenable_prefix_caching: false\n",
    );
    const c = serveConfig(parseServeArgs(["--config", file, "--port", "9002"], {}));
    expect(c.port).toBe(9002);
    expect(c.engine).toMatchObject({ maxNumSeqs: 8, maxModelLen: 256, enablePrefixCaching: false });
    expect(c.server.apiKeys).toEqual(["a", "b"]);
    // A relative model path means the config file's folder when it is there.
    writeFileSync(file, "model: hf\n");
    expect(serveConfig(parseServeArgs(["--config", file], {})).model).toBe(modelPath);
    writeFileSync(file, "model: m\nmax_num_seq: 8\n");
    expect(() => parseServeArgs(["--config", file], {})).toThrow("unknown key 'max_num_seq'");
    writeFileSync(file, "model: m\nmax_num_seqs: lots\n");
    expect(() => parseServeArgs(["--config", file], {})).toThrow(/max_num_seqs must be a non-negative integer/);
    writeFileSync(file, "model: m\ntensor_parallel_size: 2\n");
    expect(() => serveConfig(parseServeArgs(["--config", file], {}))).toThrow(
      /tensor_parallel_size 2 needs several GPUs/,
    );
    const gpu = serveConfig(parseServeArgs(["--model", "m", "--gpu-memory-utilization", "0.8", "--enforce-eager"], {}));
    expect(gpu.engine.gpuMemoryUtilization).toBe(0.8);
    expect(gpu.engine.enforceEager).toBe(true);
    expect(serveConfig(parseServeArgs(["--model", "m", "--no-async-scheduling"], {})).engine.asyncScheduling).toBe(
      false,
    );
    expect(() => serveConfig(parseServeArgs(["--model", "m", "--gpu-memory-utilization", "1.5"], {}))).toThrow(
      ConfigError,
    );
    expect(serveConfig(parseServeArgs(["--model", "m"], { INFERNEO_API_KEY: "from-env" })).server.apiKeys).toEqual([
      "from-env",
    ]);
    expect(serveConfig(parseServeArgs(["--model", "m", "--kv-cache-dtype", "f16"], {})).engine.kvCacheDtype).toBe(
      "f16",
    );
    expect(() => serveConfig(parseServeArgs(["--model", "m", "--kv-cache-dtype", "int4"], {}))).toThrow(
      /kv_cache_dtype must be auto, f32 or f16/,
    );
    expect(serveConfig(parseServeArgs(["--model", "m", "--dtype", "bfloat16"], {})).engine.computeDtype).toBe("bf16");
    expect(serveConfig(parseServeArgs(["--model", "m", "--dtype", "auto"], {})).engine.computeDtype).toBe("f32");
    // Which library runs is decided when the engine starts (the CLI test starts one without a GPU).
    expect(serveConfig(parseServeArgs(["--model", "m", "--device", "cuda"], {})).engine.device).toBe("cuda");
    expect(serveConfig(parseServeArgs(["--model", "m", "--device", "auto"], {})).engine.device).toBe("auto");
    expect(() => serveConfig(parseServeArgs(["--model", "m", "--device", "tpu"], {}))).toThrow(
      /device must be auto, cpu or cuda/,
    );
    expect(() => serveConfig(parseServeArgs(["--model", "m", "--dtype", "float16"], {}))).toThrow(
      /dtype must be auto, float32 or bfloat16/,
    );
  });

  test("SIGTERM drains: new requests get 503, the ones in flight finish, exit code 0", async () => {
    const { url, proc } = await spawnServer([
      "--model",
      modelPath,
      "--served-model-name",
      M,
      "--threads",
      "1",
      "--max-num-seqs",
      "1",
    ]);
    // One at a time, so that the drain outlasts the checks below.
    const inflight = Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        postJson(`${url}/v1/completions`, { model: M, prompt: `long one ${i}`, max_tokens: 480, ignore_eos: true }),
      ),
    );
    await Bun.sleep(50);
    proc.kill("SIGTERM");
    await Bun.sleep(50);
    const health = await fetch(`${url}/health`);
    expect(health.status).toBe(503);
    const late = await postJson(`${url}/v1/completions`, { model: M, prompt: "late", max_tokens: 2 });
    expect(late.status).toBe(503);
    for (const done of await inflight) {
      expect(done.status).toBe(200);
      expect((done.json.choices as { finish_reason: string }[])[0].finish_reason).toBe("length");
    }
    expect(await proc.exited).toBe(0);
  });
});
