// Turns a model's own description (HF config.json + safetensors, or GGUF metadata)
// into the engine's config and weight manifest. The engine never reads JSON.
import { closeSync, existsSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";
import { DType, Role, type DTypeCode, type NativeModelConfig, type RoleCode, type TensorEntry } from "../ffi/native.ts";
import { ModelLoadError } from "./errors.ts";
import { GGML_TYPES, type GgufFile } from "./gguf.ts";
import {
  ropeFrequencies,
  ropeScalingFromHf,
  scaledMaxPosition,
  SUPPORTED_ROPE_SCALING,
  type RopeScaling,
} from "./rope.ts";
import { readSafetensorsFolder } from "./safetensors.ts";

export interface ModelSpec {
  config: NativeModelConfig; // its RoPE frequencies for a context of maxPosition
  ropeScaling: RopeScaling | null; // to work them out again for the length served (longrope)
  files: string[];
  tensors: TensorEntry[];
  dtype: string; // of the large matrices, e.g. "f32", "f16", "bf16"
  bosTokenId: number | null;
  eosTokenIds: number[];
}

const SUPPORTED_ARCHITECTURES = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
  "Qwen3ForCausalLM",
  "Phi3ForCausalLM",
];
// GGUF's general.architecture; its metadata keys begin with the same name.
const SUPPORTED_GGUF_ARCHITECTURES = ["llama", "qwen2", "qwen3", "phi3"];

// Fused matrices (Phi-3): q, k and v stacked by rows, or the gate over the up projection. Each
// is handed to the engine as its parts, rows of the same bytes in the file.
type Fused = "qkv" | "gate_up";
const HF_FUSED: [RegExp, Fused][] = [
  [/^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$/, "qkv"],
  [/^model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight$/, "gate_up"],
];
const GGUF_FUSED: [RegExp, Fused][] = [
  [/^blk\.(\d+)\.attn_qkv\.weight$/, "qkv"],
  // phi3's ffn_up holds the gate's rows and then the up projection's.
  [/^blk\.(\d+)\.ffn_up\.weight$/, "gate_up"],
];

const HF_ROLES: [RegExp, RoleCode][] = [
  [/^model\.embed_tokens\.weight$/, Role.TOKEN_EMBD],
  [/^model\.layers\.(\d+)\.input_layernorm\.weight$/, Role.ATTN_NORM],
  [/^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$/, Role.ATTN_Q],
  [/^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$/, Role.ATTN_K],
  [/^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$/, Role.ATTN_V],
  [/^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$/, Role.ATTN_OUT],
  [/^model\.layers\.(\d+)\.self_attn\.q_proj\.bias$/, Role.ATTN_Q_BIAS],
  [/^model\.layers\.(\d+)\.self_attn\.k_proj\.bias$/, Role.ATTN_K_BIAS],
  [/^model\.layers\.(\d+)\.self_attn\.v_proj\.bias$/, Role.ATTN_V_BIAS],
  [/^model\.layers\.(\d+)\.self_attn\.q_norm\.weight$/, Role.ATTN_Q_NORM],
  [/^model\.layers\.(\d+)\.self_attn\.k_norm\.weight$/, Role.ATTN_K_NORM],
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, Role.FFN_NORM],
  [/^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/, Role.FFN_GATE],
  [/^model\.layers\.(\d+)\.mlp\.up_proj\.weight$/, Role.FFN_UP],
  [/^model\.layers\.(\d+)\.mlp\.down_proj\.weight$/, Role.FFN_DOWN],
  [/^model\.norm\.weight$/, Role.OUTPUT_NORM],
  [/^lm_head\.weight$/, Role.OUTPUT],
];
// Buffers some exporters keep that carry no weights.
const HF_IGNORED = /\.rotary_emb\.inv_freq$/;

