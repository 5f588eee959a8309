// The only importer of bun:ffi. One raw dlopen table, wrapped by NativeEngine,
// which turns status codes into errors and never hands a raw pointer upward.
import { dlopen, FFIType, JSCallback, ptr, read, toArrayBuffer, type Pointer } from "bun:ffi";
import { existsSync, readdirSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { cpuFlags, pickLevel } from "./cpu_levels.ts";

export const ABI_VERSION = 5;
export const TOP_LOGPROBS_MAX = 20;
/** A tensor's file index meaning "no file: the engine makes random values of its shape" (IFN_FILE_DUMMY). */
export const DUMMY_FILE = 0xffffffff;
export const LOGIT_BIAS_MAX = 1024;

export const Status = {
  OK: 0,
  INVALID_ARGUMENT: 1,
  OUT_OF_MEMORY: 2,
  IO: 3,
  UNSUPPORTED: 4,
  SHAPE: 5,
  POOL_EXHAUSTED: 6,
  BUSY: 7,
  INTERNAL: 8,
} as const;

export const DType = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q5_0: 6,
  Q5_1: 7,
  Q8_0: 8,
  Q3_K: 11,
  Q4_K: 12,
  Q5_K: 13,
  Q6_K: 14,
  IQ4_NL: 20,
  BF16: 30,
} as const;
export type DTypeCode = (typeof DType)[keyof typeof DType];

export const Role = {
  TOKEN_EMBD: 0,
  ATTN_NORM: 1,
  ATTN_Q: 2,
  ATTN_K: 3,
  ATTN_V: 4,
  ATTN_OUT: 5,
  FFN_NORM: 6,
  FFN_GATE: 7,
  FFN_UP: 8,
  FFN_DOWN: 9,
  OUTPUT_NORM: 10,
  OUTPUT: 11,
  ATTN_Q_BIAS: 12,
  ATTN_K_BIAS: 13,
  ATTN_V_BIAS: 14,
  ATTN_Q_NORM: 15,
  ATTN_K_NORM: 16,
  ATTN_POST_NORM: 17,
  FFN_POST_NORM: 18,
} as const;
export type RoleCode = (typeof Role)[keyof typeof Role];

/** Mirrors ifn_model_config. */
export interface NativeModelConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  maxPosition: number;
  ropeTheta: number;
  rmsNormEps: number;
  ropeInterleaved: boolean;
  tieWordEmbeddings: boolean;
  /** RoPE scaling, worked out in src/model/rope.ts: head_dim / 2 frequencies (null: theta's own). */
  ropeInvFreq?: Float64Array | null;
  ropeAttnFactor?: number; // multiplies cos and sin (YaRN); 1 when absent
  // Gemma's parts (and sliding windows); absent: as Llama.
  normWeightOffset?: number; // added to every RMSNorm weight (HF Gemma's x * (1 + w))
  embeddingScale?: number; // multiplies the embeddings
  hiddenAct?: "silu" | "gelu_tanh";
  attnScale?: number; // multiplies q . k (default 1 / sqrt(head_dim))
  attnSoftcap?: number;
  finalSoftcap?: number;
  slidingWindow?: number; // a local layer attends to this many positions, its own included
  slidingWindowPattern?: number; // 0: every layer local; n: layer l global when (l + 1) % n == 0
  ropeLocalTheta?: number; // local layers' RoPE base (Gemma 3)
}

/** Which library runs the engine: libinferneo.so (CPU) or libinferneo_cuda.so. */
export type Device = "cpu" | "cuda";

/** Mirrors ifn_engine_config (with its ifn_cpu_options and ifn_cuda_options). */
export interface NativeEngineConfig {
  numBlocks: number; // 0: the engine sizes the pool from its budget (read back: NativeEngine.numBlocks)
  kvCacheBytes: number; // the budget; on CUDA 0 means what gpuMemoryUtilization leaves
  blockSizeTokens: number;
  maxNumBatchedTokens: number;
  maxNumSeqs: number;
  maxBlocksPerSeq: number;
  kvCacheDtype: typeof DType.F32 | typeof DType.F16;
  cpu: { numThreads: number; computeDtype: typeof DType.F32 | typeof DType.BF16 };
  cuda?: {
    deviceOrdinal: number;
    enforceEager: boolean;
    memoryUtilization: number; // 0: 0.9
    computeDtype: typeof DType.F32 | typeof DType.BF16 | typeof DType.F16; // F32: the weights' own float type
  };
}

/** Mirrors ifn_device_info. */
export interface DeviceInfo {
  memoryTotalBytes: number; // 0: not known (CPU)
  memoryUsedBytes: number;
  weightsBytes: number;
  utilization: number | null; // 0..1; null: not known
  ordinal: number;
}

