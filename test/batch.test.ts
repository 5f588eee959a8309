// Continuous batching must not change results: 8 prompts that arrive at different
// times, share steps that mix prefill chunks with decode tokens, and hold scattered
// KV blocks, give exactly the tokens each gives alone.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import type { ScheduledRequest } from "../src/engine/scheduler.ts";
import { generate, GREEDY } from "./helpers/engine.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-batch-"));
let modelPath: string;

beforeAll(() => {
  modelPath = writeHfModel(dir, TINY, "f32", makeWeights(TINY, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const PROMPT_LENGTHS = [1, 5, 17, 33, 2, 48, 9, 70];
const MAX_TOKENS = [20, 7, 30, 12, 25, 16, 40, 10];

function promptOf(len: number, salt: number): number[] {
  return Array.from({ length: len }, (_, i) => (i === 0 ? 1 : 3 + ((i * 31 + salt * 17) % 500)));
}

async function until(cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const start = performance.now();
  while (!cond()) {
    if (performance.now() - start > timeoutMs) throw new Error("timed out waiting");
    await Bun.sleep(1);
  }
}

describe("batching", () => {
  test("8 staggered prompts in shared steps give the tokens each gives alone", async () => {
    const alone: number[][] = [];
    {
      const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 1 });
      for (let i = 0; i < 8; i++)
        alone.push((await generate(engine, promptOf(PROMPT_LENGTHS[i], i), { maxTokens: MAX_TOKENS[i] })).ids);
      await engine.shutdown();
    }

    // A small token budget forces chunked prefill of the longer prompts.
    const engine = await LLMEngine.create(modelPath, {
      threads: 2,
      maxNumSeqs: 8,
      maxNumBatchedTokens: 24,
      numBlocksOverride: 64,
    });
    try {
      // Scatter the free queue so block tables are not runs of consecutive ids.
      const all = engine.native.allocateBlocks(engine.numBlocks);
      const shuffled = all.map((id, i) => ({ id, key: (i * 2654435761) % 4093 })).sort((a, b) => a.key - b.key);
      engine.native.freeBlocks(shuffled.map((x) => x.id));

      let mixedSteps = 0;
      let scatteredTables = 0;
      engine.stepObserver = (scheduled: readonly ScheduledRequest[]) => {
        const prefill = scheduled.some((s) => s.numNewTokens > 1);
        const decode = scheduled.some(
          (s) => s.numNewTokens === 1 && s.req.numComputedTokens >= s.req.promptTokenIds.length,
        );
        if (prefill && decode) mixedSteps += 1;
        for (const s of scheduled)
          if (s.req.blockTable.some((b, k) => k > 0 && b !== s.req.blockTable[k - 1] + 1)) scatteredTables += 1;
      };

      const runs: Promise<{ ids: number[] }>[] = [];
      for (let i = 0; i < 8; i++) {
        runs.push(generate(engine, promptOf(PROMPT_LENGTHS[i], i), { ...GREEDY, maxTokens: MAX_TOKENS[i] }));
        const target = engine.stepCount + 2;
        await until(() => engine.stepCount >= target);
      }
      const together = (await Promise.all(runs)).map((r) => r.ids);
      expect(together).toEqual(alone);
      expect(mixedSteps).toBeGreaterThan(0);
      expect(scatteredTables).toBeGreaterThan(0);
      expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
    } finally {
      await engine.shutdown();
    }
  });

  test("with a pool so small that requests are preempted, outputs are still identical", async () => {
    const alone: number[][] = [];
    const big = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 1 });
    for (let i = 0; i < 6; i++)
      alone.push((await generate(big, promptOf(PROMPT_LENGTHS[i], i), { maxTokens: MAX_TOKENS[i] })).ids);
    await big.shutdown();

    // 10 blocks of 16 tokens: six requests of up to 63 tokens cannot all stay resident.
    const engine = await LLMEngine.create(modelPath, {
      threads: 2,
      maxNumSeqs: 6,
      maxNumBatchedTokens: 32,
      numBlocksOverride: 10,
    });
    try {
      const together = await Promise.all(
        alone.map((_, i) => generate(engine, promptOf(PROMPT_LENGTHS[i], i), { maxTokens: MAX_TOKENS[i] })),
      );
      expect(together.map((r) => r.ids)).toEqual(alone);
      expect(engine.scheduler.numPreemptions).toBeGreaterThan(0);
      expect(engine.kv.numFreeBlocks).toBe(10);
    } finally {
      await engine.shutdown();
    }
  });

  test("a seeded sampled request draws the same tokens alone and in a busy batch", async () => {
    const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 8, maxNumBatchedTokens: 32 });
    try {
      const params = { temperature: 0.9, topP: 0.95, seed: 1234, maxTokens: 24, ignoreEos: true };
      const prompt = promptOf(12, 99);
      const aloneIds = (await generate(engine, prompt, params)).ids;
      const busy = [0, 1, 2, 3, 4].map((i) =>
        generate(engine, promptOf(10 + 7 * i, i), { temperature: 1, maxTokens: 30 }),
      );
      const inBatch = generate(engine, prompt, params);
      await Promise.all(busy);
      expect((await inBatch).ids).toEqual(aloneIds);
      // And without a seed, two runs differ (24 draws from a flat-ish distribution).
      const a = await generate(engine, prompt, { ...params, seed: null, temperature: 1.5 });
      const b = await generate(engine, prompt, { ...params, seed: null, temperature: 1.5 });
      expect(a.ids).not.toEqual(b.ids);
    } finally {
      await engine.shutdown();
    }
  });
});
