// Random-weight Llamas the test writes itself (HF safetensors in f32/f16/bf16 and
// GGUF in f32/f16, from the same weights) against a plain f64 reference forward pass:
// the same greedy tokens, and logits within tolerance.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { baseFrequencies, ropeFrequencies, ropeScalingFromHf } from "../src/model/rope.ts";
import { generate, nextTokenLogits } from "./helpers/engine.ts";
import type { QuantType } from "../src/model/quantize.ts";
import {
  GQA,
  makeWeights,
  quantizedWeights,
  TINY,
  writeGguf,
  writeHfModel,
  writeSafetensors,
  type RandomLlamaShape,
  type WeightDType,
} from "./helpers/random_llama.ts";
import { argmaxAndGap, RefLlama } from "./helpers/ref_llama.ts";
import { GEMMA2, GEMMA3, LLAMA3_ROPE, MISTRAL, PHI3, PHI3_LONG, QWEN2, QWEN3, scaled } from "./helpers/families.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-random-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const STEPS = 24;

function prompt(shape: RandomLlamaShape, n: number, salt: number): number[] {
  const ids = [1];
  for (let i = 1; i < n; i++) ids.push(3 + ((i * 7919 + salt * 104729) % (shape.vocab - 3)));
  return ids;
}

const cases: {
  name: string;
  shape: RandomLlamaShape;
  dtype: WeightDType | QuantType;
  format: "hf" | "gguf";
  kvCacheDtype?: "f16";
  computeDtype?: "bf16";
  blockSizeTokens?: number;
}[] = [
  { name: "tiny f32 (HF)", shape: TINY, dtype: "f32", format: "hf" },
  { name: "tiny f16 (HF)", shape: TINY, dtype: "f16", format: "hf" },
  { name: "tiny bf16 (HF)", shape: TINY, dtype: "bf16", format: "hf" },
  { name: "tiny f32 (GGUF)", shape: TINY, dtype: "f32", format: "gguf" },
  { name: "GQA 4:1, head_dim 64, untied, rope_theta 5e5, f32 (HF)", shape: GQA, dtype: "f32", format: "hf" },
  { name: "GQA 4:1, head_dim 64, untied, rope_theta 5e5, f16 (GGUF)", shape: GQA, dtype: "f16", format: "gguf" },
  // Quantized GGUF: the reference runs on the decoded weights, so results must agree as closely as f32 does.
  { name: "GQA, Q8_0 (GGUF)", shape: GQA, dtype: "q8_0", format: "gguf" },
  { name: "GQA, Q4_0 (GGUF)", shape: GQA, dtype: "q4_0", format: "gguf" },
  { name: "GQA, Q4_1 (GGUF)", shape: GQA, dtype: "q4_1", format: "gguf" },
  { name: "GQA, Q5_1 (GGUF)", shape: GQA, dtype: "q5_1", format: "gguf" },
  { name: "GQA, Q4_K (GGUF)", shape: GQA, dtype: "q4_k", format: "gguf" },
  { name: "GQA, Q5_K (GGUF)", shape: GQA, dtype: "q5_k", format: "gguf" },
  { name: "GQA, Q6_K (GGUF)", shape: GQA, dtype: "q6_k", format: "gguf" },
  // Packed at load as the type that holds their values exactly (Q8_0, Q6_K).
  { name: "GQA, Q5_0 (GGUF)", shape: GQA, dtype: "q5_0", format: "gguf" },
  { name: "GQA, IQ4_NL (GGUF)", shape: GQA, dtype: "iq4_nl", format: "gguf" },
  { name: "GQA, Q3_K (GGUF)", shape: GQA, dtype: "q3_k", format: "gguf" },
  { name: "GQA f32 (HF) with an f16 KV cache", shape: GQA, dtype: "f32", format: "hf", kvCacheDtype: "f16" },
  // bf16 products (--dtype bfloat16): weights repacked to bf16 at load, every step in bf16.
  { name: "GQA f16 (GGUF) with bf16 compute", shape: GQA, dtype: "f16", format: "gguf", computeDtype: "bf16" },
  // Tied: the packed output matrix is also the embedding the tokens are read from.
  { name: "tiny bf16 (HF, tied) with bf16 compute", shape: TINY, dtype: "bf16", format: "hf", computeDtype: "bf16" },
  { name: "Qwen 2 (q/k/v biases) f32 (HF)", shape: QWEN2, dtype: "f32", format: "hf" },
  { name: "Qwen 2 f16 (GGUF)", shape: QWEN2, dtype: "f16", format: "gguf" },
  { name: "Qwen 2 Q8_0 (GGUF)", shape: QWEN2, dtype: "q8_0", format: "gguf" },
  {
    name: "Qwen 3 (q/k norms, head_dim 64 x 4 heads over hidden 128) f32 (HF)",
    shape: QWEN3,
    dtype: "f32",
    format: "hf",
  },
  { name: "Qwen 3 bf16 (HF)", shape: QWEN3, dtype: "bf16", format: "hf" },
  { name: "Qwen 3 f32 (GGUF)", shape: QWEN3, dtype: "f32", format: "gguf" },
  { name: "Qwen 3 Q8_0 (GGUF)", shape: QWEN3, dtype: "q8_0", format: "gguf" },
  { name: "RoPE scaling llama3 (HF)", shape: scaled(LLAMA3_ROPE), dtype: "f32", format: "hf" },
  { name: "RoPE scaling llama3 (GGUF rope_freqs)", shape: scaled(LLAMA3_ROPE), dtype: "f32", format: "gguf" },
  { name: "RoPE scaling linear (HF)", shape: scaled({ type: "linear", factor: 4 }), dtype: "f32", format: "hf" },
  { name: "RoPE scaling linear (GGUF)", shape: scaled({ type: "linear", factor: 4 }), dtype: "f32", format: "gguf" },
  {
    name: "RoPE scaling yarn (HF)",
    shape: scaled({ rope_type: "yarn", factor: 4, original_max_position_embeddings: 128 }),
    dtype: "f32",
    format: "hf",
  },
  {
    name: "RoPE scaling yarn (GGUF)",
    shape: scaled({ rope_type: "yarn", factor: 4, original_max_position_embeddings: 128 }),
    dtype: "f32",
    format: "gguf",
  },
  {
    name: "Gemma 2 f32 (HF, query_pre_attn_scalar 64)",
    shape: { ...GEMMA2, queryPreAttnScalar: 64 },
    dtype: "f32",
    format: "hf",
  },
  { name: "Gemma 2 f32 (GGUF)", shape: GEMMA2, dtype: "f32", format: "gguf" },
  { name: "Gemma 2 Q8_0 (GGUF)", shape: GEMMA2, dtype: "q8_0", format: "gguf" },
  { name: "Gemma 3 f32 (HF)", shape: GEMMA3, dtype: "f32", format: "hf" },
  {
    name: "Gemma 3 bf16 (HF, linear RoPE scaling on global layers)",
    shape: { ...GEMMA3, ropeScaling: { rope_type: "linear", factor: 8 } },
    dtype: "bf16",
    format: "hf",
  },
  { name: "Gemma 3 f16 (GGUF)", shape: GEMMA3, dtype: "f16", format: "gguf" },
  { name: "Mistral, sliding window 12 (HF)", shape: MISTRAL, dtype: "f32", format: "hf" },
  { name: "Mistral, sliding window 12 (GGUF)", shape: MISTRAL, dtype: "f16", format: "gguf" },
  // Blocks of 4: those behind the window go back to the pool every few tokens as it decodes.
  {
    name: "Mistral, sliding window 12, blocks of 4 (HF)",
    shape: MISTRAL,
    dtype: "f32",
    format: "hf",
    blockSizeTokens: 4,
  },
  { name: "Phi-3 (fused qkv and gate_up) f32 (HF)", shape: PHI3, dtype: "f32", format: "hf" },
  { name: "Phi-3 f16 (GGUF)", shape: PHI3, dtype: "f16", format: "gguf" },
  { name: "Phi-3 Q4_K (GGUF)", shape: PHI3, dtype: "q4_k", format: "gguf" },
  { name: "Phi-3 LongRoPE (HF)", shape: PHI3_LONG, dtype: "f32", format: "hf" },
  { name: "Phi-3 LongRoPE (GGUF rope_factors)", shape: PHI3_LONG, dtype: "f32", format: "gguf" },
  {
    name: "RoPE scaling dynamic (HF, vLLM's fixed base)",
    shape: scaled({ type: "dynamic", factor: 2 }),
    dtype: "f32",
    format: "hf",
  },
];
const QUANT_TYPES: readonly string[] = [
  "q8_0",
  "q4_0",
  "q4_1",
  "q5_1",
  "q4_k",
  "q5_k",
  "q6_k",
  "q5_0",
  "iq4_nl",
  "q3_k",
];