/** Mirrors ifn_tensor: where one tensor's bytes are. */
export interface TensorEntry {
  name: string; // for messages only; the engine sees role + layer
  role: RoleCode;
  layer: number;
  dtype: DTypeCode;
  fileIndex: number;
  offset: number;
  sizeBytes: number;
  rows: number;
  cols: number;
}

/** Mirrors ifn_sampling_params; bias points into the batch's shared arrays. */
export interface SamplingRow {
  temperature: number;
  topP: number;
  minP: number;
  topK: number;
  presencePenalty: number;
  frequencyPenalty: number;
  repetitionPenalty: number;
  numTopLogprobs: number;
  seed: bigint;
  drawIndex: number;
  stateSlot: number; // the sequence state (openSeqState) the penalties count; -1: none
  biasOffset: number;
  biasCount: number;
  useMask: boolean; // draw only tokens allowed by this row of batch.allowedTokenMask
}

/** A greedy row with nothing else on: tools and tests fill from it. */
export const GREEDY_ROW: SamplingRow = {
  temperature: 0,
  topP: 1,
  minP: 0,
  topK: 0,
  presencePenalty: 0,
  frequencyPenalty: 0,
  repetitionPenalty: 1,
  numTopLogprobs: 0,
  seed: 0n,
  drawIndex: 0,
  stateSlot: -1,
  biasOffset: 0,
  biasCount: 0,
  useMask: false,
};

export class EngineError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "EngineError";
  }
}

/**
 * The engine library to load. CPU: INFERNEO_LIB if set; else the build for this machine
 * (zig-out/lib, what `npm ci` makes); else, in a portable install, the richest of the
 * per-level builds (zig-out/cpu/<level>/lib) that this CPU can run. CUDA: INFERNEO_CUDA_LIB
 * if set, else zig-out/lib/libinferneo_cuda.so (built where nvcc was found).
 */
export function libraryPath(device: Device = "cpu"): string {
  const root = join(import.meta.dir, "..", "..", "zig-out");
  if (device === "cuda") return process.env.INFERNEO_CUDA_LIB ?? join(root, "lib", "libinferneo_cuda.so");
  const override = process.env.INFERNEO_LIB;
  if (override) return override;
  const native = join(root, "lib", "libinferneo.so");
  const levelsDir = join(root, "cpu");
  if (existsSync(native) || !existsSync(levelsDir)) return native;
  const levels = readdirSync(levelsDir).filter((l) => existsSync(join(levelsDir, l, "lib", "libinferneo.so")));
  const level = pickLevel(levels, cpuFlags());
  if (level === null)
    throw new EngineError(
      Status.UNSUPPORTED,
      `no engine build in ${levelsDir} runs on this CPU (built: ${levels.join(", ") || "none"})`,
    );
  return join(levelsDir, level, "lib", "libinferneo.so");
}

/** What the CPU library was built for: "this machine's CPU", a CPU level, or the INFERNEO_LIB path. */
export function libraryBuild(): string {
  const path = libraryPath("cpu");
  if (process.env.INFERNEO_LIB) return path;
  return basename(dirname(dirname(dirname(path)))) === "cpu" ? basename(dirname(dirname(path))) : "this machine's CPU";
}

type Lib = ReturnType<typeof open>;

function open(path: string) {
  return dlopen(path, {
    ifn_abi_version: { args: [], returns: FFIType.i32 },
    ifn_status_string: { args: [FFIType.i32], returns: FFIType.cstring },
    ifn_last_error: { args: [], returns: FFIType.cstring },
    ifn_engine_create: {
      args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.u32, FFIType.ptr, FFIType.u32, FFIType.ptr],
      returns: FFIType.i32,
    },
    ifn_engine_destroy: { args: [FFIType.ptr], returns: FFIType.void },
    ifn_backend_name: { args: [], returns: FFIType.cstring },
    ifn_device_count: { args: [], returns: FFIType.i32 },
    ifn_engine_batch: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.ptr },
    ifn_engine_device_info: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_kv_cache_bytes: { args: [FFIType.ptr], returns: FFIType.u64 },
    ifn_engine_num_blocks: { args: [FFIType.ptr], returns: FFIType.u32 },
    ifn_struct_layout: { args: [FFIType.u32, FFIType.ptr, FFIType.u32], returns: FFIType.u32 },
    ifn_engine_step: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    ifn_engine_set_callback: { args: [FFIType.ptr, FFIType.function, FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_step_async: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    ifn_engine_last_error: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.cstring },
    ifn_seq_state_open: {
      args: [FFIType.ptr, FFIType.u32, FFIType.ptr, FFIType.u32, FFIType.u32],
      returns: FFIType.i32,
    },
    ifn_seq_state_close: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    ifn_blocks_allocate: { args: [FFIType.ptr, FFIType.u32, FFIType.ptr], returns: FFIType.i32 },
    ifn_blocks_free: { args: [FFIType.ptr, FFIType.u32, FFIType.ptr], returns: FFIType.i32 },
    ifn_blocks_ref: { args: [FFIType.ptr, FFIType.u32, FFIType.ptr], returns: FFIType.i32 },
    ifn_blocks_cache_insert: { args: [FFIType.ptr, FFIType.u32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    ifn_blocks_cache_lookup: { args: [FFIType.ptr, FFIType.u32, FFIType.ptr, FFIType.ptr], returns: FFIType.u32 },
    ifn_blocks_num_cached: { args: [FFIType.ptr], returns: FFIType.u32 },
    ifn_blocks_num_free: { args: [FFIType.ptr], returns: FFIType.u32 },
    ifn_blocks_ref_count: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.u32 },
  });
}

