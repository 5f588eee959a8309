// The scheduler with the real engine: staggered traffic, preemption, prefix caching,
// the sampling controls, and no KV block lost across hundreds of aborts.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine, type EngineOptions } from "../src/engine/llm_engine.ts";
import { QueueFullError } from "../src/engine/scheduler.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";
import { generate, GREEDY } from "./helpers/engine.ts";
import { makeWeights, TINY, writeHfModel, type RandomLlamaShape } from "./helpers/random_llama.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const SHAPE: RandomLlamaShape = { ...TINY, ctx: 1024, seed: 7 };
const dir = mkdtempSync(join(tmpdir(), "inferneo-cb-"));
let modelPath: string;
beforeAll(() => {
  modelPath = writeHfModel(dir, SHAPE, "f32", makeWeights(SHAPE, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function promptOf(len: number, salt: number): number[] {
  return Array.from({ length: len }, (_, i) => (i === 0 ? 1 : 3 + ((i * 131 + salt * 977) % 509)));
}

async function untilSteps(engine: LLMEngine, n: number): Promise<void> {
  const target = engine.stepCount + n;
  const start = performance.now();
  while (engine.stepCount < target && performance.now() - start < 30_000) await Bun.sleep(1);
}

/** The 32 requests, four at a time with a step between, as traffic arrives. */
async function staggered(engine: LLMEngine, extra: Partial<typeof DEFAULT_SAMPLING> = {}): Promise<number[][]> {
  const runs = [];
  for (let i = 0; i < 32; i++) {
    runs.push(generate(engine, promptOf(LENGTHS[i], i), { maxTokens: MAX_TOKENS[i], ...extra }));
    if (i % 4 === 3) await untilSteps(engine, 1);
  }
  return (await Promise.all(runs)).map((r) => r.ids);
}

/** An engine for one test: made, used, shut down whatever happens. */
async function withEngine<T>(options: Partial<EngineOptions>, run: (engine: LLMEngine) => Promise<T>): Promise<T> {
  const engine = await LLMEngine.create(modelPath, options);
  try {
    return await run(engine);
  } finally {
    await engine.shutdown();
  }
}
/** One sequence at a time: each request as it runs alone. */
const SINGLE = { threads: 2, maxNumSeqs: 1, enablePrefixCaching: false };
/** 40 blocks of 16 = 640 tokens for up to 16 requests of up to 430 tokens each: preemption. */
const TIGHT = { threads: 2, maxNumSeqs: 16, maxNumBatchedTokens: 128, numBlocksOverride: 40 };

const LENGTHS = Array.from({ length: 32 }, (_, i) => 1 + Math.floor((i * 397) % 400));
const MAX_TOKENS = Array.from({ length: 32 }, (_, i) => 4 + ((i * 13) % 29));

describe("continuous batching", () => {
  let alone: number[][];
  beforeAll(async () => {
    alone = await withEngine(SINGLE, async (engine) => {
      const ids = [];
      for (let i = 0; i < 32; i++)
        ids.push((await generate(engine, promptOf(LENGTHS[i], i), { maxTokens: MAX_TOKENS[i] })).ids);
      return ids;
    });
  });

  test("32 staggered requests of 1 to 400 prompt tokens give the tokens each gives alone", async () => {
    const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 16, maxNumBatchedTokens: 128 });
    try {
      expect(await staggered(engine)).toEqual(alone);
      expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
    } finally {
      await engine.shutdown();
    }
  });

  test("with penalties, preempted, more requests than sequence-state slots: each as it ran alone", async () => {
    // The penalties count each request's tokens in an engine-side state (max_num_seqs slots),
    // given back when a request stops running and reopened with its tokens when it runs again.
    const penalties = { repetitionPenalty: 1.3, frequencyPenalty: 0.5, presencePenalty: 0.2 };
    const want = await withEngine(SINGLE, (single) => staggered(single, penalties));
    await withEngine(TIGHT, async (engine) => {
      expect(await staggered(engine, penalties)).toEqual(want);
      expect(engine.scheduler.numPreemptions).toBeGreaterThan(0);
      expect(want).not.toEqual(alone); // the penalties changed what was drawn
    });
  });

  test("the same 32 with a pool too small to hold them: preempted, and still identical", async () => {
    await withEngine(TIGHT, async (engine) => {
      expect(await staggered(engine)).toEqual(alone);
      expect(engine.scheduler.numPreemptions).toBeGreaterThan(0);
      expect(engine.kv.numFreeBlocks).toBe(40);
    });
  });
});

describe("async scheduling", () => {
  test("steps queued behind the one running give the tokens of one step at a time, and every block back", async () => {
    // Seeded sampling, penalties, stop tokens, min_tokens and a pool tight enough to preempt:
    // what a step draws is known only when it ends, so these all act a step late.
    const mixed = (i: number) => ({
      maxTokens: MAX_TOKENS[i],
      temperature: i % 3 === 0 ? 0 : 0.9,
      seed: i,
      ...(i % 4 === 1 ? { repetitionPenalty: 1.2, presencePenalty: 0.3 } : {}),
      ...(i % 5 === 2 ? { stopTokenIds: [3 + ((i * 131) % 509), 7, 11], ignoreEos: false } : {}),
      ...(i % 6 === 3 ? { minTokens: 3 } : {}),
    });
    const run = (asyncScheduling: boolean) =>
      withEngine({ ...TIGHT, asyncScheduling }, async (engine) => {
        let queuedBehind = 0;
        engine.stepObserver = () => {
          if (engine.runner.numInFlight > 0) queuedBehind += 1;
        };
        const outs = await Promise.all(
          Array.from({ length: 24 }, (_, i) => generate(engine, promptOf(LENGTHS[i], i), mixed(i))),
        );
        expect(engine.kv.numFreeBlocks).toBe(40);
        return { ids: outs.map((o) => o.ids), queuedBehind, preemptions: engine.scheduler.numPreemptions };
      });
    const serial = await run(false);
    const piped = await run(true);
    expect(piped.ids).toEqual(serial.ids);
    expect(serial.queuedBehind).toBe(0);
    expect(piped.queuedBehind).toBeGreaterThan(10);
    expect(piped.preemptions).toBeGreaterThan(0);
  });
});

describe("prefix caching", () => {
  test("a request sharing a 256-token prefix with a finished one is served from cache, with the same output", async () => {
    const prefix = promptOf(256, 42);
    const first = [...prefix, ...promptOf(20, 1).slice(1)];
    const second = [...prefix, ...promptOf(30, 2).slice(1)];
    const results: { cached: number; ids: number[] }[] = [];
    for (const enablePrefixCaching of [true, false]) {
      const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 4, enablePrefixCaching });
      try {
        await generate(engine, first, { maxTokens: 8 });
        const r = await generate(engine, second, { maxTokens: 24 });
        results.push({ cached: r.last!.numCachedTokens, ids: r.ids });
        if (enablePrefixCaching) {
          const m = await engine.metrics.registry.getSingleMetricAsString("inferneo:prefix_cache_hits_total");
          expect(m).toMatch(/prefix_cache_hits_total\{model_name="[^"]*"\} 256/);
        }
        expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
      } finally {
        await engine.shutdown();
      }
    }
    expect(results[0].cached).toBeGreaterThanOrEqual(240);
    expect(results[1].cached).toBe(0);
    expect(results[0].ids).toEqual(results[1].ids);
  });

  test("requests sent together with the same prompt (n > 1) compute it once and share its blocks", async () => {
    const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 8 });
    try {
      const p = promptOf(100, 9); // six full blocks and a partial one
      const outs = await Promise.all(
        [0, 1, 2, 3].map((i) => generate(engine, p, { maxTokens: 6, temperature: 1, seed: i })),
      );
      const cached = outs.map((o) => o.last!.numCachedTokens).sort((a, b) => a - b);
      expect(cached).toEqual([0, 96, 96, 96]);
      expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
    } finally {
      await engine.shutdown();
    }
  });

  test("a prompt that is all cache hits still recomputes its last block (shared blocks are never written)", async () => {
    const engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 4 });
    try {
      const p = promptOf(64, 5); // exactly 4 blocks
      const a = await generate(engine, p, { maxTokens: 10 });
      const b = await generate(engine, p, { maxTokens: 10 });
      expect(b.last!.numCachedTokens).toBe(48);
      expect(b.ids).toEqual(a.ids);
    } finally {
      await engine.shutdown();
    }
  });
});

