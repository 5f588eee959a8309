#!/usr/bin/env bun
// A random-weight model of a model family's real shape, as GGUF, written by the test helpers
// (the shared generator writes Llama and Qwen shapes only): for benchmarks.
//   bun scripts/random-family-model.ts --shape gemma3-1b --out models/gemma3-1b.gguf [--dtype f16|f32] [--no-window]
// --no-window writes the same weights with every layer global, to compare what the window saves.
import { parseArgs } from "node:util";
import { makeWeights, writeGguf, type RandomLlamaShape } from "../test/helpers/random_llama.ts";

// Gemma 3 1B (google/gemma-3-1b-pt's config.json): five local layers (window 512) to one global.
const SHAPES: Record<string, RandomLlamaShape> = {
  "gemma3-1b": {
    arch: "gemma3",
    dim: 1152,
    layers: 26,
    heads: 4,
    kvHeads: 1,
    headDim: 256,
    ffn: 6912,
    vocab: 262144,
    ctx: 32768,
    ropeTheta: 1e6,
    ropeLocalTheta: 10000,
    slidingWindow: 512,
    queryPreAttnScalar: 256,
    tied: true,
    std: 0.02,
    seed: 1,
    addSpacePrefix: false,
  },
};

const { values } = parseArgs({
  options: {
    shape: { type: "string" },
    out: { type: "string" },
    dtype: { type: "string", default: "f16" },
    "no-window": { type: "boolean", default: false },
  },
});
const base = SHAPES[values.shape ?? ""];
if (!base || !values.out || (values.dtype !== "f16" && values.dtype !== "f32")) {
  console.error(
    `usage: bun scripts/random-family-model.ts --shape ${Object.keys(SHAPES).join("|")} --out <file.gguf> [--dtype f16|f32] [--no-window]`,
  );
  process.exit(2);
}
const shape = values["no-window"] ? { ...base, slidingWindow: undefined } : base;
const t0 = performance.now();
writeGguf(values.out, shape, values.dtype, makeWeights(shape, values.dtype));
console.log(
  `${values.out}: ${values.shape}${values["no-window"] ? " (every layer global)" : ""}, ${values.dtype}, ${((performance.now() - t0) / 1000).toFixed(0)} s`,
);