type Symbols = Lib["symbols"];

/** An opened engine library: its symbols and the struct layouts it reports. */
interface Loaded {
  symbols: Symbols;
  layouts: Layouts;
  path: string;
}

/** Opened libraries by path (INFERNEO_LIB / INFERNEO_CUDA_LIB may name another one later). */
const loaded = new Map<string, Loaded>();

function load(device: Device = "cpu"): Loaded {
  const path = libraryPath(device);
  const held = loaded.get(path);
  if (held) return held;
  if (!existsSync(path)) {
    throw new EngineError(
      Status.IO,
      device === "cuda"
        ? `this build has no CUDA backend (${path} is missing: nvcc was not found when the engine was built)`
        : `the native engine is not built (${path} is missing): run \`npm run build:engine\``,
    );
  }
  const opened = open(path);
  const version = opened.symbols.ifn_abi_version();
  if (version !== ABI_VERSION) {
    opened.close();
    throw new EngineError(
      Status.UNSUPPORTED,
      `${basename(path)} speaks ABI ${version}, this code expects ${ABI_VERSION}: rebuild with \`npm run build:engine\``,
    );
  }
  const entry = { symbols: opened.symbols, layouts: readLayouts(opened.symbols), path };
  loaded.set(path, entry);
  return entry;
}

/** How many devices the device's library can run on now, and why none when 0. */
export function deviceCount(device: Device): { count: number; reason: string } {
  const { symbols } = load(device);
  const count = symbols.ifn_device_count();
  return { count, reason: count > 0 ? "" : String(symbols.ifn_last_error()) };
}

/**
 * The device `--device` names: cpu; cuda (an error in one line when there is no CUDA build or no
 * usable GPU); auto, a GPU when the CUDA build finds one, else the CPU, with the reason.
 */
export function resolveDevice(requested: "auto" | Device): { device: Device; note: string | null } {
  if (requested === "cpu") return { device: "cpu", note: null };
  let why: string;
  try {
    const { count, reason } = deviceCount("cuda");
    if (count > 0) return { device: "cuda", note: null };
    why = `no usable GPU (${reason})`;
  } catch (e) {
    why = (e as Error).message;
  }
  if (requested === "cuda") throw new EngineError(Status.UNSUPPORTED, `device cuda: ${why}`);
  return { device: "cpu", note: `device auto: the CPU, since ${why}` };
}

function engineError(symbols: Symbols, status: number, detail: string): EngineError {
  const kind = String(symbols.ifn_status_string(status));
  return new EngineError(status, detail ? `${kind}: ${detail}` : kind);
}

function check(symbols: Symbols, status: number, detail: () => string): void {
  if (status !== Status.OK) throw engineError(symbols, status, detail());
}

