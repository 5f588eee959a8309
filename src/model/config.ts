// Turns a model's own description (HF config.json + safetensors, or GGUF metadata)
// into the engine's config and weight manifest. The engine never reads JSON.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import {
  DType,
  DUMMY_FILE,
  Role,
  type DTypeCode,
  type NativeModelConfig,
  type RoleCode,
  type TensorEntry,
} from "../ffi/native.ts";
import { ModelLoadError } from "./errors.ts";
import { GGML_TYPES, readTensorBytes, type GgufFile } from "./gguf.ts";
import {
  ropeFrequencies,
  ropeScalingFromHf,
  scaledMaxPosition,
  SUPPORTED_ROPE_SCALING,
  type RopeScaling,
} from "./rope.ts";
import { readSafetensorsFolder, type StoredTensor } from "./safetensors.ts";

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
  "Gemma2ForCausalLM",
  "Gemma3ForCausalLM",
  "Gemma3ForConditionalGeneration", // its text model
];
// GGUF's general.architecture; its metadata keys begin with the same name.
const SUPPORTED_GGUF_ARCHITECTURES = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

// Gemma's four norms a layer: its post_attention_layernorm follows the attention (Llama's
// precedes the MLP), and pre_feedforward_layernorm precedes the MLP.
const GEMMA_HF_ROLES: [RegExp, RoleCode][] = [
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, Role.ATTN_POST_NORM],
  [/^model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight$/, Role.FFN_NORM],
  [/^model\.layers\.(\d+)\.post_feedforward_layernorm\.weight$/, Role.FFN_POST_NORM],
];

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
  [/^blk\.(\d+)\.post_attention_norm\.weight$/, Role.ATTN_POST_NORM],
  [/^blk\.(\d+)\.post_ffw_norm\.weight$/, Role.FFN_POST_NORM],
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
  [DType.Q4_1]: "q4_1",
  [DType.Q5_1]: "q5_1",
  [DType.Q4_K]: "q4_k",
  [DType.Q5_K]: "q5_k",
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
  3: DType.Q4_1,
  7: DType.Q5_1,
  8: DType.Q8_0,
  12: DType.Q4_K,
  13: DType.Q5_K,
  14: DType.Q6_K,
  6: DType.Q5_0,
  11: DType.Q3_K,
  20: DType.IQ4_NL,
  30: DType.BF16,
};
const SUPPORTED_GGUF_TYPES = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q3_K, IQ4_NL";

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

// transformers' Gemma3TextConfig defaults: a multimodal checkpoint's text_config leaves them out.
const GEMMA3_TEXT_DEFAULTS = {
  vocab_size: 262208,
  hidden_size: 2304,
  intermediate_size: 9216,
  num_hidden_layers: 26,
  num_attention_heads: 8,
  num_key_value_heads: 4,
  head_dim: 256,
  hidden_activation: "gelu_pytorch_tanh",
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-6,
  rope_theta: 1_000_000,
  rope_local_base_freq: 10000,
  query_pre_attn_scalar: 256,
  sliding_window: 4096,
  sliding_window_pattern: 6,
  tie_word_embeddings: true,
};

/**
 * The text model of a checkpoint: itself, or the language model of Gemma 3's multimodal one
 * (its text_config, and its language_model tensors under the text model's names; the vision
 * tower and projector are left out: this server takes text).
 */