const GGUF_ROLES: [RegExp, RoleCode][] = [
  [/^token_embd\.weight$/, Role.TOKEN_EMBD],
  [/^blk\.(\d+)\.attn_norm\.weight$/, Role.ATTN_NORM],
  [/^blk\.(\d+)\.attn_q\.weight$/, Role.ATTN_Q],
  [/^blk\.(\d+)\.attn_k\.weight$/, Role.ATTN_K],
  [/^blk\.(\d+)\.attn_v\.weight$/, Role.ATTN_V],
  [/^blk\.(\d+)\.attn_output\.weight$/, Role.ATTN_OUT],
  [/^blk\.(\d+)\.attn_q\.bias$/, Role.ATTN_Q_BIAS],
  [/^blk\.(\d+)\.attn_k\.bias$/, Role.ATTN_K_BIAS],
  [/^blk\.(\d+)\.attn_v\.bias$/, Role.ATTN_V_BIAS],
  [/^blk\.(\d+)\.attn_q_norm\.weight$/, Role.ATTN_Q_NORM],
  [/^blk\.(\d+)\.attn_k_norm\.weight$/, Role.ATTN_K_NORM],
  [/^blk\.(\d+)\.ffn_norm\.weight$/, Role.FFN_NORM],
  [/^blk\.(\d+)\.ffn_gate\.weight$/, Role.FFN_GATE],
  [/^blk\.(\d+)\.ffn_up\.weight$/, Role.FFN_UP],
  [/^blk\.(\d+)\.ffn_down\.weight$/, Role.FFN_DOWN],
  [/^output_norm\.weight$/, Role.OUTPUT_NORM],
  [/^output\.weight$/, Role.OUTPUT],
];

const SAFETENSORS_DTYPES: Record<string, DTypeCode> = { F32: DType.F32, F16: DType.F16, BF16: DType.BF16 };
const DTYPE_NAMES: Record<number, string> = {
  [DType.F32]: "f32",
  [DType.F16]: "f16",
  [DType.BF16]: "bf16",
  [DType.Q8_0]: "q8_0",
  [DType.Q4_0]: "q4_0",
  [DType.Q4_K]: "q4_k",
  [DType.Q6_K]: "q6_k",
  [DType.Q5_0]: "q5_0",
  [DType.Q3_K]: "q3_k",
  [DType.IQ4_NL]: "iq4_nl",
};
// GGML type ids are the engine's dtype codes; these are the ones it computes with.
const GGUF_DTYPES: Record<number, DTypeCode> = {
  0: DType.F32,
  1: DType.F16,
  2: DType.Q4_0,
  8: DType.Q8_0,
  12: DType.Q4_K,
  14: DType.Q6_K,
  6: DType.Q5_0,
  11: DType.Q3_K,
  20: DType.IQ4_NL,
  30: DType.BF16,
};
const SUPPORTED_GGUF_TYPES = "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K, Q5_0, Q3_K, IQ4_NL";

/** A fused tensor's parts, each a run of its rows (the file's bytes are not touched). */
function splitFused(t: TensorEntry, kind: Fused, c: NativeModelConfig, where: string): TensorEntry[] {
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const parts: [RoleCode, number][] =
    kind === "qkv"
      ? [
          [Role.ATTN_Q, qDim],
          [Role.ATTN_K, kvDim],
          [Role.ATTN_V, kvDim],
        ]
      : [
          [Role.FFN_GATE, c.intermediateSize],
          [Role.FFN_UP, c.intermediateSize],
        ];
  const rows = parts.reduce((a, [, r]) => a + r, 0);
  if (t.rows !== rows)
    throw new ModelLoadError(`${where}: tensor ${t.name} has ${t.rows} rows but the config needs ${rows} (${kind})`);
  const rowBytes = t.sizeBytes / t.rows;
  let row = 0;
  return parts.map(([role, n]) => {
    const part = { ...t, role, rows: n, offset: t.offset + row * rowBytes, sizeBytes: n * rowBytes };
    row += n;
    return part;
  });
}

/** Each fused tensor in its parts, now that the config gives their sizes. */
function unfuse(tensors: (TensorEntry & { fused?: Fused })[], c: NativeModelConfig, where: string): TensorEntry[] {
  return tensors.flatMap(({ fused, ...t }) => (fused ? splitFused(t, fused, c, where) : [t]));
}

function fusedOf(table: [RegExp, Fused][], name: string): { fused: Fused; layer: number } | null {
  for (const [re, fused] of table) {
    const m = re.exec(name);
    if (m) return { fused, layer: Number(m[1]) };
  }
  return null;
}

function roleOf(table: [RegExp, RoleCode][], name: string): { role: RoleCode; layer: number } | null {
  for (const [re, role] of table) {
    const m = re.exec(name);
    if (m) return { role, layer: m[1] === undefined ? 0 : Number(m[1]) };
  }
  return null;
}