// The fields of each struct of engine/include/inferneo.h, in declaration order. Their
// offsets and the structs' sizes come from the library (ifn_struct_layout), so these
// names are the only mirror of the header here; a field the library lacks is an error.
const STRUCT_FIELDS = {
  model: [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position",
    "rope_theta",
    "rms_norm_eps",
    "rope_interleaved",
    "tie_word_embeddings",
    "rope_attn_factor",
    "rope_inv_freq",
    "norm_weight_offset",
    "embedding_scale",
    "hidden_act",
    "attn_scale",
    "attn_softcap",
    "final_softcap",
    "sliding_window",
    "sliding_window_pattern",
    "rope_local_theta",
  ],
  tensor: ["role", "layer", "dtype", "file_index", "offset", "size_bytes", "rows", "cols"],
  engineConfig: [
    "num_blocks",
    "block_size",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_blocks_per_seq",
    "kv_cache_dtype",
    "kv_cache_bytes",
    "cpu",
    "cuda",
  ],
  sampling: [
    "temperature",
    "top_p",
    "min_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "num_top_logprobs",
    "seed",
    "draw_index",
    "state_slot",
    "bias_offset",
    "bias_count",
    "use_mask",
  ],
  batch: [
    "num_tokens",
    "num_seqs",
    "num_samples",
    "return_logits",
    "token_ids",
    "positions",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "block_tables",
    "sample_indices",
    "sampling",
    "out_token_ids",
    "out_logprobs",
    "logits",
    "bias_capacity",
    "_pad1",
    "logit_bias_ids",
    "logit_bias_values",
    "out_top_ids",
    "out_top_logprobs",
    "mask_words",
    "_pad",
    "allowed_token_mask",
    "masks_pending",
    "_pad2",
  ],
  cpuOptions: ["num_threads", "compute_dtype"],
  cudaOptions: ["device_ordinal", "enforce_eager", "memory_utilization", "compute_dtype"],
  deviceInfo: ["memory_total_bytes", "memory_used_bytes", "weights_bytes", "utilization", "ordinal"],
} as const;
type StructName = keyof typeof STRUCT_FIELDS;
type FieldOf<S extends StructName> = (typeof STRUCT_FIELDS)[S][number];
/** ifn_struct_id, in STRUCT_FIELDS' order. */
const STRUCT_IDS: Record<StructName, number> = {
  model: 0,
  tensor: 1,
  engineConfig: 2,
  sampling: 3,
  batch: 4,
  cpuOptions: 5,
  cudaOptions: 6,
  deviceInfo: 7,
};

export interface StructLayout<S extends StructName> {
  size: number;
  at: Record<FieldOf<S>, number>; // byte offset of each field
}
type Layouts = { [S in StructName]: StructLayout<S> };

function readLayouts(symbols: Symbols): Layouts {
  const out = new Uint32Array(64);
  const layouts = {} as Record<StructName, { size: number; at: Record<string, number> }>;
  for (const name of Object.keys(STRUCT_FIELDS) as StructName[]) {
    const fields = STRUCT_FIELDS[name];
    const count = symbols.ifn_struct_layout(STRUCT_IDS[name], ptr(out), out.length);
    if (count < fields.length + 1) {
      throw new EngineError(
        Status.UNSUPPORTED,
        `libinferneo describes ${name} with ${Math.max(0, count - 1)} fields; this code needs ${fields.length}: rebuild with \`npm run build:engine\``,
      );
    }
    layouts[name] = { size: out[0], at: Object.fromEntries(fields.map((f, i) => [f, out[1 + i]])) };
  }
  return layouts as unknown as Layouts;
}

/** Struct layouts as the device's library reports them. */
export function structLayouts(device: Device = "cpu"): Layouts {
  return load(device).layouts;
}

/** Typed views over the engine-owned step descriptor; filled in place, never reallocated. */
export interface BatchView {
  tokenIds: Int32Array;
  positions: Int32Array;
  slotMapping: Int32Array;
  queryStartLoc: Int32Array;
  seqLens: Int32Array;
  blockTables: Int32Array;
  sampleIndices: Int32Array;
  outTokenIds: Int32Array;
  outLogprobs: Float32Array;
  logits: Float32Array;
  logitBiasIds: Int32Array;
  logitBiasValues: Float32Array;
  outTopIds: Int32Array;
  outTopLogprobs: Float32Array;
  maskWords: number; // 32-bit words in one mask row: ceil(vocab / 32)
  allowedTokenMask: Uint32Array; // (maxNumSeqs, maskWords): bit t % 32 of word t / 32 allows token t
}

/** Writes fields by name into a struct laid out as the library reports, at `base` in `buffer`. */
class StructWriter<S extends StructName> {
  readonly buffer: ArrayBuffer;
  private readonly view: DataView;
  constructor(
    private readonly layout: StructLayout<S>,
    count = 1,
    buffer?: ArrayBuffer,
    private readonly base = 0,
  ) {
    this.buffer = buffer ?? new ArrayBuffer(layout.size * Math.max(1, count));
    this.view = new DataView(this.buffer);
  }
  private at(field: FieldOf<S>, index: number): number {
    return this.base + index * this.layout.size + this.layout.at[field];
  }
  u32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setUint32(this.at(field, index), v, true);
  }
  i32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setInt32(this.at(field, index), v, true);
  }
  f32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setFloat32(this.at(field, index), v, true);
  }
  u64(field: FieldOf<S>, v: bigint | number, index = 0): void {
    this.view.setBigUint64(this.at(field, index), BigInt.asUintN(64, BigInt(v)), true);
  }
}

