// `inferneo quantize`: each type writes what the engine reads back exactly (see the random-model
// tests), and the Q4_K_M and Q5_K_M mixes pick llama.cpp's type for every tensor: Q6_K for the
// output and for attn_v and ffn_down in the layers llama.cpp gives more bits, Q4_K (Q5_K)
// elsewhere, and their fallbacks (Q5_0 or Q5_1, and Q8_0) where rows are not whole super-blocks. Where llama.cpp's own llama-quantize is
// built (scripts/build-llama-cpp.sh), its choices on the same file are the reference.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { GGML_TYPES, readGguf } from "../src/model/gguf.ts";
import { quantizeGguf } from "../src/model/quantize_gguf.ts";
import { generate } from "./helpers/engine.ts";
import { GQA, makeWeights, writeGguf, type RandomLlamaShape } from "./helpers/random_llama.ts";

setDefaultTimeout(120_000);
const dir = mkdtempSync(join(tmpdir(), "inferneo-quantize-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const LLAMA_QUANTIZE = join(import.meta.dir, "..", ".bench", "llama.cpp", "build", "bin", "llama-quantize");
if (!existsSync(LLAMA_QUANTIZE))
  console.warn(
    "skipped: llama.cpp's llama-quantize is not built (scripts/build-llama-cpp.sh) for the Q4_K_M reference",
  );

const typesOf = (path: string) =>
  Object.fromEntries(readGguf(path).tensors.map((t) => [t.name, GGML_TYPES[t.type]?.name ?? String(t.type)]));

// Eight layers, so that llama.cpp's layer rule (first and last eighth, every third between) shows.
const EIGHT: RandomLlamaShape = { ...GQA, layers: 8, seed: 7 };
// Rows of 160 weights: not whole super-blocks, so every K type falls back.
const NARROW: RandomLlamaShape = { ...GQA, dim: 160, heads: 5, kvHeads: 1, ffn: 320, layers: 2, seed: 8 };

describe("inferneo quantize", () => {
  for (const [name, shape, mix] of [
    ["eight layers", EIGHT, "q4_k_m"],
    ["rows that are not whole super-blocks", NARROW, "q4_k_m"],
    ["eight layers", EIGHT, "q5_k_m"],
    ["rows that are not whole super-blocks", NARROW, "q5_k_m"],
  ] as const) {
    test(`${mix.toUpperCase()} on ${name}: llama.cpp's type for each tensor, and the model runs`, async () => {
      const src = join(dir, `${shape.seed}-${mix}-f32.gguf`);
      writeGguf(src, shape, "f32", makeWeights(shape, "f32"));
      const out = join(dir, `${shape.seed}-${mix}.gguf`);
      quantizeGguf(src, out, mix);
      const got = typesOf(out);
      // llama.cpp's use_more_bits(i, n), transcribed (for eight layers: 0, 3, 6 and 7).
      const n = shape.layers;
      const more = (i: number) =>
        i < Math.floor(n / 8) || i >= Math.floor((7 * n) / 8) || (i - Math.floor(n / 8)) % 3 === 2;
      const k = shape.dim % 256 === 0;
      for (const [tensor, type] of Object.entries(got)) {
        const layer = Number(/^blk\.(\d+)\./.exec(tensor)?.[1] ?? -1);
        const bigger = /attn_v|ffn_down/.test(tensor) && more(layer);
        const cols = /ffn_down/.test(tensor) ? shape.ffn : shape.dim;
        const want = tensor.endsWith("norm.weight")
          ? "F32"
          : tensor === "output.weight" || bigger
            ? cols % 256 === 0
              ? "Q6_K"
              : "Q8_0"
            : cols % 256 === 0
              ? mix === "q4_k_m"
                ? "Q4_K"
                : "Q5_K"
              : mix === "q4_k_m"
                ? "Q5_0"
                : "Q5_1";
        expect({ tensor, type }).toEqual({ tensor, type: want });
      }
      expect(Object.values(got)).toContain(k ? "Q6_K" : "Q8_0");
      if (existsSync(LLAMA_QUANTIZE)) {
        const theirs = join(dir, `${shape.seed}-${mix}-theirs.gguf`);
        const r = spawnSync(LLAMA_QUANTIZE, [src, theirs, mix.toUpperCase()], { encoding: "utf8" });
        expect(r.status).toBe(0);
        expect(got).toEqual(typesOf(theirs));
      }
      const engine = await LLMEngine.create(out, { threads: 2, maxNumSeqs: 2 });
      try {
        const { ids } = await generate(engine, [1, 40, 50, 60], { maxTokens: 8 });
        expect(ids.length).toBe(8);
      } finally {
        await engine.shutdown();
      }
    });
  }
});