function positiveInt(value: unknown, key: string, where: string): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value <= 0) {
    throw new ModelLoadError(`${where}: ${key} must be a positive integer, got ${JSON.stringify(value)}`);
  }
  return value;
}

function dominantDtype(tensors: TensorEntry[]): string {
  const big = tensors.reduce((a, b) => (b.sizeBytes > a.sizeBytes ? b : a), tensors[0]);
  return DTYPE_NAMES[big.dtype] ?? "unknown";
}

function idList(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number");
  return [];
}

export function specFromHfFolder(dir: string): ModelSpec {
  const configPath = join(dir, "config.json");
  if (!existsSync(configPath))
    throw new ModelLoadError(`${dir}: no config.json (is this a Hugging Face model folder?)`);
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(readFileSync(configPath, "utf8")) as Record<string, unknown>;
  } catch {
    throw new ModelLoadError(`${configPath}: not valid JSON`);
  }
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as string[]) : [];
  if (!archs.some((a) => SUPPORTED_ARCHITECTURES.includes(a))) {
    throw new ModelLoadError(
      `${dir}: architecture ${archs.join(", ") || String(cfg.model_type)} is not supported (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`,
    );
  }
  // Attention biases come as tensors (Qwen 2's q/k/v); one the engine has no role for is refused by name.
  if (cfg.mlp_bias === true) throw new ModelLoadError(`${dir}: MLP biases are not supported`);
  if (cfg.hidden_act !== undefined && cfg.hidden_act !== "silu")
    throw new ModelLoadError(`${dir}: hidden_act ${String(cfg.hidden_act)} is not supported (silu is)`);
  const where = "config.json";
  const hidden = positiveInt(cfg.hidden_size, "hidden_size", where);
  const heads = positiveInt(cfg.num_attention_heads, "num_attention_heads", where);
  const kvHeads =
    cfg.num_key_value_heads === undefined || cfg.num_key_value_heads === null
      ? heads
      : positiveInt(cfg.num_key_value_heads, "num_key_value_heads", where);
  const headDim =
    cfg.head_dim === undefined || cfg.head_dim === null ? hidden / heads : positiveInt(cfg.head_dim, "head_dim", where);
  const trained = positiveInt(cfg.max_position_embeddings, "max_position_embeddings", where);
  const scaling = ropeScalingFromHf(cfg.rope_scaling, trained, dir, cfg.original_max_position_embeddings);
  let maxPosition = scaledMaxPosition(trained, scaling);
  // Sliding-window attention equals full attention while the context stays inside the window
  // (Qwen 2 keeps a window in its config that `use_sliding_window: false` turns off).
  if (typeof cfg.sliding_window === "number" && cfg.sliding_window > 0 && cfg.use_sliding_window !== false)
    maxPosition = Math.min(maxPosition, cfg.sliding_window);

  const stored = readSafetensorsFolder(dir);
  const files = [...new Set(stored.map((t) => t.file))];
  if (typeof cfg.partial_rotary_factor === "number" && cfg.partial_rotary_factor !== 1)
    throw new ModelLoadError(`${dir}: partial_rotary_factor ${cfg.partial_rotary_factor} is not supported (1 is)`);
  const tensors: (TensorEntry & { fused?: Fused })[] = [];
  for (const t of stored) {
    if (HF_IGNORED.test(t.name)) continue;
    const fused = fusedOf(HF_FUSED, t.name);
    const r = fused ? { role: Role.ATTN_Q, layer: fused.layer } : roleOf(HF_ROLES, t.name);
    if (!r) throw new ModelLoadError(`${dir}: tensor ${t.name} is not part of the architectures this engine runs`);
    const dtype = SAFETENSORS_DTYPES[t.dtype];
    if (dtype === undefined)
      throw new ModelLoadError(
        `${dir}: tensor ${t.name} has dtype ${t.dtype}, which is not supported (supported: F32, F16, BF16)`,
      );
    const [rows, cols] =
      t.shape.length === 1 ? [1, t.shape[0]] : t.shape.length === 2 ? [t.shape[0], t.shape[1]] : [-1, -1];
    if (rows < 0) throw new ModelLoadError(`${dir}: tensor ${t.name} has ${t.shape.length} dimensions`);
    tensors.push({
      name: t.name,
      role: r.role,
      layer: r.layer,
      dtype,
      fileIndex: files.indexOf(t.file),
      offset: t.offset,
      sizeBytes: t.sizeBytes,
      rows,
      cols,
      fused: fused?.fused,
    });
  }
  const config: NativeModelConfig = {
    vocabSize: positiveInt(cfg.vocab_size, "vocab_size", where),
    hiddenSize: hidden,
    intermediateSize: positiveInt(cfg.intermediate_size, "intermediate_size", where),
    numLayers: positiveInt(cfg.num_hidden_layers, "num_hidden_layers", where),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    maxPosition,
    ropeTheta: typeof cfg.rope_theta === "number" ? cfg.rope_theta : 10000,
    rmsNormEps: typeof cfg.rms_norm_eps === "number" ? cfg.rms_norm_eps : 1e-6,
    ropeInterleaved: false,
    tieWordEmbeddings: cfg.tie_word_embeddings === true || !tensors.some((t) => t.role === Role.OUTPUT),
  };
  withRope(config, scaling);
  if (!Number.isInteger(headDim))
    throw new ModelLoadError(`${dir}: hidden_size ${hidden} is not divisible by num_attention_heads ${heads}`);
  const parts = unfuse(tensors, config, dir);
  checkTensorShapes(dir, config, parts);
  let generation: Record<string, unknown> = {};
  const genPath = join(dir, "generation_config.json");
  if (existsSync(genPath)) {
    try {
      generation = JSON.parse(readFileSync(genPath, "utf8")) as Record<string, unknown>;
    } catch {
      // A broken generation_config.json only loses default stop ids.
    }
  }
  const eos = [...new Set([...idList(cfg.eos_token_id), ...idList(generation.eos_token_id)])];
  return {
    config,
    ropeScaling: scaling,
    files,
    tensors: parts,
    dtype: dominantDtype(parts),
    bosTokenId: typeof cfg.bos_token_id === "number" ? cfg.bos_token_id : null,
    eosTokenIds: eos,
  };
}