function modelStruct(layouts: Layouts, model: NativeModelConfig): ArrayBuffer {
  const w = new StructWriter(layouts.model);
  w.u32("vocab_size", model.vocabSize);
  w.u32("hidden_size", model.hiddenSize);
  w.u32("intermediate_size", model.intermediateSize);
  w.u32("num_layers", model.numLayers);
  w.u32("num_heads", model.numHeads);
  w.u32("num_kv_heads", model.numKvHeads);
  w.u32("head_dim", model.headDim);
  w.u32("max_position", model.maxPosition);
  w.f32("rope_theta", model.ropeTheta);
  w.f32("rms_norm_eps", model.rmsNormEps);
  w.u32("rope_interleaved", model.ropeInterleaved ? 1 : 0);
  w.u32("tie_word_embeddings", model.tieWordEmbeddings ? 1 : 0);
  w.f32("rope_attn_factor", model.ropeAttnFactor ?? 0);
  // Read by the library during ifn_engine_create only; the caller keeps the array alive until then.
  w.u64("rope_inv_freq", model.ropeInvFreq ? ptr(model.ropeInvFreq) : 0);
  w.f32("norm_weight_offset", model.normWeightOffset ?? 0);
  w.f32("embedding_scale", model.embeddingScale ?? 0);
  w.u32("hidden_act", model.hiddenAct === "gelu_tanh" ? 1 : 0);
  w.f32("attn_scale", model.attnScale ?? 0);
  w.f32("attn_softcap", model.attnSoftcap ?? 0);
  w.f32("final_softcap", model.finalSoftcap ?? 0);
  w.u32("sliding_window", model.slidingWindow ?? 0);
  w.u32("sliding_window_pattern", model.slidingWindowPattern ?? 0);
  w.f32("rope_local_theta", model.ropeLocalTheta ?? 0);
  return w.buffer;
}

function engineConfigStruct(layouts: Layouts, config: NativeEngineConfig): ArrayBuffer {
  const w = new StructWriter(layouts.engineConfig);
  w.u32("num_blocks", config.numBlocks);
  w.u32("block_size", config.blockSizeTokens);
  w.u32("max_num_batched_tokens", config.maxNumBatchedTokens);
  w.u32("max_num_seqs", config.maxNumSeqs);
  w.u32("max_blocks_per_seq", config.maxBlocksPerSeq);
  w.u32("kv_cache_dtype", config.kvCacheDtype);
  w.u64("kv_cache_bytes", config.kvCacheBytes);
  const cpu = new StructWriter(layouts.cpuOptions, 1, w.buffer, layouts.engineConfig.at.cpu);
  cpu.u32("num_threads", config.cpu.numThreads);
  cpu.u32("compute_dtype", config.cpu.computeDtype);
  const cuda = new StructWriter(layouts.cudaOptions, 1, w.buffer, layouts.engineConfig.at.cuda);
  cuda.u32("device_ordinal", config.cuda?.deviceOrdinal ?? 0);
  cuda.u32("enforce_eager", config.cuda?.enforceEager ? 1 : 0);
  cuda.f32("memory_utilization", config.cuda?.memoryUtilization ?? 0);
  cuda.u32("compute_dtype", config.cuda?.computeDtype ?? DType.F32);
  return w.buffer;
}

function tensorStructs(layouts: Layouts, tensors: TensorEntry[]): ArrayBuffer {
  const w = new StructWriter(layouts.tensor, tensors.length);
  tensors.forEach((e, i) => {
    w.u32("role", e.role, i);
    w.u32("layer", e.layer, i);
    w.u32("dtype", e.dtype, i);
    w.u32("file_index", e.fileIndex, i);
    w.u64("offset", e.offset, i);
    w.u64("size_bytes", e.sizeBytes, i);
    w.u64("rows", e.rows, i);
    w.u64("cols", e.cols, i);
  });
  return w.buffer;
}

/** Descriptors an engine holds (IFN_NUM_BATCHES): one is filled while the other runs. */
export const NUM_BATCHES = 2;

/** One engine-owned step descriptor: typed views over its arrays and setters for its header. */
export class StepDescriptor {
  readonly batch: BatchView;
  private readonly header: DataView;
  private readonly masksPending: Int32Array; // over the batch's masks_pending field
  private readonly sampling: StructWriter<"sampling">;