function textModelOf(cfg: Record<string, unknown>): {
  cfg: Record<string, unknown>;
  tensorName: (name: string) => string | null;
} {
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as string[]) : [];
  if (!archs.includes("Gemma3ForConditionalGeneration")) return { cfg, tensorName: (n) => n };
  const textCfg = (cfg.text_config ?? {}) as Record<string, unknown>;
  return {
    cfg: {
      ...GEMMA3_TEXT_DEFAULTS,
      ...textCfg,
      architectures: ["Gemma3ForCausalLM"],
      eos_token_id: cfg.eos_token_id ?? textCfg.eos_token_id,
      bos_token_id: cfg.bos_token_id ?? textCfg.bos_token_id,
    },
    tensorName: (n) => {
      // transformers before 4.52 saved language_model.model.*; later ones model.language_model.*.
      const m = /^(?:language_model\.model|model\.language_model)\.(.*)$/.exec(n);
      if (m) return `model.${m[1]}`;
      if (n === "language_model.lm_head.weight" || n === "lm_head.weight") return "lm_head.weight";
      return null; // vision tower, projector
    },
  };
}

/** A Hugging Face folder's config.json, parsed. */
export function readHfConfig(dir: string): Record<string, unknown> {
  const configPath = join(dir, "config.json");
  if (!existsSync(configPath))
    throw new ModelLoadError(`${dir}: no config.json (is this a Hugging Face model folder?)`);
  try {
    return JSON.parse(readFileSync(configPath, "utf8")) as Record<string, unknown>;
  } catch {
    throw new ModelLoadError(`${configPath}: not valid JSON`);
  }
}

export function specFromHfFolder(dir: string): ModelSpec {
  const stored = readSafetensorsFolder(dir);
  return specFromHfConfig(readHfConfig(dir), dir, stored, [...new Set(stored.map((t) => t.file))]);
}

/**
 * The spec of a config.json and its tensors as stored: `files` the files they are in (a tensor
 * whose file is not among them is made up by the engine: --load-format dummy).
 */
