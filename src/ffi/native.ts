// The only importer of bun:ffi. One raw dlopen table, wrapped by NativeEngine,
// which turns status codes into errors and never hands a raw pointer upward.
import { dlopen, FFIType, JSCallback, ptr, read, toArrayBuffer, type Pointer } from "bun:ffi";
import { existsSync, readdirSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { cpuFlags, pickLevel } from "./cpu_levels.ts";

export const ABI_VERSION = 5;
export const TOP_LOGPROBS_MAX = 20;
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

/** Mirrors ifn_engine_config. */
export interface NativeEngineConfig {
  numBlocks: number; // 0: the engine sizes the pool from kvCacheBytes (read back: NativeEngine.numBlocks)
  kvCacheBytes: number;
  blockSizeTokens: number;
  maxNumBatchedTokens: number;
  maxNumSeqs: number;
  maxBlocksPerSeq: number;
  numThreads: number;
  kvCacheDtype: typeof DType.F32 | typeof DType.F16;
  computeDtype: typeof DType.F32 | typeof DType.BF16;
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
 * The engine library to load: INFERNEO_LIB if set; else the build for this machine
 * (zig-out/lib, what `npm ci` makes); else, in a portable install, the richest of the
 * per-level builds (zig-out/cpu/<level>/lib) that this CPU can run.
 */
export function libraryPath(): string {
  const override = process.env.INFERNEO_LIB;
  if (override) return override;
  const root = join(import.meta.dir, "..", "..", "zig-out");
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

/** What the loaded library was built for: "this machine's CPU", a CPU level, or the INFERNEO_LIB path. */
export function libraryBuild(): string {
  const path = libraryPath();
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
    ifn_engine_batch: { args: [FFIType.ptr], returns: FFIType.ptr },
    ifn_engine_kv_cache_bytes: { args: [FFIType.ptr], returns: FFIType.u64 },
    ifn_engine_num_blocks: { args: [FFIType.ptr], returns: FFIType.u32 },
    ifn_struct_layout: { args: [FFIType.u32, FFIType.ptr, FFIType.u32], returns: FFIType.u32 },
    ifn_engine_step: { args: [FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_set_callback: { args: [FFIType.ptr, FFIType.function, FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_step_async: { args: [FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_last_error: { args: [FFIType.ptr], returns: FFIType.cstring },
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

let lib: Lib | null = null;
let layouts: Layouts | null = null;

function load(): Lib["symbols"] {
  if (lib) return lib.symbols;
  const path = libraryPath();
  if (!existsSync(path)) {
    throw new EngineError(
      Status.IO,
      `the native engine is not built (${path} is missing): run \`npm run build:engine\``,
    );
  }
  const opened = open(path);
  const version = opened.symbols.ifn_abi_version();
  if (version !== ABI_VERSION) {
    opened.close();
    throw new EngineError(
      Status.UNSUPPORTED,
      `libinferneo speaks ABI ${version}, this code expects ${ABI_VERSION}: rebuild with \`npm run build:engine\``,
    );
  }
  layouts = readLayouts(opened.symbols);
  lib = opened;
  return opened.symbols;
}

function engineError(status: number, detail: string): EngineError {
  const kind = String(load().ifn_status_string(status));
  return new EngineError(status, detail ? `${kind}: ${detail}` : kind);
}

function check(status: number, detail: () => string): void {
  if (status !== Status.OK) throw engineError(status, detail());
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
    "num_threads",
    "kv_cache_dtype",
    "compute_dtype",
    "kv_cache_bytes",
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
} as const;
type StructName = keyof typeof STRUCT_FIELDS;
type FieldOf<S extends StructName> = (typeof STRUCT_FIELDS)[S][number];
/** ifn_struct_id, in STRUCT_FIELDS' order. */
const STRUCT_IDS: Record<StructName, number> = { model: 0, tensor: 1, engineConfig: 2, sampling: 3, batch: 4 };

export interface StructLayout<S extends StructName> {
  size: number;
  at: Record<FieldOf<S>, number>; // byte offset of each field
}
type Layouts = { [S in StructName]: StructLayout<S> };

function readLayouts(symbols: Lib["symbols"]): Layouts {
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

/** Struct layouts as this build of the library reports them. */
export function structLayouts(): Layouts {
  load();
  return layouts!;
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

/** Writes fields by name into a struct laid out as the library reports. */
class StructWriter<S extends StructName> {
  readonly buffer: ArrayBuffer;
  private readonly view: DataView;
  constructor(
    private readonly layout: StructLayout<S>,
    count = 1,
    buffer?: ArrayBuffer,
  ) {
    this.buffer = buffer ?? new ArrayBuffer(layout.size * Math.max(1, count));
    this.view = new DataView(this.buffer);
  }
  u32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setUint32(index * this.layout.size + this.layout.at[field], v, true);
  }
  i32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setInt32(index * this.layout.size + this.layout.at[field], v, true);
  }
  f32(field: FieldOf<S>, v: number, index = 0): void {
    this.view.setFloat32(index * this.layout.size + this.layout.at[field], v, true);
  }
  u64(field: FieldOf<S>, v: bigint | number, index = 0): void {
    this.view.setBigUint64(index * this.layout.size + this.layout.at[field], BigInt.asUintN(64, BigInt(v)), true);
  }
}

function modelStruct(model: NativeModelConfig): ArrayBuffer {
  const w = new StructWriter(structLayouts().model);
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

function engineConfigStruct(config: NativeEngineConfig): ArrayBuffer {
  const w = new StructWriter(structLayouts().engineConfig);
  w.u32("num_blocks", config.numBlocks);
  w.u32("block_size", config.blockSizeTokens);
  w.u32("max_num_batched_tokens", config.maxNumBatchedTokens);
  w.u32("max_num_seqs", config.maxNumSeqs);
  w.u32("max_blocks_per_seq", config.maxBlocksPerSeq);
  w.u32("num_threads", config.numThreads);
  w.u32("kv_cache_dtype", config.kvCacheDtype);
  w.u32("compute_dtype", config.computeDtype);
  w.u64("kv_cache_bytes", config.kvCacheBytes);
  return w.buffer;
}

function tensorStructs(tensors: TensorEntry[]): ArrayBuffer {
  const w = new StructWriter(structLayouts().tensor, tensors.length);
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

export class NativeEngine {
  readonly config: NativeEngineConfig;
  readonly model: NativeModelConfig;
  readonly batch: BatchView;
  /** The KV pool's size in blocks, as the engine sized it. */
  readonly numBlocks: number;
  private handle: Pointer | null;
  private readonly header: DataView;
  private readonly batchLayout: StructLayout<"batch">;
  private readonly masksPending: Int32Array; // over the batch's masks_pending field
  private readonly sampling: StructWriter<"sampling">;
  private callback: JSCallback | null = null;
  private pendingStep: { resolve: (status: number) => void } | null = null;
  private readonly idsScratch = new Int32Array(new ArrayBuffer(4 * 4096));

  constructor(model: NativeModelConfig, config: NativeEngineConfig, files: string[], tensors: TensorEntry[]) {
    const symbols = load();
    this.model = model;
    this.config = config;
    const modelBuf = modelStruct(model);
    const configBuf = engineConfigStruct(config);
    const tensorBuf = tensorStructs(tensors);
    const filesBuf = Buffer.from(files.map((f) => `${f}\0`).join(""), "utf8");
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
    check(status, () => String(symbols.ifn_last_error()));
    this.handle = Number(out[0]) as Pointer;
    this.numBlocks = symbols.ifn_engine_num_blocks(this.handle);

    const batchPtr = symbols.ifn_engine_batch(this.handle);
    if (batchPtr === null) throw new EngineError(Status.INTERNAL, "engine returned no batch descriptor");
    const L = (this.batchLayout = structLayouts().batch);
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
      logits: view("logits", s * model.vocabSize, Float32Array),
      logitBiasIds: view("logit_bias_ids", u32("bias_capacity"), Int32Array),
      logitBiasValues: view("logit_bias_values", u32("bias_capacity"), Float32Array),
      outTopIds: view("out_top_ids", s * TOP_LOGPROBS_MAX, Int32Array),
      outTopLogprobs: view("out_top_logprobs", s * TOP_LOGPROBS_MAX, Float32Array),
      maskWords,
      allowedTokenMask: view("allowed_token_mask", s * maskWords, Uint32Array),
    };
    const samplingLayout = structLayouts().sampling;
    const samplingBuf = toArrayBuffer(read.ptr(batchPtr, L.at.sampling) as Pointer, 0, s * samplingLayout.size);
    this.sampling = new StructWriter(samplingLayout, s, samplingBuf);
  }

  private get ptr(): Pointer {
    if (this.handle === null) throw new EngineError(Status.INVALID_ARGUMENT, "engine already destroyed");
    return this.handle;
  }

  get kvCacheBytes(): number {
    return Number(load().ifn_engine_kv_cache_bytes(this.ptr));
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
    const at = this.batchLayout.at;
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

  /** Runs the filled batch on the calling thread (blocks the event loop: tests and tools only). */
  stepSync(): void {
    const symbols = load();
    const handle = this.ptr;
    check(symbols.ifn_engine_step(handle), () => String(symbols.ifn_last_error()));
  }

  /** Runs the filled batch on the engine thread; the event loop stays free meanwhile. */
  step(): Promise<void> {
    const symbols = load();
    const handle = this.ptr;
    if (this.callback === null) {
      // Fires on the engine thread and is queued onto the JS thread. An exception
      // inside a JSCallback would kill the process, so nothing here may throw.
      this.callback = new JSCallback(
        (status: number, _userData: Pointer | null) => {
          try {
            const pending = this.pendingStep;
            this.pendingStep = null;
            pending?.resolve(status);
          } catch {
            // Nothing to do: the awaiting side sees no resolution only if it is gone.
          }
        },
        { args: [FFIType.i32, FFIType.ptr], returns: FFIType.void, threadsafe: true },
      );
      check(symbols.ifn_engine_set_callback(handle, this.callback.ptr, null), () => String(symbols.ifn_last_error()));
    }
    if (this.pendingStep !== null) return Promise.reject(new EngineError(Status.BUSY, "a step is already in flight"));
    // A threadsafe callback does not keep the process alive; this timer does, for the step's duration.
    const keepAlive = setInterval(() => {}, 1 << 30);
    return new Promise<void>((resolve, reject) => {
      this.pendingStep = {
        resolve: (status) => {
          clearInterval(keepAlive);
          if (status === Status.OK) resolve();
          else reject(engineError(status, String(symbols.ifn_engine_last_error(handle))));
        },
      };
      const status = symbols.ifn_engine_step_async(handle);
      if (status !== Status.OK) {
        this.pendingStep = null;
        clearInterval(keepAlive);
        reject(engineError(status, String(symbols.ifn_last_error())));
      }
    });
  }

  /** Opens sequence-state slot `slot` with a sequence's tokens so far (the first promptLen its prompt). */
  openSeqState(slot: number, tokens: readonly number[], promptLen: number): void {
    const symbols = load();
    const buf = Int32Array.from(tokens);
    const p = buf.length > 0 ? ptr(buf) : null;
    check(symbols.ifn_seq_state_open(this.ptr, slot, p, buf.length, promptLen), () => String(symbols.ifn_last_error()));
  }

  closeSeqState(slot: number): void {
    const symbols = load();
    check(symbols.ifn_seq_state_close(this.ptr, slot), () => String(symbols.ifn_last_error()));
  }

  allocateBlocks(n: number): number[] {
    if (n === 0) return [];
    const symbols = load();
    const ids = this.scratchFor(n);
    check(symbols.ifn_blocks_allocate(this.ptr, n, ptr(ids)), () => String(symbols.ifn_last_error()));
    return Array.from(ids.subarray(0, n));
  }

  freeBlocks(ids: readonly number[]): void {
    if (ids.length === 0) return;
    const symbols = load();
    const buf = this.scratchFor(ids.length);
    buf.set(ids);
    check(symbols.ifn_blocks_free(this.ptr, ids.length, ptr(buf)), () => String(symbols.ifn_last_error()));
  }

  refBlocks(ids: readonly number[]): void {
    if (ids.length === 0) return;
    const symbols = load();
    const buf = this.scratchFor(ids.length);
    buf.set(ids);
    check(symbols.ifn_blocks_ref(this.ptr, ids.length, ptr(buf)), () => String(symbols.ifn_last_error()));
  }

  get numFreeBlocks(): number {
    return load().ifn_blocks_num_free(this.ptr);
  }

  get numCachedBlocks(): number {
    return load().ifn_blocks_num_cached(this.ptr);
  }

  /** Names held, full blocks by the hash of their tokens, for later prefix-cache hits. */
  cacheBlocks(ids: readonly number[], hashes: readonly bigint[]): void {
    if (ids.length === 0) return;
    const symbols = load();
    const idBuf = new Int32Array(ids);
    const hashBuf = new BigUint64Array(hashes);
    check(symbols.ifn_blocks_cache_insert(this.ptr, ids.length, ptr(idBuf), ptr(hashBuf)), () =>
      String(symbols.ifn_last_error()),
    );
  }

  /** References the cached blocks holding the leading hashes; returns their ids (stops at the first miss). */
  lookupCachedBlocks(hashes: readonly bigint[]): number[] {
    if (hashes.length === 0) return [];
    const hashBuf = new BigUint64Array(hashes);
    const out = new Int32Array(hashes.length);
    const hits = load().ifn_blocks_cache_lookup(this.ptr, hashes.length, ptr(hashBuf), ptr(out));
    return Array.from(out.subarray(0, hits));
  }

  refCount(blockId: number): number {
    return load().ifn_blocks_ref_count(this.ptr, blockId);
  }

  private scratchFor(n: number): Int32Array {
    return n <= this.idsScratch.length ? this.idsScratch : new Int32Array(new ArrayBuffer(4 * n));
  }

  destroy(): void {
    if (this.handle === null) return;
    if (this.pendingStep !== null) throw new EngineError(Status.BUSY, "cannot destroy the engine while a step runs");
    load().ifn_engine_destroy(this.handle);
    this.handle = null;
    this.callback?.close();
    this.callback = null;
  }
}