  constructor(
    readonly index: number,
    batchPtr: Pointer,
    private readonly layouts: Layouts,
    config: NativeEngineConfig,
    vocabSize: number,
  ) {
    const L = layouts.batch;
    this.header = new DataView(toArrayBuffer(batchPtr, 0, L.size));
    this.masksPending = new Int32Array(this.header.buffer, L.at.masks_pending, 1);
    const s = config.maxNumSeqs;
    const t32 = config.maxNumBatchedTokens;
    const view = <T>(field: FieldOf<"batch">, count: number, Ctor: new (b: ArrayBuffer) => T): T =>
      new Ctor(toArrayBuffer(read.ptr(batchPtr, L.at[field]) as Pointer, 0, count * 4));
    const u32 = (field: FieldOf<"batch">) => this.header.getUint32(L.at[field], true);
    const maskWords = u32("mask_words");
    this.batch = {
      tokenIds: view("token_ids", t32, Int32Array),
      positions: view("positions", t32, Int32Array),
      slotMapping: view("slot_mapping", t32, Int32Array),
      queryStartLoc: view("query_start_loc", s + 1, Int32Array),
      seqLens: view("seq_lens", s, Int32Array),
      blockTables: view("block_tables", s * config.maxBlocksPerSeq, Int32Array),
      sampleIndices: view("sample_indices", s, Int32Array),
      outTokenIds: view("out_token_ids", s, Int32Array),
      outLogprobs: view("out_logprobs", s, Float32Array),
      logits: view("logits", s * vocabSize, Float32Array),
      logitBiasIds: view("logit_bias_ids", u32("bias_capacity"), Int32Array),
      logitBiasValues: view("logit_bias_values", u32("bias_capacity"), Float32Array),
      outTopIds: view("out_top_ids", s * TOP_LOGPROBS_MAX, Int32Array),
      outTopLogprobs: view("out_top_logprobs", s * TOP_LOGPROBS_MAX, Float32Array),
      maskWords,
      allowedTokenMask: view("allowed_token_mask", s * maskWords, Uint32Array),
    };
    const samplingLayout = layouts.sampling;
    const samplingBuf = toArrayBuffer(read.ptr(batchPtr, L.at.sampling) as Pointer, 0, s * samplingLayout.size);
    this.sampling = new StructWriter(samplingLayout, s, samplingBuf);
  }

  /**
   * Says whether mask rows are still being written: a step started while pending runs its
   * forward pass and waits for false before sampling. A sequentially consistent store, so
   * the rows written before it are seen by the engine thread.
   */
  setMasksPending(pending: boolean): void {
    Atomics.store(this.masksPending, 0, pending ? 1 : 0);
  }

  setCounts(numTokens: number, numSeqs: number, numSamples: number, returnLogits: boolean): void {
    const at = this.layouts.batch.at;
    this.header.setUint32(at.num_tokens, numTokens, true);
    this.header.setUint32(at.num_seqs, numSeqs, true);
    this.header.setUint32(at.num_samples, numSamples, true);
    this.header.setUint32(at.return_logits, returnLogits ? 1 : 0, true);
  }

  setSampling(row: number, p: SamplingRow): void {
    const w = this.sampling;
    w.f32("temperature", p.temperature, row);
    w.f32("top_p", p.topP, row);
    w.f32("min_p", p.minP, row);
    w.i32("top_k", p.topK, row);
    w.f32("presence_penalty", p.presencePenalty, row);
    w.f32("frequency_penalty", p.frequencyPenalty, row);
    w.f32("repetition_penalty", p.repetitionPenalty, row);
    w.i32("num_top_logprobs", p.numTopLogprobs, row);
    w.u64("seed", p.seed, row);
    w.u64("draw_index", p.drawIndex, row);
    w.i32("state_slot", p.stateSlot, row);
    w.i32("bias_offset", p.biasOffset, row);
    w.i32("bias_count", p.biasCount, row);
    w.i32("use_mask", p.useMask ? 1 : 0, row);
  }
}

/** A placeholder token id: the token that row `row` of the step before draws (the engine fills it in). */
export function drawOfStepBefore(row: number): number {
  return -(row + 1);
}

export class NativeEngine {
  readonly config: NativeEngineConfig;
  readonly model: NativeModelConfig;
  readonly device: Device;
  /** The step descriptors, by index. */
  readonly descriptors: StepDescriptor[];
  /** The KV pool's size in blocks, as the engine sized it. */
  readonly numBlocks: number;
  private handle: Pointer | null;
  private readonly symbols: Symbols;
  private readonly layouts: Layouts;
  private callback: JSCallback | null = null;
  /** Steps queued on the engine thread, oldest first: they end in this order. */
  private readonly queued: { index: number; resolve: (status: number) => void }[] = [];
  private keepAlive: ReturnType<typeof setInterval> | null = null;
  private readonly idsScratch = new Int32Array(new ArrayBuffer(4 * 4096));

