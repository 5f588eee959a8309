// The server against hostile input and misuse, as the hardening review found it: no
// input may stall the event loop, every limit holds on every route and transport,
// the numbers a client reads are right, and statuses and shapes are OpenAI's. Runs on
// a random model the test writes (nothing outside the repository).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { Elysia } from "elysia";
import { mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadModel } from "../src/model/load.ts";
import { IN_PLACE_CHARS_MAX, TokenizerThread } from "../src/model/tokenizer_thread.ts";
import { CompletionRequest } from "../src/server/schemas.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { postJson, settled, spawnServer, startTestServer, type TestServer } from "./helpers/server.ts";

setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-hardening-"));
const SHAPE = { ...TINY, ctx: 512 };
const M = "tiny";
let modelPath: string;
beforeAll(() => {
  modelPath = writeHfModel(dir, SHAPE, "f32", makeWeights(SHAPE, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

type Json = Record<string, unknown>;
const errorOf = (body: Json) =>
  body.error as { message: string; type: string; param: string | null; code: string | null };
const isErrorShape = (body: Json) => {
  const e = body?.error as Json | undefined;
  return typeof e?.message === "string" && typeof e?.type === "string" && "param" in e && "code" in e;
};

/** One raw HTTP/1.x exchange on loopback (for requests fetch will not send). */
function rawHttp(url: string, request: string): Promise<string> {
  const { port } = new URL(url);
  return new Promise((resolve) => {
    const socket = connect(Number(port), "127.0.0.1");
    let out = "";
    socket.on("data", (d) => (out += d));
    socket.on("close", () => resolve(out));
    socket.on("error", () => resolve(out));
    socket.write(request);
    setTimeout(() => socket.end(), 2000);
  });
}
const statusOf = (raw: string) => Number(/^HTTP\/1\.[01] (\d+)/.exec(raw)?.[1] ?? 0);
const bodyOf = (raw: string) => JSON.parse(raw.slice(raw.indexOf("\r\n\r\n") + 4)) as Json;

/** Reads a WebSocket's frames as they come. */
function openSocket(url: string, headers: Record<string, string> = {}) {
  const ws = new WebSocket(url.replace("http", "ws") + "/v1/chat/completions", { headers } as unknown as string[]);
  const inbox: string[] = [];
  let wake: (() => void) | null = null;
  ws.onmessage = (e) => {
    inbox.push(String(e.data));
    wake?.();
  };
  const opened = new Promise<boolean>((resolve) => {
    ws.onopen = () => resolve(true);
    ws.onerror = () => resolve(false);
    ws.onclose = () => resolve(false);
  });
  const next = async (): Promise<string> => {
    const deadline = Date.now() + 20_000;
    while (inbox.length === 0) {
      if (Date.now() > deadline) throw new Error("no frame within 20 s");
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 100);
      });
    }
    return inbox.shift()!;
  };
  return { ws, opened, next };
}

describe("no input stalls the event loop", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer(modelPath, ["--served-model-name", M]);
  });
  afterAll(async () => s?.stop());

  const deep = (depth: number) => "[".repeat(depth) + "]".repeat(depth);

  test("20,000 nested arrays (40 KB) are refused at once on every JSON route, in less than a quarter of what 2,000 cost unbounded", async () => {
    // The control: only 2,000 levels through the same framework's validation, without the depth bound.
    const unbounded = new Elysia().post("/", () => "ok", { body: CompletionRequest });
    const t0 = performance.now();
    await unbounded.handle(
      new Request("http://localhost/", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: `{"model":"${M}","prompt":${deep(2000)}}`,
      }),
    );
    const controlMs = performance.now() - t0;

    const bodies: [string, string][] = [
      ["/v1/completions", deep(20_000)],
      ["/v1/completions", `{"model":"${M}","prompt":${deep(20_000)}}`],
      ["/tokenize", `{"model":"${M}","prompt":${deep(20_000)}}`],
      ["/v1/chat/completions", `{"model":"${M}","messages":[{"role":"user","content":${deep(20_000)}}]}`],
    ];
    // A fresh server's first request pays for its connection and for compiling the route (tens
    // of milliseconds here, 1,000 times a warm one): warm each route with a shallow body first.
    for (const [path] of bodies) await (await fetch(s.url + path, { method: "POST", body: deep(10) })).text();
    const rssBefore = process.memoryUsage().rss;
    for (const [path, body] of bodies) {
      const start = performance.now();
      const hostile = fetch(s.url + path, { method: "POST", body }).then(async (r) => ({
        status: r.status,
        json: (await r.json()) as Json,
        at: performance.now(),
      }));
      const health = fetch(`${s.url}/health`).then((r) => ({ status: r.status, at: performance.now() }));
      const [h, ok] = await Promise.all([hostile, health]);
      expect(h.status).toBe(400);
      expect(errorOf(h.json).code).toBe("too_deep");
      expect(ok.status).toBe(200);
      expect(h.at - start).toBeLessThan(controlMs / 4);
    }
    expect(controlMs).toBeGreaterThan(20); // the control is slow enough to mean something
    // Process memory grows by at most 500 times what was sent (it grew by gigabytes).
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(500 * 4 * 40_002);
  });

  test("a 1 MB prompt is refused by its length before it is tokenized, faster than tokenizing a tenth of it", async () => {
    const model = await loadModel(modelPath);
    const prompt = "once upon a time ".repeat(61_700); // ~1 MB
    const t0 = performance.now();
    model.tokenizer.encode(prompt.slice(0, 100_000));
    const controlMs = performance.now() - t0;
    for (const [path, body] of [
      ["/v1/completions", { model: M, prompt }],
      ["/tokenize", { model: M, prompt }],
      ["/v1/chat/completions", { model: M, messages: [{ role: "user", content: prompt }] }],
    ] as const) {
      const start = performance.now();
      const r = await postJson(s.url + path, body);
      expect(r.status).toBe(400);
      expect(errorOf(r.json).message).toMatch(
        /maximum context length is 512 tokens; a (prompt|messages) of \d+ characters cannot fit/,
      );
      expect(performance.now() - start).toBeLessThan(controlMs);
    }
  });

  test("a large prompt that may fit is tokenized on the worker: a timer keeps ticking through it", async () => {
    const model = await loadModel(modelPath);
    const thread = new TokenizerThread(model.tokenizer);
    const text = "the quick brown fox jumps over the lazy dog ".repeat(8000); // 352 KB: about a second
    expect(text.length).toBeGreaterThan(IN_PLACE_CHARS_MAX);
    try {
      await thread.encode("x".repeat(IN_PLACE_CHARS_MAX + 1)); // start the worker
      const ticks: number[] = [];
      const timer = setInterval(() => ticks.push(performance.now()), 5);
      const start = performance.now();
      const ids = await thread.encode(text);
      const elapsedMs = performance.now() - start;
      clearInterval(timer);
      expect(ids).toEqual(model.tokenizer.encode(text));
      let maxGap = 0;
      for (let i = 1; i < ticks.length; i++) maxGap = Math.max(maxGap, ticks[i] - ticks[i - 1]);
      expect(elapsedMs).toBeGreaterThan(100);
      expect(ticks.length).toBeGreaterThan(elapsedMs / 5 / 4);
      expect(maxGap).toBeLessThan(elapsedMs / 2);
      // The same text in place blocks the timer (the check above can fail).
      const blocked: number[] = [];
      const timer2 = setInterval(() => blocked.push(performance.now()), 5);
      model.tokenizer.encode(text);
      await Bun.sleep(0);
      clearInterval(timer2);
      expect(blocked.length).toBeLessThanOrEqual(1);
    } finally {
      thread.terminate();
    }
  });
});