function metaNumber(g: GgufFile, key: string): number | undefined {
  const v = g.metadata.get(key);
  if (typeof v === "number") return v;
  if (typeof v === "bigint") return Number(v);
  return undefined;
}

export function specFromGguf(g: GgufFile): ModelSpec {
  const where = g.path;
  const arch = g.metadata.get("general.architecture");
  if (typeof arch !== "string" || !SUPPORTED_GGUF_ARCHITECTURES.includes(arch))
    throw new ModelLoadError(
      `${where}: architecture ${String(arch)} is not supported (supported: ${SUPPORTED_GGUF_ARCHITECTURES.join(", ")})`,
    );
  const need = (key: string) => {
    const v = metaNumber(g, `${arch}.${key}`);
    if (v === undefined) throw new ModelLoadError(`${where}: metadata ${arch}.${key} is missing`);
    return positiveInt(v, `${arch}.${key}`, where);
  };
  const hidden = need("embedding_length");
  const heads = need("attention.head_count");
  const tokens = g.metadata.get("tokenizer.ggml.tokens");
  const vocab = metaNumber(g, `${arch}.vocab_size`) ?? (Array.isArray(tokens) ? tokens.length : undefined);
  if (vocab === undefined)
    throw new ModelLoadError(`${where}: neither ${arch}.vocab_size nor tokenizer.ggml.tokens is present`);
  const ropeFactors: Record<string, Float64Array> = {};
  const tensors: (TensorEntry & { fused?: Fused })[] = [];
  for (const t of g.tensors) {
    const factors = /^rope_(freqs|factors_long|factors_short)\.weight$/.exec(t.name);
    if (factors) {
      ropeFactors[factors[1]] = readRopeFreqs(g, t);
      continue;
    }
    const fused = arch === "phi3" ? fusedOf(GGUF_FUSED, t.name) : null;
    const r = fused ? { role: Role.ATTN_Q, layer: fused.layer } : roleOf(GGUF_ROLES, t.name);
    if (!r) throw new ModelLoadError(`${where}: tensor ${t.name} is not part of the architectures this engine runs`);
    const dtype = GGUF_DTYPES[t.type];
    if (dtype === undefined) {
      const typeName = GGML_TYPES[t.type]?.name ?? `type ${t.type}`;
      throw new ModelLoadError(
        `${where}: tensor ${t.name} is ${typeName}, which is not supported yet (supported: ${SUPPORTED_GGUF_TYPES})`,
      );
    }
    if (t.dims.length > 2) throw new ModelLoadError(`${where}: tensor ${t.name} has ${t.dims.length} dimensions`);
    const cols = t.dims[0];
    const rows = t.dims.length === 2 ? t.dims[1] : 1;
    tensors.push({
      name: t.name,
      role: r.role,
      layer: r.layer,
      dtype,
      fileIndex: 0,
      offset: t.offset,
      sizeBytes: t.sizeBytes,
      rows,
      cols,
      fused: fused?.fused,
    });
  }
  const config: NativeModelConfig = {
    vocabSize: vocab,
    hiddenSize: hidden,
    intermediateSize: need("feed_forward_length"),
    numLayers: need("block_count"),
    numHeads: heads,
    numKvHeads: metaNumber(g, `${arch}.attention.head_count_kv`) ?? heads,
    headDim: metaNumber(g, `${arch}.attention.key_length`) ?? hidden / heads,
    maxPosition: need("context_length"),
    ropeTheta: metaNumber(g, `${arch}.rope.freq_base`) ?? 10000,
    rmsNormEps: metaNumber(g, `${arch}.attention.layer_norm_rms_epsilon`) ?? 1e-5,
    // llama.cpp's converter permutes Llama's q/k rows into Meta's interleaved RoPE layout; Qwen's
    // keep HF's order (NEOX RoPE).
    ropeInterleaved: arch === "llama",
    tieWordEmbeddings: !tensors.some((t) => t.role === Role.OUTPUT),
  };
  const scaling = ropeScalingFromGguf(g, arch, config.maxPosition, ropeFactors);
  config.maxPosition = scaledMaxPosition(config.maxPosition, scaling);
  withRope(config, scaling);
  if (!Number.isInteger(config.headDim))
    throw new ModelLoadError(`${where}: embedding_length ${hidden} is not divisible by head_count ${heads}`);
  const parts = unfuse(tensors, config, where);
  checkTensorShapes(where, config, parts);
  const eos = metaNumber(g, "tokenizer.ggml.eos_token_id");
  const eot = metaNumber(g, "tokenizer.ggml.eot_token_id");
  return {
    config,
    ropeScaling: scaling,
    files: [g.path],
    tensors: parts,
    dtype: dominantDtype(parts),
    bosTokenId: metaNumber(g, "tokenizer.ggml.bos_token_id") ?? null,
    eosTokenIds: [...new Set([eos, eot].filter((x): x is number => x !== undefined))],
  };
}