  constructor(
    model: NativeModelConfig,
    config: NativeEngineConfig,
    files: string[],
    tensors: TensorEntry[],
    device: Device = "cpu",
  ) {
    const { symbols, layouts } = load(device);
    this.symbols = symbols;
    this.layouts = layouts;
    this.device = device;
    this.model = model;
    this.config = config;
    const modelBuf = modelStruct(layouts, model);
    const configBuf = engineConfigStruct(layouts, config);
    const tensorBuf = tensorStructs(layouts, tensors);
    // A model with no files (dummy weights) still passes a buffer: a pointer to nothing is refused.
    const filesBuf = Buffer.from(files.map((f) => `${f}\0`).join("") || "\0", "utf8");
    const out = new BigUint64Array(1);
    const status = symbols.ifn_engine_create(
      ptr(modelBuf),
      ptr(configBuf),
      ptr(filesBuf),
      files.length,
      ptr(tensorBuf),
      tensors.length,
      ptr(out),
    );
    check(symbols, status, () => String(symbols.ifn_last_error()));
    const handle = Number(out[0]) as Pointer;
    this.handle = handle;
    this.numBlocks = symbols.ifn_engine_num_blocks(handle);
    this.descriptors = Array.from({ length: NUM_BATCHES }, (_, i) => {
      const batchPtr = symbols.ifn_engine_batch(handle, i);
      if (batchPtr === null) throw new EngineError(Status.INTERNAL, `engine returned no descriptor ${i}`);
      return new StepDescriptor(i, batchPtr as Pointer, layouts, config, model.vocabSize);
    });
  }

  /** Descriptor 0's arrays (tools and tests that run one step at a time). */
  get batch(): BatchView {
    return this.descriptors[0].batch;
  }

  private get ptr(): Pointer {
    if (this.handle === null) throw new EngineError(Status.INVALID_ARGUMENT, "engine already destroyed");
    return this.handle;
  }

  get kvCacheBytes(): number {
    return Number(this.symbols.ifn_engine_kv_cache_bytes(this.ptr));
  }

  get backendName(): string {
    return String(this.symbols.ifn_backend_name());
  }

  deviceInfo(): DeviceInfo {
    const L = this.layouts.deviceInfo;
    const buf = new ArrayBuffer(L.size);
    check(this.symbols, this.symbols.ifn_engine_device_info(this.ptr, ptr(buf)), () =>
      String(this.symbols.ifn_last_error()),
    );
    const v = new DataView(buf);
    const utilization = v.getFloat32(L.at.utilization, true);
    return {
      memoryTotalBytes: Number(v.getBigUint64(L.at.memory_total_bytes, true)),
      memoryUsedBytes: Number(v.getBigUint64(L.at.memory_used_bytes, true)),
      weightsBytes: Number(v.getBigUint64(L.at.weights_bytes, true)),
      utilization: utilization < 0 ? null : utilization,
      ordinal: v.getUint32(L.at.ordinal, true),
    };
  }

  /** Runs descriptor `index` on the calling thread (blocks the event loop: tests and tools only). */
  stepSync(index = 0): void {
    const symbols = this.symbols;
    check(symbols, symbols.ifn_engine_step(this.ptr, index), () => String(symbols.ifn_last_error()));
  }

  /** Steps queued and not yet ended. */
  get numQueued(): number {
    return this.queued.length;
  }

  private ensureCallback(): void {
    if (this.callback !== null) return;
    const symbols = this.symbols;
    // Fires on the engine thread and is queued onto the JS thread. An exception inside a
    // JSCallback would kill the process, so nothing here may throw.
    this.callback = new JSCallback(
      (status: number, _index: number, _userData: Pointer | null) => {
        try {
          const done = this.queued.shift();
          if (this.queued.length === 0 && this.keepAlive !== null) {
            clearInterval(this.keepAlive);
            this.keepAlive = null;
          }
          done?.resolve(status);
        } catch {
          // Nothing to do: the awaiting side sees no resolution only if it is gone.
        }
      },
      { args: [FFIType.i32, FFIType.u32, FFIType.ptr], returns: FFIType.void, threadsafe: true },
    );
    check(symbols, symbols.ifn_engine_set_callback(this.ptr, this.callback.ptr, null), () =>
      String(symbols.ifn_last_error()),
    );
  }