describe("rate limits hold on every route and transport", () => {
  test("streams are charged; a WebSocket counts each message; /tokenize and /detokenize are limited", async () => {
    const s = await startTestServer(modelPath, [
      "--served-model-name",
      M,
      "--rate-limit",
      "3/min",
      "--rate-limit-tokens",
      "30",
    ]);
    try {
      const body = { model: M, prompt: "hello", max_tokens: 40, ignore_eos: true, stream: true };
      const first = await fetch(`${s.url}/v1/completions`, { method: "POST", body: JSON.stringify(body) });
      expect(first.status).toBe(200);
      await first.text();
      // The stream spent 40+ tokens of 30: the next request of any kind is refused.
      const next = await postJson(`${s.url}/v1/completions`, { ...body, stream: false, max_tokens: 2 });
      expect(next.status).toBe(429);
      expect(next.headers.get("retry-after")).not.toBeNull();
      expect((await postJson(`${s.url}/tokenize`, { model: M, prompt: "hi" })).status).toBe(429);
      expect((await postJson(`${s.url}/detokenize`, { model: M, tokens: [5] })).status).toBe(429);
    } finally {
      await s.stop();
    }
    const w = await startTestServer(modelPath, ["--served-model-name", M, "--rate-limit", "3/min"]);
    try {
      const { ws, opened, next } = openSocket(w.url);
      expect(await opened).toBe(true);
      const statuses: string[] = [];
      for (let i = 0; i < 5; i++) {
        ws.send(
          JSON.stringify({ request_id: `r${i}`, model: M, messages: [{ role: "user", content: "hi" }], max_tokens: 2 }),
        );
        for (;;) {
          const frame = JSON.parse(await next()) as Json;
          expect(frame.request_id).toBe(`r${i}`);
          if (frame.done) statuses.push("ok");
          else if (frame.error) statuses.push(errorOf(frame).type);
          else continue;
          break;
        }
      }
      expect(statuses).toEqual(["ok", "ok", "ok", "rate_limit_error", "rate_limit_error"]);
      ws.close();
      // The budget is the caller's, whichever route: /tokenize is refused too.
      expect((await postJson(`${w.url}/tokenize`, { model: M, prompt: "hi" })).status).toBe(429);
      expect(await settled(w)).toBe(true);
    } finally {
      await w.stop();
    }
  });
});

