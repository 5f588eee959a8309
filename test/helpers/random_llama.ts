// A deterministic random-weight Llama, written as an HF folder (safetensors in
// f32/f16/bf16) and as GGUF (f32/f16) from the same weights, so tests need
// nothing outside the repository. Also used by the benchmark script.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fromBf16Bits, fromF16Bits, toBf16Bits, toF16Bits } from "../../src/model/f16.ts";
import { dequantize, GGML_TYPE_ID, quantize, type QuantType } from "../../src/model/quantize.ts";
import { hfRopeFrequencies } from "./ref_llama.ts";
import { vocabPieces } from "../../src/model/dummy.ts";

export interface RandomLlamaShape {
  dim: number;
  layers: number;
  heads: number;
  kvHeads: number;
  ffn: number;
  vocab: number;
  ctx: number;
  ropeTheta: number;
  tied: boolean;
  std: number;
  seed: number;
  /** qwen2: q/k/v biases; qwen3: RMSNorm over each q and k head. Absent: llama. */
  arch?: "llama" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3"; // phi3: q/k/v and gate/up fused in the files
  headDim?: number; // absent: dim / heads
  /** config.json's rope_scaling (GGUF: its keys, or rope_freqs for llama3). */
  ropeScaling?: Record<string, unknown>;
  originalCtx?: number; // config.json's original_max_position_embeddings (Phi-3's LongRoPE)
  slidingWindow?: number; // llama: written as a MistralForCausalLM; gemma: its local layers' window
  windowPattern?: number; // Gemma 3's sliding_window_pattern (GGUF has none: llama.cpp's 6)
  queryPreAttnScalar?: number; // Gemma (default head_dim)
  attnSoftcap?: number; // Gemma 2
  finalSoftcap?: number; // Gemma 2
  ropeLocalTheta?: number; // Gemma 3
  addSpacePrefix?: boolean; // GGUF's tokenizer.ggml.add_space_prefix (Gemma's files say false)
}

export const isGemma = (s: RandomLlamaShape) => s.arch === "gemma2" || s.arch === "gemma3";

/** Whether layer l attends over the sliding window: Gemma 2 every other, Gemma 3 all but each n-th. */
export function isLocalLayer(s: RandomLlamaShape, l: number): boolean {
  if (!s.slidingWindow) return false;
  const pattern = s.arch === "gemma2" ? 2 : s.arch === "gemma3" ? (s.windowPattern ?? 6) : 0;
  return pattern === 0 || (l + 1) % pattern !== 0;
}

/** Phi-3's files: each layer's q, k, v as one qkv_proj and its gate and up as one gate_up_proj. */
export function fusedForPhi3(weights: RefTensor[]): RefTensor[] {
  const byName = new Map(weights.map((t) => [t.name, t]));
  const cat = (name: string, parts: RefTensor[]): RefTensor => {
    const data = new Float64Array(parts.reduce((a, t) => a + t.data.length, 0));
    let at = 0;
    for (const t of parts) (data.set(t.data, at), (at += t.data.length));
    return { name, shape: [parts.reduce((a, t) => a + t.shape[0], 0), parts[0].shape[1]], data };
  };
  const out: RefTensor[] = [];
  for (const t of weights) {
    const m = /^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight$/.exec(t.name);
    if (!m) out.push(t);
    else if (m[2] === "self_attn.q_proj")
      out.push(
        cat(
          `${m[1]}.self_attn.qkv_proj.weight`,
          ["q", "k", "v"].map((x) => byName.get(`${m[1]}.self_attn.${x}_proj.weight`)!),
        ),
      );
    else if (m[2] === "mlp.gate_proj")
      out.push(
        cat(
          `${m[1]}.mlp.gate_up_proj.weight`,
          ["gate", "up"].map((x) => byName.get(`${m[1]}.mlp.${x}_proj.weight`)!),
        ),
      );
  }
  return out;
}

export const headDimOf = (s: RandomLlamaShape) => s.headDim ?? s.dim / s.heads;

export const TINY: RandomLlamaShape = {
  dim: 64,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  ffn: 172,
  vocab: 512,
  ctx: 256,
  ropeTheta: 10000,
  tied: true,
  std: 0.1,
  seed: 1,
};
// Grouped-query 4:1 with head_dim 64, an untied LM head and Llama 3's rope_theta.
export const GQA: RandomLlamaShape = {
  dim: 256,
  layers: 2,
  heads: 4,
  kvHeads: 1,
  ffn: 512,
  vocab: 512,
  ctx: 512,
  ropeTheta: 500000,
  tied: false,
  std: 0.08,
  seed: 2,
};

