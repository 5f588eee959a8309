#!/usr/bin/env bun
// Continuous batching through the engine, no HTTP: N concurrent synthetic requests.
//   bun scripts/bench-batch.ts --model <path> [--concurrency 1,8,32] [--prompt-tokens 64] [--output-tokens 128] [--threads N]
// Each level runs `concurrency` requests at once (a fixed prompt each, greedy, EOS ignored),
// after a warm-up. Prints aggregate output tok/s, TTFT and ITL percentiles, and the
// aggregate's ratio to the single-stream rate measured in the same run.
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";
import { syntheticPrompt } from "./synthetic.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    concurrency: { type: "string", default: "1,8,32" },
    "prompt-tokens": { type: "string", default: "64" },
    "output-tokens": { type: "string", default: "128" },
    threads: { type: "string", default: String(availableParallelism()) },
    "max-num-batched-tokens": { type: "string", default: "512" },
  },
});
if (!values.model) {
  console.error(
    "usage: bun scripts/bench-batch.ts --model <path> [--concurrency 1,8,32] [--prompt-tokens 64] [--output-tokens 128]",
  );
  process.exit(2);
}
const levels = values.concurrency!.split(",").map(Number);
const promptTokens = Number(values["prompt-tokens"]);
const outputTokens = Number(values["output-tokens"]);
const threads = Number(values.threads);
const engine = await LLMEngine.create(values.model, {
  threads,
  maxNumSeqs: Math.max(...levels),
  maxNumBatchedTokens: Number(values["max-num-batched-tokens"]),
  enablePrefixCaching: false, // every request computes its own prompt
});
const vocab = engine.model.spec.config.vocabSize;
const prompt = (i: number) => syntheticPrompt(promptTokens, vocab, 1000 + i);

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

async function level(n: number) {
  const ttft: number[] = [];
  const itl: number[] = [];
  let tokens = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const t0 = performance.now();
      let last = t0;
      let first = true;
      for await (const out of engine.addRequest(prompt(i), {
        ...DEFAULT_SAMPLING,
        temperature: 0,
        ignoreEos: true,
        maxTokens: outputTokens,
      })) {
        if (out.error) throw new Error(out.error);
        if (out.newTokenIds.length === 0) continue;
        const now = performance.now();
        if (first) ttft.push(now - t0);
        else itl.push(now - last);
        first = false;
        last = now;
        tokens += out.newTokenIds.length;
      }
    }),
  );
  const seconds = (performance.now() - start) / 1000;
  return {
    n,
    tokS: tokens / seconds,
    ttftP50: pct(ttft, 50),
    ttftP99: pct(ttft, 99),
    itlP50: pct(itl, 50),
    itlP99: pct(itl, 99),
  };
}

await level(2); // warm-up
const rows = [];
for (const n of levels) rows.push(await level(n));
await engine.shutdown();
const single = rows.find((r) => r.n === 1)?.tokS;
const cpu = cpus()[0]?.model ?? "unknown CPU";
console.log(
  `${values.model} (${engine.model.spec.dtype}) on ${cpu}, ${threads} threads, prompt ${promptTokens}, output ${outputTokens} tokens`,
);
for (const r of rows) {
  console.log(
    `concurrency ${String(r.n).padStart(3)}: ${r.tokS.toFixed(1).padStart(8)} output tok/s` +
      (single ? ` (${(r.tokS / single).toFixed(2)}x single)` : "") +
      `, TTFT p50 ${r.ttftP50.toFixed(1)} ms p99 ${r.ttftP99.toFixed(1)} ms, ITL p50 ${r.itlP50.toFixed(1)} ms p99 ${r.itlP99.toFixed(1)} ms`,
  );
}