  /**
   * Queues descriptor `index` on the engine thread; it runs after the steps queued before it,
   * and the event loop stays free meanwhile. Resolves when it ends.
   */
  step(index = 0): Promise<void> {
    const symbols = this.symbols;
    const handle = this.ptr;
    this.ensureCallback();
    return new Promise<void>((resolve, reject) => {
      const entry = {
        index,
        resolve: (status: number) => {
          if (status === Status.OK) resolve();
          else reject(engineError(symbols, status, String(symbols.ifn_engine_last_error(handle, index))));
        },
      };
      this.queued.push(entry);
      const status = symbols.ifn_engine_step_async(handle, index);
      if (status !== Status.OK) {
        this.queued.pop();
        reject(engineError(symbols, status, String(symbols.ifn_last_error())));
        return;
      }
      // A threadsafe callback does not keep the process alive; this timer does, while steps are queued.
      this.keepAlive ??= setInterval(() => {}, 1 << 30);
    });
  }

  /** Opens sequence-state slot `slot` with a sequence's tokens so far (the first promptLen its prompt). */
  openSeqState(slot: number, tokens: readonly number[], promptLen: number): void {
    const symbols = this.symbols;
    const buf = Int32Array.from(tokens);
    const p = buf.length > 0 ? ptr(buf) : null;
    check(symbols, symbols.ifn_seq_state_open(this.ptr, slot, p, buf.length, promptLen), () =>
      String(symbols.ifn_last_error()),
    );
  }

  closeSeqState(slot: number): void {
    const symbols = this.symbols;
    check(symbols, symbols.ifn_seq_state_close(this.ptr, slot), () => String(symbols.ifn_last_error()));
  }

  allocateBlocks(n: number): number[] {
    if (n === 0) return [];
    const symbols = this.symbols;
    const ids = this.scratchFor(n);
    check(symbols, symbols.ifn_blocks_allocate(this.ptr, n, ptr(ids)), () => String(symbols.ifn_last_error()));
    return Array.from(ids.subarray(0, n));
  }

  freeBlocks(ids: readonly number[]): void {
    if (ids.length === 0) return;
    const symbols = this.symbols;
    const buf = this.scratchFor(ids.length);
    buf.set(ids);
    check(symbols, symbols.ifn_blocks_free(this.ptr, ids.length, ptr(buf)), () => String(symbols.ifn_last_error()));
  }

  refBlocks(ids: readonly number[]): void {
    if (ids.length === 0) return;
    const symbols = this.symbols;
    const buf = this.scratchFor(ids.length);
    buf.set(ids);
    check(symbols, symbols.ifn_blocks_ref(this.ptr, ids.length, ptr(buf)), () => String(symbols.ifn_last_error()));
  }

  get numFreeBlocks(): number {
    return this.symbols.ifn_blocks_num_free(this.ptr);
  }

  get numCachedBlocks(): number {
    return this.symbols.ifn_blocks_num_cached(this.ptr);
  }

  /** Names held, full blocks by the hash of their tokens, for later prefix-cache hits. */
  cacheBlocks(ids: readonly number[], hashes: readonly bigint[]): void {
    if (ids.length === 0) return;
    const symbols = this.symbols;
    const idBuf = new Int32Array(ids);
    const hashBuf = new BigUint64Array(hashes);
    check(symbols, symbols.ifn_blocks_cache_insert(this.ptr, ids.length, ptr(idBuf), ptr(hashBuf)), () =>
      String(symbols.ifn_last_error()),
    );
  }

  /** References the cached blocks holding the leading hashes; returns their ids (stops at the first miss). */
  lookupCachedBlocks(hashes: readonly bigint[]): number[] {
    if (hashes.length === 0) return [];
    const hashBuf = new BigUint64Array(hashes);
    const out = new Int32Array(hashes.length);
    const hits = this.symbols.ifn_blocks_cache_lookup(this.ptr, hashes.length, ptr(hashBuf), ptr(out));
    return Array.from(out.subarray(0, hits));
  }

  refCount(blockId: number): number {
    return this.symbols.ifn_blocks_ref_count(this.ptr, blockId);
  }

  private scratchFor(n: number): Int32Array {
    return n <= this.idsScratch.length ? this.idsScratch : new Int32Array(new ArrayBuffer(4 * n));
  }

  destroy(): void {
    if (this.handle === null) return;
    if (this.queued.length > 0) throw new EngineError(Status.BUSY, "cannot destroy the engine while a step runs");
    this.symbols.ifn_engine_destroy(this.handle);
    this.handle = null;
    this.callback?.close();
    this.callback = null;
  }
}