/** The frequencies a scaling gives for a context length, into the engine's config (head_dim must be known). */
export function withRope(
  config: NativeModelConfig,
  scaling: RopeScaling | null,
  contextLen = config.maxPosition,
): void {
  const { invFreq, attnFactor } = ropeFrequencies(config.ropeTheta, config.headDim, scaling, contextLen);
  if (invFreq && (invFreq.length !== config.headDim / 2 || !invFreq.every((f) => f > 0 && Number.isFinite(f))))
    throw new ModelLoadError(
      `RoPE scaling gives ${invFreq.length} frequencies (all positive and finite?); head_dim ${config.headDim} needs ${config.headDim / 2}`,
    );
  config.ropeInvFreq = invFreq;
  config.ropeAttnFactor = attnFactor;
}

/** GGUF's rope_freqs (Llama 3.1) or rope_factors_long/short (Phi-3) tensor: per-pair divisors of the frequencies, in f32. */
function readRopeFreqs(g: GgufFile, t: GgufFile["tensors"][number]): Float64Array {
  if (t.type !== 0) throw new ModelLoadError(`${g.path}: ${t.name} is not F32`);
  const bytes = Buffer.alloc(Number(t.sizeBytes));
  const fd = openSync(g.path, "r");
  try {
    readSync(fd, bytes, 0, bytes.length, t.offset);
  } finally {
    closeSync(fd);
  }
  return Float64Array.from(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4));
}

