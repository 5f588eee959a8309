#!/usr/bin/env bun
// Serving benchmark, in the manner of `vllm bench serve`: N requests against a running
// OpenAI-compatible server on loopback, at a request rate, under a concurrency cap.
//   bun scripts/bench-serve.ts --base-url http://127.0.0.1:8000 --model M [--num-prompts 64]
//       [--max-concurrency 8] [--request-rate inf] [--input-len 64] [--output-len 128] [--seed 0]
// Or let it start the server itself: --serve <model path> [--threads N] [--dtype bfloat16] (stopped at the end).
// Fixed-seed random prompts (token ids); EOS ignored so every request yields --output-len.
import { parseArgs } from "node:util";
import { parseSse } from "../src/client/index.ts";

const { values } = parseArgs({
  options: {
    "base-url": { type: "string" },
    serve: { type: "string" },
    threads: { type: "string" },
    dtype: { type: "string" },
    model: { type: "string" },
    "num-prompts": { type: "string", default: "64" },
    "max-concurrency": { type: "string", default: "8" },
    "request-rate": { type: "string", default: "inf" },
    "input-len": { type: "string", default: "64" },
    "output-len": { type: "string", default: "128" },
    seed: { type: "string", default: "0" },
  },
});

let baseUrl = values["base-url"];
let stopServer: (() => Promise<void>) | null = null;
if (values.serve) {
  const { parseServeArgs, serveConfig, startServer } = await import("../src/server/serve.ts");
  const args = [
    "--model",
    values.serve,
    "--port",
    "0",
    "--served-model-name",
    values.model ?? "bench",
    "--max-num-seqs",
    String(Math.max(8, Number(values["max-concurrency"]))),
  ];
  if (values.threads) args.push("--threads", values.threads);
  if (values.dtype) args.push("--dtype", values.dtype);
  const s = await startServer(serveConfig(parseServeArgs(args, {})), () => {});
  baseUrl = s.url;
  stopServer = () => s.stop("done");
}
if (!baseUrl) {
  console.error(
    "usage: bun scripts/bench-serve.ts (--base-url URL --model M | --serve <model path>) [--num-prompts N] [--max-concurrency N] [--request-rate R]",
  );
  process.exit(2);
}
const model =
  values.model ?? ((await (await fetch(`${baseUrl}/v1/models`)).json()) as { data: { id: string }[] }).data[0].id;
const numPrompts = Number(values["num-prompts"]);
const maxConcurrency = Number(values["max-concurrency"]);
const rate = values["request-rate"] === "inf" ? Infinity : Number(values["request-rate"]);
const inputLen = Number(values["input-len"]);
const outputLen = Number(values["output-len"]);
let state = Number(values.seed) * 7919 + 17;
const rand = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
const vocab = 259 + 200; // ids past the byte tokens, inside any Llama vocabulary
const prompts = Array.from({ length: numPrompts }, () => [
  1,
  ...Array.from({ length: inputLen - 1 }, () => 259 + Math.floor(rand() * (vocab - 259))),
]);
// Byte tokens are banned so that random-weight models produce whole UTF-8 (as llama-server needs).
const logitBias = Object.fromEntries(Array.from({ length: 256 }, (_, i) => [String(i + 3), -100]));

interface Result {
  ok: boolean;
  ttftMs: number;
  itlMs: number[];
  latencyMs: number;
  outputTokens: number;
}

async function one(prompt: number[]): Promise<Result> {
  const t0 = performance.now();
  const res = await fetch(`${baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model,
      prompt,
      max_tokens: outputLen,
      temperature: 0,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
      logit_bias: logitBias,
    }),
  });
  if (!res.ok || !res.body) return { ok: false, ttftMs: 0, itlMs: [], latencyMs: 0, outputTokens: 0 };
  let last = t0;
  let ttft = 0;
  const itl: number[] = [];
  let tokens = 0;
  for await (const chunk of parseSse<{ choices: { text: string }[]; usage?: { completion_tokens: number } }>(
    res.body,
  )) {
    if (chunk.usage) tokens = chunk.usage.completion_tokens;
    if (chunk.choices.length === 0) continue;
    const now = performance.now();
    if (ttft === 0) ttft = now - t0;
    else itl.push(now - last);
    last = now;
  }
  return { ok: true, ttftMs: ttft, itlMs: itl, latencyMs: performance.now() - t0, outputTokens: tokens };
}

const results: Result[] = [];
const start = performance.now();
let next = 0;
let arrival = 0;
await Promise.all(
  Array.from({ length: Math.min(maxConcurrency, numPrompts) }, async () => {
    while (next < numPrompts) {
      const i = next++;
      if (Number.isFinite(rate)) {
        arrival += -Math.log(1 - rand()) / rate; // Poisson arrivals
        const wait = start + arrival * 1000 - performance.now();
        if (wait > 0) await Bun.sleep(wait);
      }
      results.push(await one(prompts[i]));
    }
  }),
);
const seconds = (performance.now() - start) / 1000;
await stopServer?.();

const ok = results.filter((r) => r.ok);
const stats = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? NaN;
  return { mean: s.reduce((a, b) => a + b, 0) / Math.max(1, s.length), p50: at(0.5), p99: at(0.99) };
};
const fmt = (x: { mean: number; p50: number; p99: number }) =>
  `mean ${x.mean.toFixed(1)} p50 ${x.p50.toFixed(1)} p99 ${x.p99.toFixed(1)} ms`;
const outputTokens = ok.reduce((a, r) => a + r.outputTokens, 0);
const tpot = ok.filter((r) => r.outputTokens > 1).map((r) => (r.latencyMs - r.ttftMs) / (r.outputTokens - 1));
console.log(
  `${model} at ${baseUrl}: ${ok.length}/${numPrompts} ok, concurrency ${maxConcurrency}, rate ${values["request-rate"]}, ` +
    `in ${inputLen} out ${outputLen}: ${(ok.length / seconds).toFixed(2)} req/s, ${(outputTokens / seconds).toFixed(1)} output tok/s; ` +
    `TTFT ${fmt(stats(ok.map((r) => r.ttftMs)))}; TPOT ${fmt(stats(tpot))}; ITL ${fmt(stats(ok.flatMap((r) => r.itlMs)))}`,
);