/** The shape without each feature it sets that the reference can leave out. */
function ablations(s: RandomLlamaShape): [string, Partial<RandomLlamaShape>][] {
  const out: [string, Partial<RandomLlamaShape>][] = [];
  if (s.ropeScaling) out.push(["rope scaling", { ropeScaling: undefined }]);
  if (s.slidingWindow) out.push(["sliding window", { slidingWindow: undefined }]);
  if (s.attnSoftcap) out.push(["attention soft cap", { attnSoftcap: undefined }]);
  if (s.finalSoftcap) out.push(["final soft cap", { finalSoftcap: undefined }]);
  if (s.ropeLocalTheta) out.push(["local RoPE base", { ropeLocalTheta: undefined }]);
  if (s.queryPreAttnScalar) out.push(["query_pre_attn_scalar", { queryPreAttnScalar: undefined }]);
  return out;
}

describe("random-weight models against the reference forward pass", () => {
  for (const [i, c] of cases.entries()) {
    test(c.name, async () => {
      const quantized = QUANT_TYPES.includes(c.dtype);
      const weights = makeWeights(c.shape, quantized ? "f32" : (c.dtype as WeightDType));
      const out = join(dir, `case${i}`);
      let path: string;
      if (c.format === "hf") path = writeHfModel(out, c.shape, c.dtype as WeightDType, weights);
      else {
        writeHfModel(out, c.shape, "f32", weights); // only for its folder; the GGUF is what loads
        path = join(out, "model.gguf");
        writeGguf(path, c.shape, c.dtype as "f32" | "f16" | QuantType, weights);
      }
      const refWeights = quantized ? quantizedWeights(weights, c.dtype as QuantType) : weights;
      const engine = await LLMEngine.create(path, {
        threads: 2,
        maxNumSeqs: 4,
        kvCacheDtype: c.kvCacheDtype ?? "f32",
        computeDtype: c.computeDtype ?? "f32",
        ...(c.blockSizeTokens ? { blockSizeTokens: c.blockSizeTokens } : {}),
      });
      // An f16 cache rounds K and V: logits move by about 1e-3 of their scale, not 1e-5.
      // Quantized weights meet 8-bit activations (as llama.cpp's do), and so does the reference;
      // but the engine rounds its f32 activations to 8 bits and the reference its f64 ones, and a
      // value within rounding of a level's edge lands one level apart now and then (a few in a
      // prompt), moving logits by up to about 1e-2. Most prompts agree to 1e-6; a misread layout
      // moves them by whole units.
      const intProducts = quantized;
      // bf16 keeps 8 significant bits of each weight and activation: logits move by a few 1e-2.
      const logitTolerance =
        c.computeDtype === "bf16" ? 1e-1 : c.kvCacheDtype === "f16" ? 5e-3 : quantized ? 2e-2 : 1e-4;
      try {
        // The prompt's salt comes from the case's name: adding a case leaves the others' prompts alone.
        const ids = prompt(
          c.shape,
          9,
          [...c.name].reduce((h, ch) => (h * 31 + ch.charCodeAt(0)) % 1000003, 7),
        );
        const ref = new RefLlama(c.shape, refWeights, intProducts);
        for (const t of ids.slice(0, -1)) ref.forward(t);
        let logits = ref.forward(ids[ids.length - 1]);
        // Prefill logits: f32 accumulation against f64.
        const got = nextTokenLogits(engine, ids);
        let maxDiff = 0;
        for (let v = 0; v < logits.length; v++) maxDiff = Math.max(maxDiff, Math.abs(got[v] - logits[v]));
        if (process.env.INFERNEO_TEST_VERBOSE)
          console.log(`${c.name}: max logit difference ${maxDiff.toExponential(2)}`);
        expect(maxDiff).toBeLessThan(logitTolerance);

        // Every greedy step the engine takes, fed to the reference in turn: the engine's token is
        // the reference's argmax, or within the logits' tolerance of it (a near-tie, which either
        // side may call). Most steps of most cases are exact.
        const { ids: tokens } = await generate(engine, ids, { maxTokens: STEPS });
        const tieWithin = c.computeDtype === "bf16" ? 2 * logitTolerance : Math.max(1e-3, 2 * logitTolerance);
        let exact = 0;
        for (const [step, token] of tokens.entries()) {
          const { id } = argmaxAndGap(logits);
          if (id === token) exact++;
          // Named by its step in a failure: how far the engine's token falls short of the argmax.
          expect({ step, withinTie: logits[id] - logits[token] < tieWithin }).toEqual({ step, withinTie: true });
          logits = ref.forward(token);
        }
        expect(tokens.length).toBe(STEPS);
        expect(exact).toBeGreaterThanOrEqual(STEPS - 2);
        // Each feature the case exercises must change the logits over this sequence, or the
        // comparison could not tell whether the engine applied it.
        for (const [feature, off] of ablations(c.shape)) {
          const plain = new RefLlama({ ...c.shape, ...off }, refWeights, intProducts);
          let other: Float64Array = new Float64Array(0);
          for (const t of [...ids, ...tokens.slice(0, -1)]) other = plain.forward(t);
          const moved = Math.max(...logits.map((v, k) => Math.abs(v - other[k])));
          expect({ feature, matters: moved > 1e-2 }).toEqual({ feature, matters: true });
        }
      } finally {
        await engine.shutdown();
      }
    });
  }
});