describe("numbers, statuses and shapes", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer(modelPath, [
      "--served-model-name",
      M,
      "--max-body-bytes",
      "65536",
      "--max-header-bytes",
      "8KiB",
      "--max-seqs-per-request",
      "32",
    ]);
  });
  afterAll(async () => s?.stop());

  test("the batch route reports completion and cached tokens without logprobs", async () => {
    const prompt = Array.from({ length: 40 }, (_, i) => 3 + i);
    await postJson(`${s.url}/v1/completions`, { model: M, prompt, max_tokens: 1 }); // caches two blocks
    const r = await postJson(`${s.url}/v1/completions/batch`, {
      model: M,
      prompts: [prompt, "a story"],
      max_tokens: 5,
      ignore_eos: true,
    });
    expect(r.status).toBe(200);
    const data = r.json.data as {
      usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
    }[];
    expect(data[0].usage.completion_tokens).toBe(5);
    expect(data[1].usage.completion_tokens).toBe(5);
    expect(data[0].usage.prompt_tokens).toBe(40);
    expect(data[0].usage.prompt_tokens_details.cached_tokens).toBe(32);
    expect(data[1].usage.prompt_tokens_details.cached_tokens).toBe(0);
  });

  test("streamed logprobs carry exactly the tokens whose text each chunk carries, with a stop string", async () => {
    const base = { model: M, prompt: "once", max_tokens: 40, temperature: 0, ignore_eos: true, logprobs: 1 };
    const plain = await postJson(`${s.url}/v1/completions`, base);
    const full = (plain.json.choices as { text: string }[])[0].text;
    const stop = full.slice(20, 23); // three characters in the middle: held back, then cut
    expect(stop.length).toBe(3);
    const whole = await postJson(`${s.url}/v1/completions`, { ...base, stop: [stop] });
    const wholeLp = (whole.json.choices as { logprobs: { tokens: string[] } }[])[0].logprobs;
    const res = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      body: JSON.stringify({ ...base, stop: [stop], stream: true }),
    });
    const chunks = (await res.text())
      .split("\n\n")
      .filter((f) => f.startsWith("data: {"))
      .map(
        (f) =>
          (
            JSON.parse(f.slice(6)) as {
              choices: { text: string; finish_reason: string | null; logprobs: { tokens: string[] } }[];
            }
          ).choices[0],
      );
    const streamedTokens = chunks.flatMap((c) => c.logprobs.tokens);
    expect(streamedTokens).toEqual(wholeLp.tokens);
    expect(chunks.map((c) => c.text).join("")).toBe((whole.json.choices as { text: string }[])[0].text);
    for (const c of chunks) {
      // Every chunk before the last carries its tokens' text exactly; the last may cut the stop string off.
      if (c.finish_reason === null) expect(c.logprobs.tokens.join("")).toBe(c.text);
      else expect(c.logprobs.tokens.join("").startsWith(c.text)).toBe(true);
    }
  });

  test("null is accepted wherever a field is nullable, top_k included", async () => {
    const r = await postJson(`${s.url}/v1/completions`, {
      model: M,
      prompt: "x",
      max_tokens: 2,
      top_k: null,
      top_p: null,
      seed: null,
      stop: null,
      n: null,
      logit_bias: null,
    });
    expect(r.status).toBe(200);
  });

  test("a missing, empty or malformed Host, or HTTP/1.0 without one, is served, not a 500", async () => {
    for (const request of [
      "GET /health HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
      "GET /health HTTP/1.0\r\n\r\n",
      "GET /health HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
      "GET /v1/models?x=1 HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
    ]) {
      const raw = await rawHttp(s.url, request);
      expect(statusOf(raw)).toBe(200);
    }
  });

  test("413 and 431 answers carry OpenAI's error body", async () => {
    const big = JSON.stringify({ model: M, prompt: "x".repeat(70_000) });
    const sized = await fetch(`${s.url}/v1/completions`, { method: "POST", body: big });
    expect(sized.status).toBe(413);
    expect(errorOf((await sized.json()) as Json).code).toBe("request_too_large");
    // Chunked, with no Content-Length: refused as the bytes pass the limit.
    const chunked = await rawHttp(
      s.url,
      `POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n${big.length.toString(16)}\r\n${big}\r\n0\r\n\r\n`,
    );
    expect(statusOf(chunked)).toBe(413);
    expect(isErrorShape(bodyOf(chunked))).toBe(true);
    const headers = await fetch(`${s.url}/v1/models`, { headers: { "x-padding": "a".repeat(10_000) } });
    expect(headers.status).toBe(431);
    expect(errorOf((await headers.json()) as Json).code).toBe("headers_too_large");
  });

  test("the installed command lifts Bun's own 16 KiB header limit, so the server's 431 carries a body", async () => {
    const { url, proc } = await spawnServer(["--model", modelPath, "--threads", "1"]);
    try {
      expect((await fetch(`${url}/v1/models`, { headers: { "x-padding": "a".repeat(20_000) } })).status).toBe(200);
      const big = await fetch(`${url}/v1/models`, { headers: { "x-padding": "a".repeat(40_000) } });
      expect(big.status).toBe(431);
      expect(isErrorShape((await big.json()) as Json)).toBe(true);
    } finally {
      proc.kill("SIGTERM");
      await proc.exited;
    }
  });

  test("400 messages name what is wrong", async () => {
    const bias = await postJson(`${s.url}/v1/completions`, { model: M, prompt: "x", logit_bias: { abc: 1 } });
    expect(bias.status).toBe(400);
    expect(errorOf(bias.json).message).toBe(`Invalid key "abc" in 'logit_bias'.`);
    const temp = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      body: `{"model":"${M}","prompt":"x","temperature":1e999}`,
    });
    expect(errorOf((await temp.json()) as Json).message).toBe(
      "Invalid value for 'temperature': Infinity is not a number >= 0 and <= 2 or null.",
    );
    const seqs = await postJson(`${s.url}/v1/completions`, { model: M, prompt: ["a", "b", "c", "d", "e"], n: 8 });
    expect(seqs.status).toBe(400);
    expect(errorOf(seqs.json).message).toBe(
      "the request asks for 40 sequences (5 prompts x n=8); the limit is 32 (--max-seqs-per-request)",
    );
  });

  test("other methods on a route get 405 with Allow; unknown paths 404", async () => {
    for (const [method, path, allow] of [
      ["GET", "/v1/completions", "POST"],
      ["PUT", "/v1/chat/completions", "POST"],
      ["DELETE", "/tokenize", "POST"],
      ["POST", "/v1/models", "GET"],
    ]) {
      const r = await fetch(s.url + path, { method });
      expect(r.status).toBe(405);
      expect(r.headers.get("allow")).toContain(allow);
      expect(isErrorShape((await r.json()) as Json)).toBe(true);
    }
    expect((await fetch(`${s.url}/v2/nothing`)).status).toBe(404);
    expect(await settled(s)).toBe(true);
  });
});

