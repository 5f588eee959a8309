// The server as its users meet it, on stories260K: the official `openai` package,
// the TypeScript and Python InferneoClients, requests-based scripts, curl-style
// calls, and the WebSocket. Greedy output equals run.c's golden tokens.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import OpenAI from "openai";
import { InferneoClient } from "../src/client/index.ts";
import { EMBEDDED_GGUF, goldens } from "./helpers/engine.ts";
import { settled, startTestServer, type TestServer } from "./helpers/server.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const MODEL = "stories";

describe("OpenAI compatibility (stories260K)", () => {
  let s: TestServer;
  let openai: OpenAI;
  beforeAll(async () => {
    s = await startTestServer(EMBEDDED_GGUF, ["--served-model-name", MODEL]);
    openai = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: "unused" });
  });
  afterAll(async () => s?.stop());

  test("openai: completions, greedy, equal the golden text", async () => {
    const g = goldens()[0];
    const r = await openai.completions.create({ model: MODEL, prompt: g.prompt, max_tokens: 128, temperature: 0 });
    expect(r.object).toBe("text_completion");
    expect(r.choices[0].text).toBe(g.completion_text_all!);
    expect(r.choices[0].finish_reason).toBe("length");
    expect(r.usage).toMatchObject({
      prompt_tokens: g.prompt_ids.length,
      completion_tokens: 128,
      total_tokens: g.prompt_ids.length + 128,
    });
  });

  test("openai: echo puts the prompt in front of the completion", async () => {
    const g = goldens()[0];
    const r = await openai.completions.create({
      model: MODEL,
      prompt: g.prompt,
      max_tokens: 8,
      temperature: 0,
      echo: true,
    });
    expect(r.choices[0].text.startsWith(g.prompt)).toBe(true);
    expect(g.completion_text_all!.startsWith(r.choices[0].text.slice(g.prompt.length))).toBe(true);
  });

  test("openai: token-id prompts and lists of prompts", async () => {
    const [a, b] = goldens();
    const r = await openai.completions.create({
      model: MODEL,
      prompt: [a.prompt_ids.slice(1), b.prompt_ids.slice(1)] as unknown as number[][],
      max_tokens: 16,
      temperature: 0,
    });
    expect(r.choices.length).toBe(2);
    // The ids carry no BOS here, so compare against a second call with the same ids rather than the golden.
    const again = await openai.completions.create({
      model: MODEL,
      prompt: a.prompt_ids.slice(1),
      max_tokens: 16,
      temperature: 0,
    });
    expect(r.choices[0].text).toBe(again.choices[0].text);
  });

  test("openai: logprobs with top alternatives, and n=2", async () => {
    const g = goldens()[0];
    const r = await openai.completions.create({
      model: MODEL,
      prompt: g.prompt,
      max_tokens: 8,
      temperature: 0,
      logprobs: 3,
    });
    const lp = r.choices[0].logprobs!;
    expect(lp.tokens!.length).toBe(8);
    expect(lp.token_logprobs!.every((x) => x! <= 0)).toBe(true);
    expect(Object.keys(lp.top_logprobs![0]!).length).toBeGreaterThanOrEqual(1);
    expect(lp.tokens!.join("")).toBe(r.choices[0].text);
    const two = await openai.completions.create({
      model: MODEL,
      prompt: g.prompt,
      max_tokens: 12,
      temperature: 1,
      seed: 5,
      n: 2,
    });
    expect(two.choices.map((c) => c.index).sort()).toEqual([0, 1]);
    expect(two.choices[0].text).not.toBe(two.choices[1].text);
    expect(two.usage!.completion_tokens).toBe(24);
  });

  test("openai: chat, chat streaming and models.list", async () => {
    const messages = [{ role: "user" as const, content: "Tell me a story about a cat." }];
    const r = await openai.chat.completions.create({ model: MODEL, messages, max_tokens: 24, temperature: 0 });
    expect(r.object).toBe("chat.completion");
    expect(r.choices[0].message.role).toBe("assistant");
    expect(r.choices[0].message.content!.length).toBeGreaterThan(10);
    const stream = await openai.chat.completions.create({
      model: MODEL,
      messages,
      max_tokens: 24,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish: string | null = null;
    let usage = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      if (chunk.choices.length === 0) continue;
      text += chunk.choices[0].delta.content ?? "";
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    expect(text).toBe(r.choices[0].message.content!);
    expect(finish).toBe("length");
    expect(usage).toMatchObject({ completion_tokens: 24 });
    const models = await openai.models.list();
    expect(models.data.map((m) => m.id)).toEqual([MODEL]);
  });

  test("openai: chat logprobs", async () => {
    const r = await openai.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 5,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
    });
    const content = r.choices[0].logprobs!.content!;
    expect(content.length).toBe(5);
    expect(content[0].top_logprobs.length).toBe(2);
    expect(content[0].bytes!.length).toBeGreaterThan(0);
  });

  test("openai: an unknown model is a 404 the SDK reports", async () => {
    const err = await openai.completions.create({ model: "gpt-4", prompt: "x", max_tokens: 1 }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect(err.error).toMatchObject({ type: "invalid_request_error", code: "model_not_found" });
  });

  test("the TypeScript InferneoClient: completion, streaming chat, models", async () => {
    const client = new InferneoClient(s.url);
    const g = goldens()[1];
    const r = await client.completions.create({ model: MODEL, prompt: g.prompt, max_tokens: 32, temperature: 0 });
    expect(g.completion_text_all!.startsWith(r.choices[0].text)).toBe(true);
    let text = "";
    for await (const chunk of await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 10,
      stream: true,
      seed: 1,
    })) {
      text += chunk.choices[0]?.delta.content ?? "";
    }
    expect(text.length).toBeGreaterThan(0);
    expect((await client.models.list()).data[0].id).toBe(MODEL);
  });

  test("a WebSocket on the chat path streams the same chunks as SSE, and survives bad messages", async () => {
    const body = {
      model: MODEL,
      messages: [{ role: "user", content: "Once upon a time" }],
      max_tokens: 20,
      temperature: 0.8,
      seed: 11,
    };
    const sse = await openai.chat.completions.create({
      ...body,
      messages: [{ role: "user", content: "Once upon a time" }],
      stream: true,
    });
    let sseText = "";
    for await (const c of sse) sseText += c.choices[0]?.delta.content ?? "";

    const ws = new WebSocket(s.url.replace("http", "ws") + "/v1/chat/completions");
    const inbox: string[] = [];
    let wake: (() => void) | null = null;
    ws.onmessage = (e) => {
      inbox.push(String(e.data));
      wake?.();
    };
    await new Promise((r) => (ws.onopen = r));
    const next = async () => {
      while (inbox.length === 0) await new Promise<void>((r) => (wake = r));
      return inbox.shift()!;
    };
    ws.send("this is not json");
    expect(JSON.parse(await next()).error.message).toContain("not valid JSON");
    ws.send(JSON.stringify({ model: MODEL, messages: [] }));
    expect(JSON.parse(await next()).error.type).toBe("invalid_request_error");
    // Two requests over one socket.
    for (let round = 0; round < 2; round++) {
      ws.send(JSON.stringify(body));
      let text = "";
      for (;;) {
        const m = await next();
        if (m === "[DONE]") break;
        const chunk = JSON.parse(m);
        expect(chunk.object).toBe("chat.completion.chunk");
        text += chunk.choices[0]?.delta?.content ?? "";
      }
      expect(text).toBe(sseText);
    }
    ws.close();
  });

  const hasRequests = spawnSync("python3", ["-c", "import requests"], { stdio: "ignore" }).status === 0;
  if (!hasRequests) console.warn("skipped: python3 with requests is not available for the Python snippets");

  test.skipIf(!hasRequests)(
    "Python: the InferneoClient examples and requests-based scripts run as written",
    async () => {
      const script = `
import json, sys, time, requests
from inferneo import InferneoClient
BASE = sys.argv[1]; M = sys.argv[2]

client = InferneoClient(BASE)
r = client.completions.create(model=M, prompt="Explain quantum computing", max_tokens=100, temperature=0.7)
print(r.choices[0].text)
assert isinstance(r.choices[0].text, str) and r.usage.completion_tokens > 0
out = []
for chunk in client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=200, stream=True):
    if chunk.choices and chunk.choices[0].delta.content is not None: out.append(chunk.choices[0].delta.content)
assert len("".join(out)) > 0
assert client.models.list().data[0].id == M

def inferneo_api_call(prompt, max_tokens=50, temperature=0.0):
    resp = requests.post(BASE + "/v1/completions", json={"model": M, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}, timeout=60)
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]

def robust_request(url, payload, retries=5):
    for attempt in range(retries):
        resp = requests.post(url, json=payload, timeout=60)
        if resp.status_code in (429, 500, 502, 503):
            time.sleep(float(resp.headers.get("Retry-After", 0.1 * 2 ** attempt)))
            continue
        return resp
    raise RuntimeError("out of retries")

golden = inferneo_api_call("Once upon a time", max_tokens=20)
assert golden.startswith(", there was a little girl named Lily"), golden
r = robust_request(BASE + "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"

# The monitoring loop's body.
m = requests.get(BASE + "/metrics").json()
for key in ("active_requests", "queue_size", "kv_cache_usage", "gpu_utilization"):
    assert key in m, key
assert m["gpu_utilization"] is None and 0 <= m["kv_cache_usage"] <= 1
assert requests.get(BASE + "/health").json() == {"status": "ok"}

# Batch.
b = requests.post(BASE + "/v1/completions/batch", json={"model": M, "prompts": ["Once upon a time", "Lily wanted to"], "max_tokens": 10, "temperature": 0}).json()
assert [len(x["choices"]) for x in b["data"]] == [1, 1]
assert b["data"][0]["choices"][0]["text"] == inferneo_api_call("Once upon a time", max_tokens=10)
print("PYTHON OK")
`;
      // Asynchronously: the server lives in this process and must keep answering.
      const proc = Bun.spawn(["python3", "-c", script, s.url, MODEL], {
        env: { ...process.env, PYTHONPATH: join(import.meta.dir, "..", "clients", "python") },
        stdout: "pipe",
        stderr: "pipe",
      });
      const timer = setTimeout(() => proc.kill(), 60_000);
      const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
      clearTimeout(timer);
      expect(stderr).toBe("");
      expect(stdout).toContain("PYTHON OK");
      expect(await proc.exited).toBe(0);
    },
  );

  test("curl-style calls: health, models, completion, chat", async () => {
    expect(await (await fetch(`${s.url}/health`)).json()).toEqual({ status: "ok" });
    expect(((await (await fetch(`${s.url}/v1/models`)).json()) as { data: { id: string }[] }).data[0].id).toBe(MODEL);
    const c = await fetch(`${s.url}/v1/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: MODEL, prompt: "Hello", max_tokens: 5 }),
    });
    expect(c.status).toBe(200);
    const chat = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: "Hello!" }] }),
    });
    expect(chat.status).toBe(200);
    expect(await settled(s)).toBe(true);
  });
});