describe("a sliding window on every layer (Mistral)", () => {
  test("blocks behind the window go back to the pool: a request longer than the pool runs, with the same tokens", async () => {
    const path = writeHfModel(join(dir, "mistral-pool"), MISTRAL, "f32", makeWeights(MISTRAL, "f32"));
    const ids = prompt(MISTRAL, 9, 5);
    const options = {
      threads: 2,
      maxNumSeqs: 2,
      blockSizeTokens: 4,
      maxNumBatchedTokens: 8,
      kvCacheDtype: "f32" as const,
    };
    const roomy = await LLMEngine.create(path, options);
    let want: number[];
    try {
      want = (await generate(roomy, ids, { maxTokens: 80 })).ids;
    } finally {
      await roomy.shutdown();
    }
    // 89 tokens need 23 blocks of 4; the window (12) and a chunk (8) need at most 6 at a time.
    const tight = await LLMEngine.create(path, { ...options, numBlocksOverride: 8 });
    try {
      let most = 0;
      tight.stepObserver = () => {
        most = Math.max(most, tight.kv.numBlocks - tight.kv.numFreeBlocks);
      };
      const { ids: got } = await generate(tight, ids, { maxTokens: 80 });
      expect(got).toEqual(want);
      expect(most).toBeLessThanOrEqual(tight.kv.blocksHeld(89, 8));
      expect(tight.kv.numFreeBlocks).toBe(8);
    } finally {
      await tight.shutdown();
    }
  });
});