export function specFromHfConfig(
  cfg: Record<string, unknown>,
  dir: string,
  stored: StoredTensor[],
  files: string[],
): ModelSpec {
  const text = textModelOf(cfg);
  cfg = text.cfg;
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as string[]) : [];
  if (!archs.some((a) => SUPPORTED_ARCHITECTURES.includes(a))) {
    throw new ModelLoadError(
      `${dir}: architecture ${archs.join(", ") || String(cfg.model_type)} is not supported (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`,
    );
  }
  // Attention biases come as tensors (Qwen 2's q/k/v); one the engine has no role for is refused by name.
  if (cfg.mlp_bias === true) throw new ModelLoadError(`${dir}: MLP biases are not supported`);
  const gemma = archs.some((a) => a.startsWith("Gemma"));
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
  const maxPosition = scaledMaxPosition(trained, scaling);

  if (typeof cfg.partial_rotary_factor === "number" && cfg.partial_rotary_factor !== 1)
    throw new ModelLoadError(`${dir}: partial_rotary_factor ${cfg.partial_rotary_factor} is not supported (1 is)`);
  const tensors: (TensorEntry & { fused?: Fused })[] = [];
  for (const stored_ of stored) {
    const name = text.tensorName(stored_.name);
    if (name === null || HF_IGNORED.test(name)) continue;
    const t = { ...stored_, name };
    const fused = fusedOf(HF_FUSED, t.name);
    const r = fused
      ? { role: Role.ATTN_Q, layer: fused.layer }
      : ((gemma ? roleOf(GEMMA_HF_ROLES, t.name) : null) ?? roleOf(HF_ROLES, t.name));
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
      fileIndex: files.includes(t.file) ? files.indexOf(t.file) : DUMMY_FILE,
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
    ...hfAttentionParts(cfg, dir, gemma, headDim),
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

const positiveOr = (v: unknown, fallback: number) => (typeof v === "number" && v > 0 ? v : fallback);

/**
 * config.json's activation, sliding window and Gemma's parts. A window the config turns off
 * (Qwen 2's `use_sliding_window: false`) is none; Gemma 2's layers alternate local and global,
 * Gemma 3's are five local to one global (or as `layer_types` lists them).
 */
function hfAttentionParts(
  cfg: Record<string, unknown>,
  dir: string,
  gemma: boolean,
  headDim: number,
): Partial<NativeModelConfig> {
  const act = cfg.hidden_activation ?? cfg.hidden_act ?? "silu";
  if (act !== "silu" && act !== "gelu_pytorch_tanh")
    throw new ModelLoadError(`${dir}: hidden_act ${String(act)} is not supported (silu, gelu_pytorch_tanh are)`);
  const window = typeof cfg.sliding_window === "number" && cfg.use_sliding_window !== false ? cfg.sliding_window : 0;
  const parts: Partial<NativeModelConfig> = {
    hiddenAct: act === "silu" ? "silu" : "gelu_tanh",
    slidingWindow: window,
    slidingWindowPattern: window > 0 ? windowPattern(cfg, dir) : 0,
  };
  if (!gemma) return parts;
  const hidden = cfg.hidden_size as number;
  return {
    ...parts,
    normWeightOffset: 1,
    embeddingScale: Math.sqrt(hidden),
    attnScale: 1 / Math.sqrt(positiveOr(cfg.query_pre_attn_scalar, headDim)),
    attnSoftcap: positiveOr(cfg.attn_logit_softcapping, 0),
    finalSoftcap: positiveOr(cfg.final_logit_softcapping, 0),
    ropeLocalTheta: positiveOr(cfg.rope_local_base_freq, 0),
  };
}

/** Which layers are local: every one (0), or all but each n-th (n). */
function windowPattern(cfg: Record<string, unknown>, dir: string): number {
  const types = cfg.layer_types;
  if (Array.isArray(types)) {
    const n = types.indexOf("full_attention") + 1;
    if (n === 0) return 0;
    const periodic = types.every((t, l) => (t === "full_attention") === ((l + 1) % n === 0));
    if (!periodic) throw new ModelLoadError(`${dir}: layer_types ${JSON.stringify(types)} is not a repeating pattern`);
    return n;
  }
  const archs = (cfg.architectures as string[]) ?? [];
  if (archs.includes("Gemma2ForCausalLM")) return 2;
  if (archs.includes("Gemma3ForCausalLM")) return positiveOr(cfg.sliding_window_pattern, 6);
  return 0;
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
  Object.assign(config, ggufAttentionParts(g, arch, config));
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

/**
 * GGUF's sliding window and Gemma's parts. Gemma's norms come with the +1 folded in by
 * llama.cpp's converter; the attention scale is llama.cpp's (hidden / heads for the 27B
 * models, which it tells by their layer count, else head_dim), as GGUF does not record it.
 */
function ggufAttentionParts(g: GgufFile, arch: string, c: NativeModelConfig): Partial<NativeModelConfig> {
  const window = metaNumber(g, `${arch}.attention.sliding_window`) ?? 0;
  const pattern = { gemma2: 2, gemma3: 6 }[arch] ?? 0;
  const parts: Partial<NativeModelConfig> = { slidingWindow: window, slidingWindowPattern: window > 0 ? pattern : 0 };
  if (!arch.startsWith("gemma")) return parts;
  const big = (arch === "gemma2" && c.numLayers === 46) || (arch === "gemma3" && c.numLayers === 62);
  return {
    ...parts,
    hiddenAct: "gelu_tanh",
    embeddingScale: Math.sqrt(c.hiddenSize),
    attnScale: 1 / Math.sqrt(big ? c.hiddenSize / c.numHeads : c.headDim),
    attnSoftcap: metaNumber(g, `${arch}.attn_logit_softcapping`) ?? 0,
    finalSoftcap: metaNumber(g, `${arch}.final_logit_softcapping`) ?? 0,
    ropeLocalTheta: arch === "gemma3" ? (metaNumber(g, `${arch}.rope.freq_base_swa`) ?? 10000) : 0,
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
  const bytes = readTensorBytes(g.path, t);
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
    [Role.ATTN_POST_NORM]: [1, c.hiddenSize],
    [Role.FFN_POST_NORM]: [1, c.hiddenSize],
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