describe("the WebSocket protocol", () => {
  test("pipelined requests on one socket are told apart by the client's request_id, in chunks, [DONE] and errors", async () => {
    const s = await startTestServer(modelPath, ["--served-model-name", M]);
    try {
      const { ws, opened, next } = openSocket(s.url);
      expect(await opened).toBe(true);
      const ask = (id: string, maxTokens: number) => ({
        request_id: id,
        model: M,
        messages: [{ role: "user", content: `story ${id}` }],
        max_tokens: maxTokens,
        ignore_eos: true,
        temperature: 0,
      });
      ws.send(JSON.stringify(ask("a", 12)));
      ws.send(JSON.stringify(ask("b", 6)));
      ws.send(JSON.stringify({ request_id: "c", model: M, messages: [] }));
      ws.send(JSON.stringify({ ...ask("d", 2), request_id: 7 }));
      const text: Record<string, string> = { a: "", b: "" };
      const ended = new Set<string>();
      const errors: Json[] = [];
      while (ended.size + errors.length < 4) {
        const frame = JSON.parse(await next()) as Json & { choices?: { delta: { content?: string } }[] };
        if (frame.error) errors.push(frame);
        else if (frame.done) ended.add(frame.request_id as string);
        else {
          expect(["a", "b"]).toContain(frame.request_id as string);
          text[frame.request_id as string] += frame.choices?.[0]?.delta.content ?? "";
        }
      }
      expect([...ended].sort()).toEqual(["a", "b"]);
      expect(errors.find((e) => e.request_id === "c")).toBeDefined();
      expect(errors.some((e) => errorOf(e).param === "request_id")).toBe(true);
      // The same requests one at a time over HTTP give the same text: interleaving mixes nothing.
      for (const id of ["a", "b"]) {
        const alone = await postJson(`${s.url}/v1/chat/completions`, {
          ...ask(id, id === "a" ? 12 : 6),
          request_id: undefined,
        });
        expect((alone.json.choices as { message: { content: string } }[])[0].message.content).toBe(text[id]);
      }
      ws.close();
      expect(await settled(s)).toBe(true);
    } finally {
      await s.stop();
    }
  });
});

