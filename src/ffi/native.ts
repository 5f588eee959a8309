// The only importer of bun:ffi. One raw dlopen table, wrapped by NativeEngine,
// which turns status codes into errors and never hands a raw pointer upward.
import { dlopen, FFIType, JSCallback, ptr, read, toArrayBuffer, type Pointer } from "bun:ffi";
import { existsSync, readdirSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { cpuFlags, pickLevel } from "./cpu_levels.ts";

export const ABI_VERSION = 4;
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

export const DType = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8, Q4_K: 12, Q6_K: 14, BF16: 30 } as const;
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
}

/** Mirrors ifn_engine_config. */
export interface NativeEngineConfig {
  numBlocks: number;
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

/** Mirrors ifn_sampling_params; history and bias point into the batch's shared arrays. */
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
  historyOffset: number;
  historyPromptLen: number;
  historyLen: number;
  biasOffset: number;
  biasCount: number;
}

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
    ifn_engine_step: { args: [FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_set_callback: { args: [FFIType.ptr, FFIType.function], returns: FFIType.i32 },
    ifn_engine_step_async: { args: [FFIType.ptr], returns: FFIType.i32 },
    ifn_engine_last_error: { args: [FFIType.ptr], returns: FFIType.cstring },
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

// Byte offsets inside ifn_batch (engine/include/inferneo.h).
const BATCH = {
  numTokens: 0,
  numSeqs: 4,
  numSamples: 8,
  returnLogits: 12,
  tokenIds: 16,
  positions: 24,
  slotMapping: 32,
  queryStartLoc: 40,
  seqLens: 48,
  blockTables: 56,
  sampleIndices: 64,
  sampling: 72,
  outTokenIds: 80,
  outLogprobs: 88,
  logits: 96,
  historyCapacity: 104,
  biasCapacity: 108,
  historyTokenIds: 112,
  logitBiasIds: 120,
  logitBiasValues: 128,
  outTopIds: 136,
  outTopLogprobs: 144,
  size: 152,
} as const;
const SAMPLING_ROW_BYTES = 72;

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
  historyTokenIds: Int32Array;
  logitBiasIds: Int32Array;
  logitBiasValues: Float32Array;
  outTopIds: Int32Array;
  outTopLogprobs: Float32Array;
}

export class NativeEngine {
  readonly config: NativeEngineConfig;
  readonly model: NativeModelConfig;
  readonly batch: BatchView;
  private handle: Pointer | null;
  private readonly header: DataView;
  private readonly sampling: DataView;
  private callback: JSCallback | null = null;
  private pendingStep: { resolve: (status: number) => void } | null = null;
  private readonly idsScratch = new Int32Array(new ArrayBuffer(4 * 4096));

  constructor(model: NativeModelConfig, config: NativeEngineConfig, files: string[], tensors: TensorEntry[]) {
    const symbols = load();
    this.model = model;
    this.config = config;

    const modelBuf = new ArrayBuffer(48);
    const m = new DataView(modelBuf);
    [
      model.vocabSize,
      model.hiddenSize,
      model.intermediateSize,
      model.numLayers,
      model.numHeads,
      model.numKvHeads,
      model.headDim,
      model.maxPosition,
    ].forEach((v, i) => m.setUint32(i * 4, v, true));
    m.setFloat32(32, model.ropeTheta, true);
    m.setFloat32(36, model.rmsNormEps, true);
    m.setUint32(40, model.ropeInterleaved ? 1 : 0, true);
    m.setUint32(44, model.tieWordEmbeddings ? 1 : 0, true);

    const configBuf = new ArrayBuffer(32);
    const c = new DataView(configBuf);
    [
      config.numBlocks,
      config.blockSizeTokens,
      config.maxNumBatchedTokens,
      config.maxNumSeqs,
      config.maxBlocksPerSeq,
      config.numThreads,
      config.kvCacheDtype,
      config.computeDtype,
    ].forEach((v, i) => c.setUint32(i * 4, v, true));

    const filesBuf = Buffer.from(files.map((f) => `${f}\0`).join(""), "utf8");
    const tensorBuf = new ArrayBuffer(48 * Math.max(1, tensors.length));
    const t = new DataView(tensorBuf);
    tensors.forEach((e, i) => {
      const o = i * 48;
      t.setUint32(o, e.role, true);
      t.setUint32(o + 4, e.layer, true);
      t.setUint32(o + 8, e.dtype, true);
      t.setUint32(o + 12, e.fileIndex, true);
      t.setBigUint64(o + 16, BigInt(e.offset), true);
      t.setBigUint64(o + 24, BigInt(e.sizeBytes), true);
      t.setBigUint64(o + 32, BigInt(e.rows), true);
      t.setBigUint64(o + 40, BigInt(e.cols), true);
    });
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

    const batchPtr = symbols.ifn_engine_batch(this.handle);
    if (batchPtr === null) throw new EngineError(Status.INTERNAL, "engine returned no batch descriptor");
    this.header = new DataView(toArrayBuffer(batchPtr, 0, BATCH.size));
    const s = config.maxNumSeqs;
    const t32 = config.maxNumBatchedTokens;
    const view = <T>(offset: number, count: number, Ctor: new (b: ArrayBuffer) => T): T =>
      new Ctor(toArrayBuffer(read.ptr(batchPtr, offset) as Pointer, 0, count * 4));
    this.batch = {
      tokenIds: view(BATCH.tokenIds, t32, Int32Array),
      positions: view(BATCH.positions, t32, Int32Array),
      slotMapping: view(BATCH.slotMapping, t32, Int32Array),
      queryStartLoc: view(BATCH.queryStartLoc, s + 1, Int32Array),
      seqLens: view(BATCH.seqLens, s, Int32Array),
      blockTables: view(BATCH.blockTables, s * config.maxBlocksPerSeq, Int32Array),
      sampleIndices: view(BATCH.sampleIndices, s, Int32Array),
      outTokenIds: view(BATCH.outTokenIds, s, Int32Array),
      outLogprobs: view(BATCH.outLogprobs, s, Float32Array),
      logits: view(BATCH.logits, s * model.vocabSize, Float32Array),
      historyTokenIds: view(BATCH.historyTokenIds, this.header.getUint32(BATCH.historyCapacity, true), Int32Array),
      logitBiasIds: view(BATCH.logitBiasIds, this.header.getUint32(BATCH.biasCapacity, true), Int32Array),
      logitBiasValues: view(BATCH.logitBiasValues, this.header.getUint32(BATCH.biasCapacity, true), Float32Array),
      outTopIds: view(BATCH.outTopIds, s * TOP_LOGPROBS_MAX, Int32Array),
      outTopLogprobs: view(BATCH.outTopLogprobs, s * TOP_LOGPROBS_MAX, Float32Array),
    };
    this.sampling = new DataView(
      toArrayBuffer(read.ptr(batchPtr, BATCH.sampling) as Pointer, 0, s * SAMPLING_ROW_BYTES),
    );
  }

  private get ptr(): Pointer {
    if (this.handle === null) throw new EngineError(Status.INVALID_ARGUMENT, "engine already destroyed");
    return this.handle;
  }

  get kvCacheBytes(): number {
    return Number(load().ifn_engine_kv_cache_bytes(this.ptr));
  }

  setCounts(numTokens: number, numSeqs: number, numSamples: number, returnLogits: boolean): void {
    this.header.setUint32(BATCH.numTokens, numTokens, true);
    this.header.setUint32(BATCH.numSeqs, numSeqs, true);
    this.header.setUint32(BATCH.numSamples, numSamples, true);
    this.header.setUint32(BATCH.returnLogits, returnLogits ? 1 : 0, true);
  }

  setSampling(row: number, p: SamplingRow): void {
    const o = row * SAMPLING_ROW_BYTES;
    this.sampling.setFloat32(o, p.temperature, true);
    this.sampling.setFloat32(o + 4, p.topP, true);
    this.sampling.setFloat32(o + 8, p.minP, true);
    this.sampling.setInt32(o + 12, p.topK, true);
    this.sampling.setFloat32(o + 16, p.presencePenalty, true);
    this.sampling.setFloat32(o + 20, p.frequencyPenalty, true);
    this.sampling.setFloat32(o + 24, p.repetitionPenalty, true);
    this.sampling.setInt32(o + 28, p.numTopLogprobs, true);
    this.sampling.setBigUint64(o + 32, BigInt.asUintN(64, p.seed), true);
    this.sampling.setBigUint64(o + 40, BigInt(p.drawIndex), true);
    this.sampling.setInt32(o + 48, p.historyOffset, true);
    this.sampling.setInt32(o + 52, p.historyPromptLen, true);
    this.sampling.setInt32(o + 56, p.historyLen, true);
    this.sampling.setInt32(o + 60, p.biasOffset, true);
    this.sampling.setInt32(o + 64, p.biasCount, true);
    this.sampling.setInt32(o + 68, 0, true);
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
        (status: number) => {
          try {
            const pending = this.pendingStep;
            this.pendingStep = null;
            pending?.resolve(status);
          } catch {
            // Nothing to do: the awaiting side sees no resolution only if it is gone.
          }
        },
        { args: [FFIType.i32], returns: FFIType.void, threadsafe: true },
      );
      check(symbols.ifn_engine_set_callback(handle, this.callback.ptr), () => String(symbols.ifn_last_error()));
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
