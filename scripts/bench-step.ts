#!/usr/bin/env bun
// Where a single stream's decode time goes, per token, through the engine (no HTTP):
//   bun scripts/bench-step.ts --model <path> [--decode-tokens 128] [--runs 3] [--threads N] [--dtype auto|bfloat16]
// For each run: tokens/s, the native step as the event loop sees it (call to resolve:
// the forward pass plus the hand-over to and from the engine thread) at p50/p90/mean, and
// the JS turnaround between steps (scheduling, sampling bookkeeping, detokenizing). A mean
// far above the p50 is steps that stalled (page faults, a compute thread descheduled).
import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import { NativeEngine } from "../src/ffi/native.ts";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    "decode-tokens": { type: "string", default: "128" },
    runs: { type: "string", default: "3" },
    threads: { type: "string", default: String(availableParallelism()) },
    dtype: { type: "string", default: "auto" },
  },
});
if (!values.model) {
  console.error(
    "usage: bun scripts/bench-step.ts --model <hf folder | file.gguf> [--decode-tokens 128] [--runs 3] [--threads N] [--dtype auto|bfloat16]",
  );
  process.exit(2);
}

const steps: number[] = [];
const gaps: number[] = [];
let lastResolved = 0;
const step = NativeEngine.prototype.step;
NativeEngine.prototype.step = function (this: NativeEngine) {
  const t = performance.now();
  if (lastResolved > 0) gaps.push(t - lastResolved);
  return step.call(this).then(() => {
    lastResolved = performance.now();
    steps.push(lastResolved - t);
  });
};

const engine = await LLMEngine.create(values.model, {
  threads: Number(values.threads),
  maxNumSeqs: 1,
  maxNumBatchedTokens: 16,
  enablePrefixCaching: false,
  computeDtype: values.dtype === "bfloat16" || values.dtype === "bf16" ? "bf16" : "f32",
});
const quantile = (xs: number[], f: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * f))];
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const ms = (x: number) => `${x.toFixed(2)} ms`;
// A warm-up run first: it commits the KV pages the measured runs reuse.
for (let run = 0; run <= Number(values.runs); run++) {
  steps.length = 0;
  gaps.length = 0;
  lastResolved = 0;
  let n = 0;
  let first = 0;
  for await (const out of engine.addRequest([1, 300, 400], {
    ...DEFAULT_SAMPLING,
    temperature: 0,
    ignoreEos: true,
    maxTokens: Number(values["decode-tokens"]),
  })) {
    if (n === 0) first = performance.now();
    n += out.newTokenIds.length;
  }
  if (run === 0) continue;
  const decode = steps.slice(1); // the first step is the prompt's
  console.log(
    `${values.model} run ${run}: decode ${((n - 1) / ((performance.now() - first) / 1000)).toFixed(1)} tok/s; ` +
      `step p50 ${ms(quantile(decode, 0.5))} p90 ${ms(quantile(decode, 0.9))} mean ${ms(mean(decode))}; ` +
      `between steps p50 ${ms(quantile(gaps, 0.5))} p90 ${ms(quantile(gaps, 0.9))} mean ${ms(mean(gaps))}`,
  );
}
await engine.shutdown();
