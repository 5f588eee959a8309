// Random-weight models of each family the engine runs, at test sizes: shared by the reference
// tests (random_model) and the llama.cpp peer tests (llama_cpp_peer).
import { GQA, type RandomLlamaShape } from "./random_llama.ts";

// Qwen 2: q/k/v biases, rope_theta 1e6, tied. Qwen 3: q/k norms per head, head_dim 64 with
// q_dim (256) twice hidden, untied.
export const QWEN2: RandomLlamaShape = {
  ...GQA,
  dim: 128,
  heads: 4,
  kvHeads: 2,
  ffn: 256,
  ropeTheta: 1e6,
  tied: true,
  seed: 3,
  arch: "qwen2",
};
export const QWEN3: RandomLlamaShape = {
  ...GQA,
  dim: 128,
  heads: 4,
  kvHeads: 2,
  headDim: 64,
  ffn: 256,
  ropeTheta: 1e6,
  seed: 4,
  arch: "qwen3",
};
// RoPE scaling on GQA's head_dim 64: each scheme from config.json, and from GGUF where it has one.
export const LLAMA3_ROPE = {
  rope_type: "llama3",
  factor: 8,
  low_freq_factor: 1,
  high_freq_factor: 4,
  original_max_position_embeddings: 64,
};
export const scaled = (ropeScaling: Record<string, unknown>): RandomLlamaShape => ({ ...GQA, ropeScaling });
// Phi-3: q/k/v and gate/up fused in the files; LongRoPE with an original context of 64 (of 512).
export const PHI3: RandomLlamaShape = { ...GQA, heads: 4, kvHeads: 4, seed: 5, arch: "phi3" };
const ramp = (from: number, to: number) => Array.from({ length: 32 }, (_, i) => from + ((to - from) * i) / 31);
export const PHI3_LONG: RandomLlamaShape = {
  ...PHI3,
  originalCtx: 64,
  ropeScaling: { type: "longrope", long_factor: ramp(1, 12), short_factor: ramp(1, 1.5) },
};

// Gemma 2: four norms a layer of x * (1 + w), GELU, embeddings x sqrt(hidden), soft caps, every
// other layer over a window of 8; head_dim 48 with q_dim 192 over hidden 128. Gemma 3: q/k norms,
// five local layers to one global, a window of 20 (across a block's edge), its own local RoPE base.
export const GEMMA2: RandomLlamaShape = {
  ...GQA,
  dim: 128,
  heads: 4,
  kvHeads: 2,
  headDim: 48,
  ffn: 256,
  tied: true,
  seed: 9,
  arch: "gemma2",
  slidingWindow: 8,
  attnSoftcap: 1,
  finalSoftcap: 2,
};
export const GEMMA3: RandomLlamaShape = {
  ...GQA,
  dim: 128,
  heads: 4,
  kvHeads: 1,
  ffn: 256,
  layers: 6,
  tied: true,
  seed: 10,
  arch: "gemma3",
  ropeTheta: 1e6,
  ropeLocalTheta: 10000,
  slidingWindow: 20,
};
// Mistral: every layer over a window of 12.
export const MISTRAL: RandomLlamaShape = { ...GQA, slidingWindow: 12, seed: 11 };