describe("fairness between requests", () => {
  test("a small request behind one of 32 sequences starts at the next free seat and finishes first", async () => {
    const s = await startTestServer(modelPath, ["--served-model-name", M, "--max-num-seqs", "4"]);
    try {
      const prompts = Array.from({ length: 32 }, (_, i) => `prompt ${i}`);
      const big = postJson(`${s.url}/v1/completions/batch`, {
        model: M,
        prompts,
        max_tokens: 60,
        ignore_eos: true,
      }).then((r) => ({ ...r, at: performance.now() }));
      await Bun.sleep(50);
      const small = await postJson(`${s.url}/v1/completions`, {
        model: M,
        prompt: "small",
        max_tokens: 4,
        ignore_eos: true,
      });
      const smallAt = performance.now();
      expect(small.status).toBe(200);
      const done = await big;
      expect(done.status).toBe(200);
      // FCFS by sequence would have run all 32 first (8 rounds of 4 seats); fair, it runs second.
      expect(smallAt).toBeLessThan(done.at);
      expect(await settled(s)).toBe(true);
    } finally {
      await s.stop();
    }
  });
});

describe("browser origins (CORS)", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer(modelPath, ["--served-model-name", M, "--allowed-origins", "http://app.example"]);
  });
  afterAll(async () => s?.stop());
  const body = JSON.stringify({ model: M, prompt: "x", max_tokens: 2 });

  test("an allowed origin gets its preflight and can read answers, including errors", async () => {
    const pre = await fetch(`${s.url}/v1/completions`, {
      method: "OPTIONS",
      headers: {
        origin: "http://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
      },
    });
    expect(pre.status).toBe(204);
    expect(pre.headers.get("access-control-allow-origin")).toBe("http://app.example");
    expect(pre.headers.get("access-control-allow-methods")).toContain("POST");
    expect(pre.headers.get("access-control-allow-headers")).toContain("authorization");
    const ok = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      headers: { origin: "http://app.example" },
      body,
    });
    expect(ok.status).toBe(200);
    expect(ok.headers.get("access-control-allow-origin")).toBe("http://app.example");
    const bad = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      headers: { origin: "http://app.example" },
      body: "{",
    });
    expect(bad.status).toBe(400);
    expect(bad.headers.get("access-control-allow-origin")).toBe("http://app.example");
  });

  test("another site's page is refused (text/plain POST, no-cors GET, preflight, WebSocket); curl is not", async () => {
    const evil = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      headers: { origin: "http://evil.example", "content-type": "text/plain" },
      body,
    });
    expect(evil.status).toBe(403);
    expect(errorOf((await evil.json()) as Json).code).toBe("forbidden_origin");
    const noCors = await fetch(`${s.url}/v1/models`, {
      headers: { "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors" },
    });
    expect(noCors.status).toBe(403);
    const pre = await fetch(`${s.url}/v1/completions`, {
      method: "OPTIONS",
      headers: { origin: "http://evil.example", "access-control-request-method": "POST" },
    });
    expect(pre.status).toBe(403);
    expect(pre.headers.get("access-control-allow-origin")).toBeNull();
    const { opened } = openSocket(s.url, { origin: "http://evil.example" });
    expect(await opened).toBe(false);
    // curl -d: a form content type, no Origin.
    const curl = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body,
    });
    expect(curl.status).toBe(200);
    // The server's own page (/docs) calls with its own origin.
    const self = await fetch(`${s.url}/v1/models`, { headers: { origin: s.url, "sec-fetch-site": "same-origin" } });
    expect(self.status).toBe(200);
    expect(await settled(s)).toBe(true);
  });
});
