// The step runs on the engine thread: timers on the event loop keep firing while
// a long prefill computes. The same step run synchronously blocks them, which
// shows the measurement can tell the difference.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { generate, nextTokenLogits } from "./helpers/engine.ts";
import { makeWeights, writeHfModel, type RandomLlamaShape } from "./helpers/random_llama.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const SHAPE: RandomLlamaShape = {
  dim: 512,
  layers: 4,
  heads: 8,
  kvHeads: 8,
  ffn: 1376,
  vocab: 512,
  ctx: 1024,
  ropeTheta: 10000,
  tied: true,
  std: 0.05,
  seed: 5,
};
const PROMPT = Array.from({ length: 768 }, (_, i) => 3 + ((i * 37) % 500));
const TICK_MS = 5;

const dir = mkdtempSync(join(tmpdir(), "inferneo-loop-"));
let engine: LLMEngine;
beforeAll(async () => {
  const path = writeHfModel(dir, SHAPE, "f16", makeWeights(SHAPE, "f16"));
  engine = await LLMEngine.create(path, { threads: 1, maxNumSeqs: 2, maxNumBatchedTokens: 1024 });
});
afterAll(async () => {
  await engine?.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

function ticker() {
  const ticks: number[] = [];
  const timer = setInterval(() => ticks.push(performance.now()), TICK_MS);
  return {
    stop() {
      clearInterval(timer);
      let maxGap = 0;
      for (let i = 1; i < ticks.length; i++) maxGap = Math.max(maxGap, ticks[i] - ticks[i - 1]);
      return { count: ticks.length, maxGapMs: maxGap };
    },
  };
}

test("a timer keeps ticking while a long prefill runs on the engine thread", async () => {
  const t = ticker();
  const start = performance.now();
  await generate(engine, PROMPT, { maxTokens: 1 });
  const elapsedMs = performance.now() - start;
  const { count, maxGapMs } = t.stop();
  // Only meaningful if the prefill is long compared with a tick.
  expect(elapsedMs).toBeGreaterThan(20 * TICK_MS);
  expect(count).toBeGreaterThan(elapsedMs / TICK_MS / 4);
  expect(maxGapMs).toBeLessThan(elapsedMs / 2);
});

test("the same prefill run synchronously blocks the timer (the check above can fail)", async () => {
  const t = ticker();
  const start = performance.now();
  nextTokenLogits(engine, PROMPT);
  const elapsedMs = performance.now() - start;
  await Bun.sleep(0);
  const { count } = t.stop();
  expect(elapsedMs).toBeGreaterThan(20 * TICK_MS);
  expect(count).toBeLessThanOrEqual(1);
});
