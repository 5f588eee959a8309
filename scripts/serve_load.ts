// A bounded streaming load on an OpenAI-compatible server (loopback), as `vllm bench serve`
// measures it: N fixed-seed random prompts (token ids) at a request rate under a concurrency
// cap, EOS ignored so every request yields outputLen tokens; TTFT, TPOT and ITL percentiles.
// Used by scripts/bench-serve.ts and scripts/gpu-check.
import { parseSse } from "../src/client/index.ts";

export interface LoadOptions {
  baseUrl: string;
  model: string;
  numPrompts: number;
  maxConcurrency: number;
  requestRate: number; // requests a second; Infinity: all at once (under the cap)
  inputLen: number;
  outputLen: number;
  seed: number;
}

export interface Stats {
  mean: number;
  p50: number;
  p99: number;
}

export interface LoadResult {
  ok: number;
  seconds: number;
  requestsPerS: number;
  outputTokPerS: number;
  ttftMs: Stats;
  tpotMs: Stats;
  itlMs: Stats;
}

interface One {
  ok: boolean;
  ttftMs: number;
  itlMs: number[];
  latencyMs: number;
  outputTokens: number;
}

export function stats(xs: number[]): Stats {
  const s = [...xs].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? NaN;
  return { mean: s.reduce((a, b) => a + b, 0) / Math.max(1, s.length), p50: at(0.5), p99: at(0.99) };
}

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  let state = o.seed * 7919 + 17;
  const rand = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const vocab = 259 + 200; // ids past the byte tokens, inside any Llama vocabulary
  const prompts = Array.from({ length: o.numPrompts }, () => [
    1,
    ...Array.from({ length: o.inputLen - 1 }, () => 259 + Math.floor(rand() * (vocab - 259))),
  ]);
  // Byte tokens are banned so that random-weight models produce whole UTF-8 (as llama-server needs).
  const logitBias = Object.fromEntries(Array.from({ length: 256 }, (_, i) => [String(i + 3), -100]));

  async function one(prompt: number[]): Promise<One> {
    const t0 = performance.now();
    const res = await fetch(`${o.baseUrl}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: o.model,
        prompt,
        max_tokens: o.outputLen,
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

  const results: One[] = [];
  const start = performance.now();
  let next = 0;
  let arrival = 0;
  await Promise.all(
    Array.from({ length: Math.min(o.maxConcurrency, o.numPrompts) }, async () => {
      while (next < o.numPrompts) {
        const i = next++;
        if (Number.isFinite(o.requestRate)) {
          arrival += -Math.log(1 - rand()) / o.requestRate; // Poisson arrivals
          const wait = start + arrival * 1000 - performance.now();
          if (wait > 0) await Bun.sleep(wait);
        }
        results.push(await one(prompts[i]));
      }
    }),
  );
  const seconds = (performance.now() - start) / 1000;
  const ok = results.filter((r) => r.ok);
  const outputTokens = ok.reduce((a, r) => a + r.outputTokens, 0);
  const tpot = ok.filter((r) => r.outputTokens > 1).map((r) => (r.latencyMs - r.ttftMs) / (r.outputTokens - 1));
  return {
    ok: ok.length,
    seconds,
    requestsPerS: ok.length / seconds,
    outputTokPerS: outputTokens / seconds,
    ttftMs: stats(ok.map((r) => r.ttftMs)),
    tpotMs: stats(tpot),
    itlMs: stats(ok.flatMap((r) => r.itlMs)),
  };
}