export type WeightDType = "f32" | "f16" | "bf16";

/** A named tensor in HF layout, values in f64 after rounding to the stored dtype. */
export interface RefTensor {
  name: string;
  shape: number[];
  data: Float64Array;
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function normal(rand: () => number): number {
  const u = Math.max(rand(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
}

function roundTo(dtype: WeightDType, v: number): number {
  if (dtype === "f16") return fromF16Bits(toF16Bits(v));
  if (dtype === "bf16") return fromBf16Bits(toBf16Bits(v));
  return Math.fround(v);
}

export function makeWeights(s: RandomLlamaShape, dtype: WeightDType): RefTensor[] {
  const hd = headDimOf(s);
  const plan: [string, number[], "linear" | "norm" | "bias"][] = [
    ["model.embed_tokens.weight", [s.vocab, s.dim], "linear"],
  ];
  const gemma = isGemma(s);
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}`;
    plan.push(
      [`${p}.input_layernorm.weight`, [s.dim], "norm"],
      [`${p}.self_attn.q_proj.weight`, [s.heads * hd, s.dim], "linear"],
      [`${p}.self_attn.k_proj.weight`, [s.kvHeads * hd, s.dim], "linear"],
      [`${p}.self_attn.v_proj.weight`, [s.kvHeads * hd, s.dim], "linear"],
    );
    if (s.arch === "qwen2")
      plan.push(
        [`${p}.self_attn.q_proj.bias`, [s.heads * hd], "bias"],
        [`${p}.self_attn.k_proj.bias`, [s.kvHeads * hd], "bias"],
        [`${p}.self_attn.v_proj.bias`, [s.kvHeads * hd], "bias"],
      );
    if (s.arch === "qwen3" || s.arch === "gemma3")
      plan.push([`${p}.self_attn.q_norm.weight`, [hd], "norm"], [`${p}.self_attn.k_norm.weight`, [hd], "norm"]);
    plan.push(
      [`${p}.self_attn.o_proj.weight`, [s.dim, s.heads * hd], "linear"],
      [`${p}.post_attention_layernorm.weight`, [s.dim], "norm"],
    );
    if (gemma)
      plan.push(
        [`${p}.pre_feedforward_layernorm.weight`, [s.dim], "norm"],
        [`${p}.post_feedforward_layernorm.weight`, [s.dim], "norm"],
      );
    plan.push(
      [`${p}.mlp.gate_proj.weight`, [s.ffn, s.dim], "linear"],
      [`${p}.mlp.up_proj.weight`, [s.ffn, s.dim], "linear"],
      [`${p}.mlp.down_proj.weight`, [s.dim, s.ffn], "linear"],
    );
  }
  plan.push(["model.norm.weight", [s.dim], "norm"]);
  if (!s.tied) plan.push(["lm_head.weight", [s.vocab, s.dim], "linear"]);
  return plan.map(([name, shape, kind], i) => {
    const rand = mulberry32(s.seed * 100003 + i);
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float64Array(n);
    for (let j = 0; j < n; j++)
      data[j] = roundTo(
        dtype,
        // Gemma's norms are x * (1 + w): their w is near 0.
        kind === "norm"
          ? (gemma ? 0 : 1) + 0.1 * normal(rand)
          : kind === "bias"
            ? 0.5 * normal(rand)
            : s.std * normal(rand),
      );
    return { name, shape, data };
  });
}

function tokenizerJson(pieces: string[]): object {
  const vocab: Record<string, number> = {};
  pieces.forEach((p, i) => (vocab[p] = i));
  const merges: [string, string][] = [];
  pieces.forEach((p, id) => {
    if (id < 259) return;
    const chars = Array.from(p);
    for (let k = 1; k < chars.length; k++) {
      const a = chars.slice(0, k).join("");
      const b = chars.slice(k).join("");
      if (a in vocab && b in vocab) merges.push([a, b]);
    }
  });
  const special = (id: number) => ({
    id,
    content: pieces[id],
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0), special(1), special(2)],
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "\u2581" },
        { type: "Replace", pattern: { String: " " }, content: "\u2581" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "\u2581" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

function encodeTensor(data: Float64Array, dtype: WeightDType): Uint8Array {
  if (dtype === "f32") return new Uint8Array(Float32Array.from(data).buffer);
  const out = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = dtype === "f16" ? toF16Bits(data[i]) : toBf16Bits(data[i]);
  return new Uint8Array(out.buffer);
}

export function writeSafetensors(path: string, tensors: RefTensor[], dtype: WeightDType): void {
  const header: Record<string, unknown> = {};
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const t of tensors) {
    const bytes = encodeTensor(t.data, dtype);
    header[t.name] = { dtype: dtype.toUpperCase(), shape: t.shape, data_offsets: [offset, offset + bytes.byteLength] };
    blobs.push(bytes);
    offset += bytes.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, Buffer.from(json), ...blobs]));
}

/** Writes <dir>/hf/ (config, tokenizer, model.safetensors). */
export function writeHfModel(dir: string, s: RandomLlamaShape, dtype: WeightDType, weights: RefTensor[]): string {
  const hf = join(dir, "hf");
  mkdirSync(hf, { recursive: true });
  const hd = headDimOf(s);
  const arch = s.arch ?? "llama";
  const config = {
    architectures: [
      {
        llama: s.slidingWindow ? "MistralForCausalLM" : "LlamaForCausalLM",
        qwen2: "Qwen2ForCausalLM",
        qwen3: "Qwen3ForCausalLM",
        phi3: "Phi3ForCausalLM",
        gemma2: "Gemma2ForCausalLM",
        gemma3: "Gemma3ForCausalLM",
      }[arch],
    ],
    ...(s.slidingWindow ? { sliding_window: s.slidingWindow } : {}),
    ...(s.windowPattern ? { sliding_window_pattern: s.windowPattern } : {}),
    ...(isGemma(s)
      ? {
          hidden_activation: "gelu_pytorch_tanh",
          query_pre_attn_scalar: s.queryPreAttnScalar ?? headDimOf(s),
          attn_logit_softcapping: s.attnSoftcap ?? null,
          final_logit_softcapping: s.finalSoftcap ?? null,
          ...(s.ropeLocalTheta ? { rope_local_base_freq: s.ropeLocalTheta } : {}),
        }
      : {}),
    ...(s.originalCtx ? { original_max_position_embeddings: s.originalCtx } : {}),
    model_type: arch,
    attention_bias: arch === "qwen2",
    hidden_size: s.dim,
    intermediate_size: s.ffn,
    num_hidden_layers: s.layers,
    num_attention_heads: s.heads,
    num_key_value_heads: s.kvHeads,
    head_dim: hd,
    vocab_size: s.vocab,
    max_position_embeddings: s.ctx,
    rms_norm_eps: 1e-5,
    rope_theta: s.ropeTheta,
    rope_scaling: s.ropeScaling ?? null,
    hidden_act: isGemma(s) ? "gelu_pytorch_tanh" : "silu",
    tie_word_embeddings: s.tied,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: { f32: "float32", f16: "float16", bf16: "bfloat16" }[dtype],
  };
  writeFileSync(join(hf, "config.json"), JSON.stringify(config, null, 2));
  writeFileSync(join(hf, "tokenizer.json"), JSON.stringify(tokenizerJson(vocabPieces(s.vocab))));
  writeFileSync(
    join(hf, "tokenizer_config.json"),
    JSON.stringify({
      add_bos_token: true,
      bos_token: "<s>",
      eos_token: "</s>",
      unk_token: "<unk>",
      clean_up_tokenization_spaces: false,
      legacy: true,
    }),
  );
  writeSafetensors(join(hf, "model.safetensors"), arch === "phi3" ? fusedForPhi3(weights) : weights, dtype);
  return hf;
}

// ---- GGUF

const GGUF_NAMES: [RegExp, string][] = [
  [/^model\.embed_tokens\.weight$/, "token_embd.weight"],
  [/^model\.layers\.(\d+)\.input_layernorm\.weight$/, "blk.$1.attn_norm.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$/, "blk.$1.attn_q.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$/, "blk.$1.attn_k.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$/, "blk.$1.attn_v.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$/, "blk.$1.attn_output.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias$/, "blk.$1.attn_$2.bias"],
  [/^model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight$/, "blk.$1.attn_$2_norm.weight"],
  [/^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$/, "blk.$1.attn_qkv.weight"],
  [/^model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight$/, "blk.$1.ffn_up.weight"],
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, "blk.$1.ffn_norm.weight"],
  [/^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/, "blk.$1.ffn_gate.weight"],
  [/^model\.layers\.(\d+)\.mlp\.up_proj\.weight$/, "blk.$1.ffn_up.weight"],
  [/^model\.layers\.(\d+)\.mlp\.down_proj\.weight$/, "blk.$1.ffn_down.weight"],
  [/^model\.norm\.weight$/, "output_norm.weight"],
  [/^lm_head\.weight$/, "output.weight"],
];

/** HF's rotate-half q/k rows to GGUF's interleaved layout, as llama.cpp's converter permutes them. */
function permuteRope(t: RefTensor, heads: number): Float64Array {
  const [rows, cols] = t.shape;
  const hd = rows / heads;
  const out = new Float64Array(t.data.length);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < hd / 2; i++)
      for (let j = 0; j < 2; j++) {
        const dst = h * hd + i * 2 + j;
        const src = h * hd + j * (hd / 2) + i;
        out.set(t.data.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
  return out;
}

export class GgufWriter {
  private parts: Buffer[] = [];
  str(s: string) {
    const b = Buffer.from(s, "utf8");
    this.u64(b.length);
    this.parts.push(b);
  }
  u32(v: number) {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.parts.push(b);
  }
  u64(v: number) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.parts.push(b);
  }
  f32(v: number) {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.parts.push(b);
  }
  i32(v: number) {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v);
    this.parts.push(b);
  }
  kv(key: string, type: "u32" | "f32" | "str" | "bool", v: number | string | boolean) {
    this.str(key);
    if (type === "u32") (this.u32(4), this.u32(v as number));
    else if (type === "f32") (this.u32(6), this.f32(v as number));
    else if (type === "bool") (this.u32(7), this.parts.push(Buffer.of(v ? 1 : 0)));
    else (this.u32(8), this.str(v as string));
  }
  array(key: string, type: "str" | "f32" | "i32", items: (string | number)[]) {
    this.str(key);
    this.u32(9);
    this.u32(type === "str" ? 8 : type === "f32" ? 6 : 5);
    this.u64(items.length);
    for (const it of items) {
      if (type === "str") this.str(it as string);
      else if (type === "f32") this.f32(it as number);
      else this.i32(it as number);
    }
  }
  raw(b: Uint8Array) {
    this.parts.push(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
  }
  get length() {
    return this.parts.reduce((a, b) => a + b.length, 0);
  }
  bytes() {
    return Buffer.concat(this.parts);
  }
}

/** The weights a quantized GGUF really holds, decoded: what a reference forward pass must use. */
export function quantizedWeights(weights: RefTensor[], type: QuantType): RefTensor[] {
  return weights.map((t) =>
    t.shape.length === 1 ? t : { ...t, data: dequantize(type, quantize(type, t.data, t.shape[1])) },
  );
}

// Gemma's norms under GGUF's names (its post_attention_layernorm follows the attention).
const GEMMA_GGUF_NAMES: [RegExp, string][] = [
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, "blk.$1.post_attention_norm.weight"],
  [/^model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight$/, "blk.$1.ffn_norm.weight"],
  [/^model\.layers\.(\d+)\.post_feedforward_layernorm\.weight$/, "blk.$1.post_ffw_norm.weight"],
];

export function writeGguf(
  path: string,
  s: RandomLlamaShape,
  dtype: "f32" | "f16" | QuantType,
  weights: RefTensor[],
): void {
  const pieces = vocabPieces(s.vocab);
  const w = new GgufWriter();
  const arch = s.arch ?? "llama";
  const names = isGemma(s) ? [...GEMMA_GGUF_NAMES, ...GGUF_NAMES] : GGUF_NAMES;
  const tensors = (arch === "phi3" ? fusedForPhi3(weights) : weights).map((t) => {
    const name = names.reduce<string | null>(
      (acc, [re, to]) => acc ?? (re.test(t.name) ? t.name.replace(re, to) : null),
      null,
    )!;
    let data = t.data;
    // llama.cpp's converter folds Gemma's 1 + w into its norm weights.
    if (isGemma(s) && name.endsWith("norm.weight")) data = data.map((v) => v + 1);
    // llama.cpp's converter permutes q/k for Llama only (Qwen keeps HF's order: NEOX RoPE).
    if (arch === "llama" && name.endsWith("attn_q.weight")) data = permuteRope(t, s.heads);
    if (arch === "llama" && name.endsWith("attn_k.weight")) data = permuteRope(t, s.kvHeads);
    // Norm vectors stay f32, as llama.cpp's converter keeps 1-D tensors.
    const tdtype = t.shape.length === 1 ? "f32" : dtype;
    const bytes =
      tdtype === "f32" || tdtype === "f16" ? encodeTensor(data, tdtype) : quantize(tdtype, data, t.shape[1]);
    const typeId = tdtype === "f32" ? 0 : tdtype === "f16" ? 1 : GGML_TYPE_ID[tdtype];
    return { name, dims: [...t.shape].reverse(), typeId, bytes };
  });
  const kvs: [string, "u32" | "f32" | "str" | "bool", number | string | boolean][] = [
    ["general.architecture", "str", arch],
    ["general.alignment", "u32", 32],
    [`${arch}.context_length`, "u32", s.ctx],
    [`${arch}.embedding_length`, "u32", s.dim],
    [`${arch}.feed_forward_length`, "u32", s.ffn],
    [`${arch}.block_count`, "u32", s.layers],
    [`${arch}.attention.head_count`, "u32", s.heads],
    [`${arch}.attention.head_count_kv`, "u32", s.kvHeads],
    [`${arch}.rope.freq_base`, "f32", s.ropeTheta],
    [`${arch}.attention.layer_norm_rms_epsilon`, "f32", 1e-5],
    ["tokenizer.ggml.model", "str", "llama"],
  ];
  if (s.headDim !== undefined)
    kvs.push([`${arch}.attention.key_length`, "u32", s.headDim], [`${arch}.attention.value_length`, "u32", s.headDim]);
  if (s.slidingWindow) kvs.push([`${arch}.attention.sliding_window`, "u32", s.slidingWindow]);
  if (s.attnSoftcap) kvs.push([`${arch}.attn_logit_softcapping`, "f32", s.attnSoftcap]);
  if (s.finalSoftcap) kvs.push([`${arch}.final_logit_softcapping`, "f32", s.finalSoftcap]);
  if (s.ropeLocalTheta) kvs.push([`${arch}.rope.freq_base_swa`, "f32", s.ropeLocalTheta]);
  if (s.addSpacePrefix !== undefined) kvs.push(["tokenizer.ggml.add_space_prefix", "bool", s.addSpacePrefix]);
  const scaling = s.ropeScaling;
  const type = scaling?.rope_type ?? scaling?.type;
  if (type === "llama3") {
    // As llama.cpp's converter: the per-pair divisors of the frequencies, as a tensor.
    const hd = headDimOf(s);
    const base = Float64Array.from({ length: hd / 2 }, (_, i) => 1 / s.ropeTheta ** ((2 * i) / hd));
    const scaled = hfRopeFrequencies(s).invFreq;
    const factors = base.map((f, i) => f / scaled[i]);
    tensors.push({ name: "rope_freqs.weight", dims: [hd / 2], typeId: 0, bytes: encodeTensor(factors, "f32") });
  } else if (type === "longrope") {
    // As llama.cpp's converter for Phi-3: both factor sets as tensors, the original context, the attention factor.
    for (const [which, key] of [
      ["long", "long_factor"],
      ["short", "short_factor"],
    ]) {
      const factors = Float64Array.from(scaling![key] as number[]);
      tensors.push({
        name: `rope_factors_${which}.weight`,
        dims: [factors.length],
        typeId: 0,
        bytes: encodeTensor(factors, "f32"),
      });
    }
    kvs.push(
      [`${arch}.rope.scaling.original_context_length`, "u32", s.originalCtx!],
      [`${arch}.rope.scaling.attn_factor`, "f32", hfRopeFrequencies(s).attnFactor],
    );
  } else if (type === "linear" || type === "yarn") {
    kvs.push(
      [`${arch}.rope.scaling.type`, "str", type],
      [`${arch}.rope.scaling.factor`, "f32", scaling!.factor as number],
    );
    if (scaling!.original_max_position_embeddings !== undefined)
      kvs.push([
        `${arch}.rope.scaling.original_context_length`,
        "u32",
        scaling!.original_max_position_embeddings as number,
      ]);
  } else if (type !== undefined) throw new Error(`GGUF has no RoPE scaling ${String(type)}`);
  w.u32(0x46554747);
  w.u32(3);
  w.u64(tensors.length);
  w.u64(kvs.length + 3);
  for (const [key, t, v] of kvs) w.kv(key, t, v);
  w.array("tokenizer.ggml.tokens", "str", pieces);
  w.array(
    "tokenizer.ggml.scores",
    "f32",
    pieces.map((_, i) => -i),
  );
  w.array(
    "tokenizer.ggml.token_type",
    "i32",
    pieces.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1)),
  );
  let offset = 0;
  for (const t of tensors) {
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.typeId);
    w.u64(offset);
    offset += Math.ceil(t.bytes.byteLength / 32) * 32;
  }
  const pad = (n: number) => new Uint8Array((32 - (n % 32)) % 32);
  w.raw(pad(w.length));
  for (const t of tensors) {
    w.raw(t.bytes);
    w.raw(pad(t.bytes.byteLength));
  }
  writeFileSync(path, w.bytes());
}