describe("sampling controls", () => {
  let engine: LLMEngine;
  beforeAll(async () => {
    engine = await LLMEngine.create(modelPath, { threads: 2, maxNumSeqs: 8 });
  });
  afterAll(async () => engine?.shutdown());
  const prompt = promptOf(12, 3);

  test("logit_bias forces a token; logprobs report the model's own distribution with top alternatives", async () => {
    const plain = await generate(engine, prompt, { maxTokens: 4, logprobs: 5 });
    const forced = await generate(engine, prompt, { maxTokens: 4, logitBias: { 77: 100 }, logprobs: 5 });
    expect(forced.ids).toEqual([77, 77, 77, 77]);
    for (const lp of plain.logprobs) {
      expect(lp.top.length).toBe(5);
      expect(lp.top[0].tokenId).toBe(lp.tokenId); // greedy: the chosen one is the top one
      expect(lp.logprob).toBeCloseTo(lp.top[0].logprob, 5);
      for (let k = 1; k < 5; k++) expect(lp.top[k].logprob).toBeLessThanOrEqual(lp.top[k - 1].logprob);
    }
    // The bias moved the choice, not the reported log-probability of the first step's token 77.
    expect(forced.logprobs[0].logprob).toBeLessThan(plain.logprobs[0].logprob);
  });

  test("penalties change what repeats", async () => {
    const base = await generate(engine, prompt, { maxTokens: 40 });
    const penalized = await generate(engine, prompt, { maxTokens: 40, frequencyPenalty: 2, presencePenalty: 2 });
    const distinct = (ids: number[]) => new Set(ids).size;
    expect(distinct(penalized.ids)).toBeGreaterThanOrEqual(distinct(base.ids));
    expect(penalized.ids).not.toEqual(base.ids);
    const rep = await generate(engine, prompt, { maxTokens: 40, repetitionPenalty: 5 });
    expect(rep.ids).not.toEqual(base.ids);
    expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
  });

  test("stop token ids end the request; min_tokens holds them off; ignore_eos runs to max_tokens", async () => {
    const base = await generate(engine, prompt, { maxTokens: 10 });
    const stopAt = base.ids[3];
    const firstIndex = base.ids.indexOf(stopAt);
    const stopped = await generate(engine, prompt, { maxTokens: 10, stopTokenIds: [stopAt] });
    expect(stopped.ids).toEqual(base.ids.slice(0, firstIndex + 1));
    expect(stopped.last!.finishReason).toBe("stop");
    expect(stopped.last!.stopReason).toBe(stopAt);
    const t = stopped.last!.timings!;
    expect(t.queueMs).toBeGreaterThanOrEqual(0);
    expect(t.firstTokenMs).toBeCloseTo(t.queueMs + t.prefillMs, 6);
    expect(t.e2eMs).toBeGreaterThanOrEqual(t.firstTokenMs);
    const held = await generate(engine, prompt, { maxTokens: 10, stopTokenIds: [stopAt], minTokens: 10 });
    expect(held.ids.length).toBe(10);
    expect(held.ids.includes(stopAt)).toBe(false);
    expect(held.last!.finishReason).toBe("length");
  });

  test("stop strings, also across tokens, are cut from the text and never streamed in part", async () => {
    const base = await generate(engine, prompt, { maxTokens: 30 });
    const text = base.text;
    expect(text.length).toBeGreaterThan(12);
    const stop = text.slice(5, 9); // likely spans a token boundary
    let streamed = "";
    let last = null;
    for await (const out of engine.addRequest(prompt, { ...GREEDY, maxTokens: 30, stop: [stop] })) {
      streamed += out.text;
      expect(streamed.includes(stop)).toBe(false);
      last = out;
    }
    expect(streamed).toBe(text.slice(0, text.indexOf(stop)));
    expect(last!.finishReason).toBe("stop");
    expect(last!.stopReason).toBe(stop);
  });
});