/** GGUF's RoPE scaling keys (and rope_freqs tensor), as config.json's would say it. */
function ropeScalingFromGguf(
  g: GgufFile,
  arch: string,
  maxPosition: number,
  factors: Record<string, Float64Array>,
): RopeScaling | null {
  const type = g.metadata.get(`${arch}.rope.scaling.type`);
  const factor = metaNumber(g, `${arch}.rope.scaling.factor`);
  const original = metaNumber(g, `${arch}.rope.scaling.original_context_length`) ?? maxPosition;
  const ropeFreqs = factors.freqs ?? null;
  if (factors.factors_long && factors.factors_short) {
    // Phi-3's LongRoPE: llama.cpp's converter writes both factor sets and the attention factor.
    return {
      type: "longrope",
      long: factors.factors_long,
      short: factors.factors_short,
      originalMaxPosition: original,
      maxPosition,
      attnFactor: metaNumber(g, `${arch}.rope.scaling.attn_factor`) ?? null,
    };
  }
  if (type === undefined || type === "none") {
    if (ropeFreqs === null) return null;
    return { type: "factors", factors: ropeFreqs };
  }
  if (ropeFreqs !== null) throw new ModelLoadError(`${g.path}: both rope_freqs and RoPE scaling ${String(type)}`);
  if (factor === undefined || !(factor > 0))
    throw new ModelLoadError(`${g.path}: RoPE scaling ${String(type)} without ${arch}.rope.scaling.factor`);
  if (type === "linear") return { type, factor };
  if (type === "yarn") {
    // llama.cpp scales its attention factor by YaRN's own 0.1 ln(factor) + 1.
    const attn = metaNumber(g, `${arch}.rope.scaling.attn_factor`) ?? 1;
    return {
      type,
      factor,
      originalMaxPosition: original,
      betaFast: metaNumber(g, `${arch}.rope.scaling.yarn_beta_fast`) ?? 32,
      betaSlow: metaNumber(g, `${arch}.rope.scaling.yarn_beta_slow`) ?? 1,
      attnFactor: attn * (factor <= 1 ? 1 : 0.1 * Math.log(factor) + 1),
      truncate: true,
    };
  }
  throw new ModelLoadError(
    `${g.path}: RoPE scaling ${String(type)} is not supported (supported: ${SUPPORTED_ROPE_SCALING})`,
  );
}

/** The same checks the engine makes, here with the tensor's own name in the message. */
function checkTensorShapes(where: string, c: NativeModelConfig, tensors: TensorEntry[]): void {
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const expected: Record<number, [number, number]> = {
    [Role.TOKEN_EMBD]: [c.vocabSize, c.hiddenSize],
    [Role.OUTPUT]: [c.vocabSize, c.hiddenSize],
    [Role.ATTN_NORM]: [1, c.hiddenSize],
    [Role.FFN_NORM]: [1, c.hiddenSize],
    [Role.OUTPUT_NORM]: [1, c.hiddenSize],
    [Role.ATTN_Q]: [qDim, c.hiddenSize],
    [Role.ATTN_K]: [kvDim, c.hiddenSize],
    [Role.ATTN_V]: [kvDim, c.hiddenSize],
    [Role.ATTN_OUT]: [c.hiddenSize, qDim],
    [Role.FFN_GATE]: [c.intermediateSize, c.hiddenSize],
    [Role.FFN_UP]: [c.intermediateSize, c.hiddenSize],
    [Role.FFN_DOWN]: [c.hiddenSize, c.intermediateSize],
    [Role.ATTN_Q_BIAS]: [1, qDim],
    [Role.ATTN_K_BIAS]: [1, kvDim],
    [Role.ATTN_V_BIAS]: [1, kvDim],
    [Role.ATTN_Q_NORM]: [1, c.headDim],
    [Role.ATTN_K_NORM]: [1, c.headDim],
  };
  for (const t of tensors) {
    const [rows, cols] = expected[t.role];
    if (t.rows !== rows || t.cols !== cols) {
      throw new ModelLoadError(
        `${where}: tensor ${t.name} has shape (${t.rows}, ${t.cols}) but the config needs (${rows}, ${cols})`,
      );
    }
    if (t.layer >= c.numLayers)
      throw new ModelLoadError(`${where}: tensor ${t.name} is for layer ${t.layer} but the model has ${c.numLayers}`);
  }
}