describe("LongRoPE's factors follow the length served", () => {
  test("short factors up to the original context, long past it; the attention factor from the model's own length", () => {
    const s = PHI3_LONG.ropeScaling!;
    const scaling = ropeScalingFromHf(s, PHI3_LONG.ctx, "config.json", PHI3_LONG.originalCtx);
    const base = baseFrequencies(PHI3_LONG.ropeTheta, 64);
    const short = ropeFrequencies(PHI3_LONG.ropeTheta, 64, scaling, 64);
    const long = ropeFrequencies(PHI3_LONG.ropeTheta, 64, scaling, 65);
    expect([...short.invFreq!]).toEqual([...base].map((f, i) => f / (s.short_factor as number[])[i]));
    expect([...long.invFreq!]).toEqual([...base].map((f, i) => f / (s.long_factor as number[])[i]));
    expect(short.attnFactor).toBeCloseTo(Math.sqrt(1 + Math.log(8) / Math.log(64)), 12);
    expect(long.attnFactor).toBe(short.attnFactor);
  });
});

describe("Gemma 3's multimodal checkpoint", () => {
  test("serves its text model: text_config over the text defaults, the language model's tensors, no vision tower", async () => {
    const out = join(dir, "gemma3-mm");
    const weights = makeWeights(GEMMA3, "f32");
    const plain = writeHfModel(join(out, "plain"), GEMMA3, "f32", weights);
    // The same weights as a Gemma3ForConditionalGeneration folder (transformers >= 4.52 names),
    // with a vision tower tensor the text model does not read.
    const mm = writeHfModel(join(out, "mm"), GEMMA3, "f32", weights);
    const cfg = JSON.parse(readFileSync(join(mm, "config.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(
      join(mm, "config.json"),
      JSON.stringify({ architectures: ["Gemma3ForConditionalGeneration"], model_type: "gemma3", text_config: cfg }),
    );
    const renamed = weights.map((t) => ({ ...t, name: t.name.replace(/^model\./, "model.language_model.") }));
    const vision = { name: "model.vision_tower.patch_embed.weight", shape: [4, 4], data: new Float64Array(16) };
    writeSafetensors(join(mm, "model.safetensors"), [...renamed, vision], "f32");
    const ids = prompt(GEMMA3, 9, 5);
    const logits: Float32Array[] = [];
    for (const path of [plain, mm]) {
      const engine = await LLMEngine.create(path, { threads: 2, maxNumSeqs: 2 });
      try {
        logits.push(nextTokenLogits(engine, ids));
      } finally {
        await engine.shutdown();
      }
    }
    expect([...logits[1]]).toEqual([...logits[0]]);
  });
});

describe("the KV cache's dtype", () => {
  test("auto is the weights' own: f32 for an f32 model (exact), f16 for f16 and quantized ones", async () => {
    const out = join(dir, "kv-auto");
    const shape = { ...TINY, ffn: 192 }; // rows of whole Q8_0 blocks
    const weights = makeWeights(shape, "f32");
    const f32 = writeHfModel(join(out, "f32"), shape, "f32", weights);
    const q8 = join(out, "q8.gguf");
    writeGguf(q8, shape, "q8_0", weights);
    const f16 = writeHfModel(join(out, "f16"), shape, "f16", makeWeights(shape, "f16"));
    const want: [string, "f32" | "f16"][] = [
      [f32, "f32"],
      [f16, "f16"],
      [q8, "f16"],
    ];
    for (const [path, kv] of want) {
      const engine = await LLMEngine.create(path, { threads: 1, maxNumSeqs: 1 });
      expect({ path, kv: engine.kvCacheDtype }).toEqual({ path, kv });
      await engine.shutdown();
    }
  });
});