describe("bounds and aborts", () => {
  test("200 requests, a third aborted while waiting, mid-prefill or mid-decode: the pool comes back whole", async () => {
    const engine = await LLMEngine.create(modelPath, {
      threads: 2,
      maxNumSeqs: 8,
      maxNumBatchedTokens: 64,
      maxQueueLen: 256,
    });
    const free0 = engine.kv.numFreeBlocks;
    let rng = 12345;
    const rand = () => (rng = (rng * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    type Target = "waiting" | "prefill" | "decode";
    const aborted: Record<Target, number> = { waiting: 0, prefill: 0, decode: 0 };
    try {
      const targets = new Map<string, { target: Target; notBeforeStep: number }>();
      const streams = [];
      for (let i = 0; i < 200; i++) {
        const target: Target | null = i % 3 !== 0 ? null : (["waiting", "prefill", "decode"] as const)[(i / 3) % 3];
        // Prompts that must be aborted mid-prefill are longer than the token budget.
        const len = target === "prefill" ? 100 + Math.floor(rand() * 150) : 1 + Math.floor(rand() * 150);
        const s = engine.addRequest(promptOf(len, i), { ...GREEDY, maxTokens: 4 + Math.floor(rand() * 20) });
        if (target) targets.set(s.requestId, { target, notBeforeStep: Math.floor(rand() * 40) });
        streams.push(s);
      }
      engine.stepObserver = () => {
        const live = [...engine.scheduler.running, ...engine.scheduler.waiting];
        for (const req of live) {
          const t = targets.get(req.id);
          if (!t || engine.stepCount < t.notBeforeStep) continue;
          const state: Target =
            req.numComputedTokens === 0
              ? "waiting"
              : req.numComputedTokens < req.promptTokenIds.length
                ? "prefill"
                : "decode";
          if (state !== t.target) continue;
          targets.delete(req.id);
          aborted[state] += 1;
          engine.abort(req.id);
        }
      };
      const reasons = await Promise.all(
        streams.map(async (s) => {
          let reason = null;
          for await (const out of s) reason = out.finishReason;
          return reason;
        }),
      );
      expect(reasons.filter((r) => r !== "abort" && r !== "length")).toEqual([]);
      expect(reasons.filter((r) => r === "abort").length).toBe(aborted.waiting + aborted.prefill + aborted.decode);
      expect(aborted.waiting).toBeGreaterThan(10);
      expect(aborted.prefill).toBeGreaterThan(10);
      expect(aborted.decode).toBeGreaterThan(10);
      expect(engine.numUnfinished).toBe(0);
      expect(engine.kv.numFreeBlocks).toBe(free0);
    } finally {
      await engine.shutdown();
    }
  });

  test("a full waiting queue refuses new requests", async () => {
    const engine = await LLMEngine.create(modelPath, { threads: 1, maxNumSeqs: 1, maxQueueLen: 3 });
    try {
      // One runs (max_num_seqs 1), three wait; the fifth finds the queue full.
      const held = [0, 1, 2, 3].map((i) => engine.addRequest(promptOf(300, i), { ...DEFAULT_SAMPLING, maxTokens: 50 }));
      expect(engine.numRunning).toBe(1);
      expect(engine.numWaiting).toBe(3);
      expect(() => engine.addRequest(promptOf(5, 9), { ...DEFAULT_SAMPLING, maxTokens: 5 })).toThrow(QueueFullError);
      for (const s of held) engine.abort(s.requestId);
      expect(engine.numUnfinished).toBe(0);
    } finally {
      await engine.shutdown();
    }
  });
});
