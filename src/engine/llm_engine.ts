// LLMEngine: addRequest → an async stream of outputs, abort, and the step loop
// that drives the native engine on Bun's event loop: schedule(), execute(),
// postprocess(). One step is in flight at a time; while it runs on the engine
// thread, the event loop serves everything else.
import { availableParallelism } from "node:os";
import { DType, LOGIT_BIAS_MAX, NativeEngine, resolveDevice, TOP_LOGPROBS_MAX } from "../ffi/native.ts";
import { withRope } from "../model/config.ts";
import { loadModel, type LoadedModel, type LoadFormat } from "../model/load.ts";
import { AsyncQueue } from "./async_queue.ts";
import { KvCacheManager } from "./kv_cache_manager.ts";
import { GrammarService } from "./grammar.ts";
import { Utf8Guard } from "./utf8_guard.ts";
import { EngineMetrics, type MetricsPrefix } from "./metrics.ts";
import { ModelRunner, type LaunchedStep, type SampledToken } from "./model_runner.ts";
import { OutputText } from "./output.ts";
import {
  finishReason,
  isFinished,
  Request,
  RequestStatus,
  type FinishReason,
  type SamplingParams,
  type TokenLogprob,
} from "./request.ts";
import { Scheduler, type ScheduledRequest } from "./scheduler.ts";

export interface EngineOptions {
  maxModelLen?: number; // default: the model's own context length
  maxNumBatchedTokens?: number; // tokens in one step; default: the device's (below)
  maxNumSeqs: number;
  maxQueueLen: number;
  blockSizeTokens: number;
  numBlocksOverride?: number; // fixes the pool at N blocks
  kvCacheMemoryBytes: number | null; // pool budget when no override; null: the device's default
  enablePrefixCaching: boolean;
  // auto: the weights' own, as vLLM (f32 for f32 models, where results stay exact; f16 for f16,
  // bf16 and quantized ones, halving what a long context's decode reads)
  kvCacheDtype: "auto" | "f32" | "f16";
  // Float weights: f32 products (exact), or repacked to bf16 at load and multiplied in bf16
  // (twice the rate where the CPU has AVX-512 BF16; vLLM's CPU default for f16 models).
  computeDtype: "f32" | "bf16";
  threads: number;
  // Which engine library: the CPU's, CUDA's, or (auto) CUDA's where it finds a GPU.
  device: "auto" | "cpu" | "cuda";
  gpuMemoryUtilization: number; // CUDA: share of the device's memory for weights, workspace and KV (vLLM's)
  enforceEager: boolean; // CUDA: no CUDA graphs
  // Schedule and queue the next step while one runs (vLLM's async scheduling): the JS work
  // between steps overlaps the engine's compute.
  asyncScheduling: boolean;
  loadFormat?: LoadFormat; // dummy: the model's shape with random weights (CUDA), for benchmarks
  servedModelName?: string;
  metricsPrefix?: MetricsPrefix; // "vllm": metrics under vLLM's names, for routers that read them
}

/** vLLM's --dtype names (and short ones) to the compute dtype ("auto" keeps f32 products); null if unknown. */
export function computeDtypeOf(v: string): "f32" | "bf16" | null {
  if (["auto", "float32", "float", "f32"].includes(v)) return "f32";
  if (["bfloat16", "bf16"].includes(v)) return "bf16";
  return null;
}

export const DEFAULT_ENGINE_OPTIONS: EngineOptions = {
  maxNumSeqs: 64,
  maxQueueLen: 1024,
  blockSizeTokens: 16,
  kvCacheMemoryBytes: null,
  enablePrefixCaching: true,
  kvCacheDtype: "auto",
  computeDtype: "f32",
  threads: availableParallelism(),
  device: "auto",
  gpuMemoryUtilization: 0.9,
  enforceEager: false,
  asyncScheduling: true,
};

/** The CPU's KV pool budget when none is given (a GPU's comes from --gpu-memory-utilization). */
const CPU_KV_CACHE_BYTES = 2 * 1024 ** 3;
/**
 * Tokens a step takes by default: on the CPU a 256-token prefill chunk already stalls the decodes
 * sharing its step for ~0.4 s (110M model); a GPU's GEMMs reach their rate only with thousands.
 */
const DEFAULT_STEP_TOKENS = { cpu: 256, cuda: 8192 } as const;

/** A step queued on the engine, and how far each of its requests has computed once it ends. */
interface InFlightStep {
  launched: LaunchedStep;
  computedAfter: Map<Request, { tokens: number; preemptions: number }>;
  computing: Set<bigint>; // hashes of the full blocks it computes, cached once it ends
}

export interface RequestOutput {
  requestId: string;
  newTokenIds: number[];
  newLogprobs: TokenLogprob[]; // one per new token (top alternatives when asked)
  text: string; // the text these tokens add
  finished: boolean;
  finishReason: FinishReason | null;
  stopReason: string | number | null; // the stop string or stop token that ended it
  numPromptTokens: number;
  numOutputTokens: number;
  numCachedTokens: number;
  timings?: RequestTimings; // on the last output of a request
  error?: string;
}

/** Where a request's outputs go: push for each, close after the last. */
export interface OutputSink {
  push(out: RequestOutput): void;
  close(): void;
}

/** Where a request's time went, in milliseconds. */
export interface RequestTimings {
  queueMs: number; // arrival to first scheduled
  prefillMs: number; // first scheduled to first token
  firstTokenMs: number; // arrival to first token
  perTokenMs: number; // mean time between output tokens
  e2eMs: number; // arrival to finish
}

function timingsOf(req: Request, now: number): RequestTimings {
  const scheduled = req.firstScheduledMs ?? now;
  const first = req.firstTokenMs ?? now;
  return {
    queueMs: scheduled - req.arrivalMs,
    prefillMs: first - scheduled,
    firstTokenMs: first - req.arrivalMs,
    perTokenMs: req.numOutputTokens > 1 ? ((req.lastTokenMs ?? now) - first) / (req.numOutputTokens - 1) : 0,
    e2eMs: now - req.arrivalMs,
  };
}

/** A request the engine refuses before it queues it (the server maps it to a 400). */
export class InvalidRequestError extends Error {
  constructor(
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = "InvalidRequestError";
  }
}

export class LLMEngine {
  readonly model: LoadedModel;
  readonly native: NativeEngine;
  readonly kv: KvCacheManager;
  readonly scheduler: Scheduler;
  readonly metrics: EngineMetrics;
  /** Structured output's matchers (xgrammar on a worker thread, started on first use). */
  readonly grammar: GrammarService;
  readonly maxModelLen: number;
  /** Tokens in one step (the option, or the device's default). */
  readonly maxNumBatchedTokens: number;
  readonly kvCacheDtype: "f32" | "f16"; // as resolved from the option
  /** Why --device auto took the CPU (null: as asked). */
  readonly deviceNote: string | null;
  readonly runner: ModelRunner;
  // pending: sampled tokens whose text is held back (stop strings, half a character), oldest first.
  private readonly requests = new Map<string, { req: Request; sink: OutputSink; pending: TokenLogprob[] }>();
  private looping = false;
  private nextId = 0;
  stepCount = 0;
  /** Sees each step's schedule before it runs (tests, tracing). Must not throw. */
  stepObserver: ((scheduled: readonly ScheduledRequest[]) => void) | null = null;

  static async create(modelArg: string, options: Partial<EngineOptions> = {}): Promise<LLMEngine> {
    return new LLMEngine(await loadModel(modelArg, options.loadFormat), {
      ...DEFAULT_ENGINE_OPTIONS,
      servedModelName: modelArg,
      ...options,
    });
  }

  constructor(
    model: LoadedModel,
    readonly options: EngineOptions,
  ) {
    this.model = model;
    const c = model.spec.config;
    const maxModelLen = options.maxModelLen ?? c.maxPosition;
    if (!Number.isInteger(maxModelLen) || maxModelLen < 1 || maxModelLen > c.maxPosition) {
      throw new InvalidRequestError(
        `max model length ${maxModelLen} must be between 1 and the model's context length ${c.maxPosition}`,
        "max_model_len",
      );
    }
    this.maxModelLen = maxModelLen;
    const kv = options.kvCacheDtype;
    this.kvCacheDtype = kv === "auto" ? (model.spec.dtype === "f32" ? "f32" : "f16") : kv;
    const bs = options.blockSizeTokens;
    const maxBlocksPerSeq = Math.ceil(maxModelLen / bs);
    // The engine sizes the pool from the byte budget (it knows what a block costs on its device).
    // RoPE for the length served (LongRoPE's factors depend on it).
    const rope = { ...c };
    withRope(rope, model.spec.ropeScaling, maxModelLen);
    const { device, note } = resolveDevice(options.device);
    this.deviceNote = note;
    const stepTokens = options.maxNumBatchedTokens ?? DEFAULT_STEP_TOKENS[device];
    this.maxNumBatchedTokens = stepTokens;
    this.native = new NativeEngine(
      rope,
      {
        numBlocks: options.numBlocksOverride ?? 0,
        kvCacheBytes: options.kvCacheMemoryBytes ?? (device === "cpu" ? CPU_KV_CACHE_BYTES : 0),
        blockSizeTokens: bs,
        maxNumBatchedTokens: stepTokens,
        maxNumSeqs: options.maxNumSeqs,
        maxBlocksPerSeq,
        kvCacheDtype: this.kvCacheDtype === "f16" ? DType.F16 : DType.F32,
        cpu: { numThreads: options.threads, computeDtype: options.computeDtype === "bf16" ? DType.BF16 : DType.F32 },
        cuda: {
          deviceOrdinal: 0,
          enforceEager: options.enforceEager,
          memoryUtilization: options.gpuMemoryUtilization,
          computeDtype: options.computeDtype === "bf16" ? DType.BF16 : DType.F32,
        },
      },
      model.spec.files,
      model.spec.tensors,
      device,
    );
    const numBlocks = this.native.numBlocks;
    // Blocks behind the window go back to the pool only when every layer has one (Mistral).
    const window = c.slidingWindow ?? 0;
    const pattern = c.slidingWindowPattern ?? 0;
    const everyLayerLocal = window > 0 && (pattern === 0 || pattern > c.numLayers);
    this.kv = new KvCacheManager(
      this.native,
      bs,
      numBlocks,
      maxBlocksPerSeq,
      options.enablePrefixCaching,
      everyLayerLocal ? window : 0,
    );
    this.scheduler = new Scheduler(
      {
        maxNumBatchedTokens: stepTokens,
        maxNumSeqs: options.maxNumSeqs,
        maxQueueLen: options.maxQueueLen,
      },
      this.kv,
    );
    this.runner = new ModelRunner(this.native, bs, model.spec.eosTokenIds);
    this.grammar = new GrammarService(model.tokenizer, c.vocabSize, model.spec.eosTokenIds);
    // A GPU's compute leaves the host's cores to the mask workers.
    this.overlapMasks = device === "cuda" || availableParallelism() > options.threads;
    this.metrics = new EngineMetrics(
      {
        numRunning: () => this.numRunning,
        numWaiting: () => this.numWaiting,
        kvCacheUsage: () => this.kv.usage,
        gpu: device === "cuda" ? () => this.native.deviceInfo() : null,
      },
      options.servedModelName ?? "model",
      { blockSizeTokens: bs, numBlocks, enablePrefixCaching: options.enablePrefixCaching },
      options.metricsPrefix,
    );
  }

  get numBlocks(): number {
    return this.kv.numBlocks;
  }

  /** Checks a request the way the server reports it: one message naming the numbers. */
  validate(promptTokenIds: readonly number[], params: SamplingParams): void {
    if (promptTokenIds.length === 0) throw new InvalidRequestError("the prompt is empty", "prompt");
    const vocab = this.model.spec.config.vocabSize;
    const inVocab = (id: number) => Number.isInteger(id) && id >= 0 && id < vocab;
    for (const id of promptTokenIds) {
      if (!inVocab(id))
        throw new InvalidRequestError(`token id ${id} is outside the vocabulary (0..${vocab - 1})`, "prompt");
    }
    if (!Number.isInteger(params.maxTokens) || params.maxTokens < 1)
      throw new InvalidRequestError(`max_tokens must be at least 1, got ${params.maxTokens}`, "max_tokens");
    const total = promptTokenIds.length + params.maxTokens;
    if (total > this.maxModelLen) {
      throw new InvalidRequestError(
        `this model's maximum context length is ${this.maxModelLen} tokens, but the request asks for ${total} (${promptTokenIds.length} in the prompt and ${params.maxTokens} to generate)`,
        "max_tokens",
      );
    }
    const held = this.kv.blocksHeld(total, this.maxNumBatchedTokens);
    if (held > this.kv.numBlocks) {
      throw new InvalidRequestError(
        `the request needs ${held} KV blocks but the pool has ${this.kv.numBlocks}`,
        "max_tokens",
      );
    }
    const check = (ok: boolean, param: string, message: string) => {
      if (!ok) throw new InvalidRequestError(message, param);
    };
    check(
      params.temperature >= 0 && params.temperature <= 100,
      "temperature",
      `temperature must be in [0, 100], got ${params.temperature}`,
    );
    check(params.topP > 0 && params.topP <= 1, "top_p", `top_p must be in (0, 1], got ${params.topP}`);
    check(params.minP >= 0 && params.minP <= 1, "min_p", `min_p must be in [0, 1], got ${params.minP}`);
    check(
      Number.isInteger(params.topK) && params.topK >= 0,
      "top_k",
      `top_k must be a non-negative integer, got ${params.topK}`,
    );
    check(
      params.presencePenalty >= -2 && params.presencePenalty <= 2,
      "presence_penalty",
      `presence_penalty must be in [-2, 2], got ${params.presencePenalty}`,
    );
    check(
      params.frequencyPenalty >= -2 && params.frequencyPenalty <= 2,
      "frequency_penalty",
      `frequency_penalty must be in [-2, 2], got ${params.frequencyPenalty}`,
    );
    check(
      params.repetitionPenalty > 0 && params.repetitionPenalty <= 10,
      "repetition_penalty",
      `repetition_penalty must be in (0, 10], got ${params.repetitionPenalty}`,
    );
    check(
      Number.isInteger(params.minTokens) && params.minTokens >= 0 && params.minTokens <= params.maxTokens,
      "min_tokens",
      `min_tokens must be between 0 and max_tokens, got ${params.minTokens}`,
    );
    check(
      params.logprobs === null ||
        (Number.isInteger(params.logprobs) && params.logprobs >= 0 && params.logprobs <= TOP_LOGPROBS_MAX),
      "logprobs",
      `logprobs must be between 0 and ${TOP_LOGPROBS_MAX}`,
    );
    const biasIds = Object.keys(params.logitBias ?? {}).map(Number);
    for (const id of biasIds)
      check(inVocab(id), "logit_bias", `logit_bias names token ${id}, outside the vocabulary (0..${vocab - 1})`);
    for (const v of Object.values(params.logitBias ?? {}))
      check(
        Number.isFinite(v) && v >= -100 && v <= 100,
        "logit_bias",
        `logit_bias values must be in [-100, 100], got ${v}`,
      );
    for (const id of params.stopTokenIds)
      check(inVocab(id), "stop_token_ids", `stop token ${id} is outside the vocabulary`);
    check(
      biasIds.length + params.stopTokenIds.length + this.model.spec.eosTokenIds.length <= LOGIT_BIAS_MAX,
      "logit_bias",
      `at most ${LOGIT_BIAS_MAX} logit_bias entries`,
    );
    check(
      params.stop.every((s) => typeof s === "string" && s.length > 0),
      "stop",
      "stop strings must be non-empty",
    );
  }

  /**
   * Queues a sequence; its outputs go to `sink` as each step makes them, then `sink.close()`.
   * groupId: the API call it belongs to; the scheduler is fair between groups (default: its own).
   * Returns the request id (for abort).
   */
  submit(
    promptTokenIds: readonly number[],
    params: SamplingParams,
    sink: OutputSink,
    groupId?: string,
    matcher: number | null = null,
  ): string {
    this.validate(promptTokenIds, params);
    const id = `req-${this.nextId++}`;
    const seed = params.seed === null ? BigInt(Math.floor(Math.random() * 2 ** 53)) : BigInt(params.seed);
    const output = new OutputText(this.model.tokenizer, promptTokenIds.length, params.stop);
    const req = new Request(id, promptTokenIds, params, seed, output, groupId ?? id);
    this.scheduler.add(req); // throws QueueFullError when the waiting queue is at its bound
    req.matcher = matcher; // the request owns it from here: finish() closes it
    this.requests.set(id, { req, sink, pending: [] });
    this.metrics.promptTokens.inc(promptTokenIds.length);
    this.kick();
    return id;
  }

  /** submit() as an async stream of outputs; leaving the loop early aborts the request. */
  addRequest(
    promptTokenIds: readonly number[],
    params: SamplingParams,
    groupId?: string,
  ): AsyncIterable<RequestOutput> & { requestId: string } {
    let id = "";
    const queue = new AsyncQueue<RequestOutput>(() => this.abort(id));
    id = this.submit(promptTokenIds, params, queue, groupId);
    return Object.assign(queue, { requestId: id });
  }

  /** Stops a request wherever it is and returns its blocks now; its stream ends with "abort". */
  abort(requestId: string): void {
    const entry = this.requests.get(requestId);
    if (!entry) return;
    this.finish(entry.req, RequestStatus.FINISHED_ABORTED);
  }

  get numRunning(): number {
    return this.scheduler.running.length;
  }

  get numWaiting(): number {
    return this.scheduler.waiting.length;
  }

  get numUnfinished(): number {
    return this.requests.size;
  }

  private kick(): void {
    if (this.looping) return;
    this.looping = true;
    void this.loop().finally(() => {
      this.looping = false;
    });
  }

  /**
   * The step loop. With async scheduling, the next step is scheduled and queued while the one
   * before it runs (its decode tokens are placeholders for what that step draws), and the
   * outputs of a step are handled while the next one computes. A request that a step's output
   * ends was scheduled once more: that step's draw for it is dropped, and its blocks are already
   * back in the pool (the engine runs steps in order, so no later step sees what it wrote there).
   */
  private async loop(): Promise<void> {
    let inFlight: InFlightStep | null = null;
    while (this.scheduler.hasWork || inFlight !== null) {
      const pipeline: boolean = inFlight === null || (this.options.asyncScheduling && this.mayPipeline(inFlight));
      const next: InFlightStep | null = pipeline && this.scheduler.hasWork ? await this.launch(inFlight) : null;
      if (inFlight !== null) await this.complete(inFlight);
      inFlight = next;
    }
  }

  /** Where masks are written before the step is queued, a constrained request waits for its last draw. */
  private mayPipeline(step: InFlightStep): boolean {
    return this.overlapMasks || !step.launched.sampled.some((r) => r.matcher !== null);
  }

  /** Schedules and queues one step; null when nothing could be scheduled. */
  private async launch(behind: InFlightStep | null): Promise<InFlightStep | null> {
    const preemptionsBefore = this.scheduler.numPreemptions;
    const hitsBefore = this.kv.numPrefixHitTokens;
    const queriesBefore = this.kv.numPrefixQueryTokens;
    let scheduled = this.scheduler.schedule(behind?.computing);
    this.metrics.preemptions.inc(this.scheduler.numPreemptions - preemptionsBefore);
    this.metrics.prefixCacheHits.inc(this.kv.numPrefixHitTokens - hitsBefore);
    this.metrics.prefixCacheQueries.inc(this.kv.numPrefixQueryTokens - queriesBefore);
    if (scheduled.length === 0) {
      // Behind a step in flight, the running requests may all be waiting for its draws.
      // Otherwise unreachable while validate() bounds every request by the pool size; fail
      // loudly rather than spin.
      if (behind !== null) return null;
      const head = this.scheduler.waiting[0];
      if (head) this.finish(head, RequestStatus.FINISHED_ERROR, "the KV pool cannot hold this request");
      else if (this.scheduler.running[0])
        this.finish(this.scheduler.running[0], RequestStatus.FINISHED_ERROR, "nothing could be scheduled for it");
      return null;
    }
    this.stepObserver?.(scheduled);
    // The observer may abort; an aborted request has already given its blocks back.
    scheduled = scheduled.filter((s) => !isFinished(s.req.status));
    if (scheduled.length === 0) return null;
    let launched: LaunchedStep;
    try {
      launched = await this.runner.launch(scheduled, this.grammarMasks(scheduled), this.overlapMasks);
    } catch (e) {
      for (const { req } of scheduled) this.finish(req, RequestStatus.FINISHED_ERROR, (e as Error).message);
      return null;
    }
    // The step's tokens count as computed from now on, and its draws as pending, so that
    // the next step can be scheduled before this one ends.
    const computedAfter = new Map<Request, { tokens: number; preemptions: number }>();
    const computing = new Set<bigint>();
    const bs = this.options.blockSizeTokens;
    for (const { req, numNewTokens } of scheduled) {
      // Blocks this step fills whose tokens are all known (not a placeholder's).
      const known = Math.min(req.numComputedTokens + numNewTokens, req.tokenIds.length);
      for (const h of this.kv.fullBlockHashes(req, known).slice(Math.floor(req.numComputedTokens / bs)))
        computing.add(h);
      req.numComputedTokens += numNewTokens;
      computedAfter.set(req, { tokens: req.numComputedTokens, preemptions: req.numPreemptions });
    }
    for (const req of launched.sampled) req.numPendingTokens += 1;
    return { launched, computedAfter, computing };
  }

  /** Waits for a step and hands out what it drew. */
  private async complete(step: InFlightStep): Promise<void> {
    let sampled: SampledToken[];
    try {
      sampled = await this.runner.collect(step.launched);
    } catch (e) {
      for (const req of step.launched.sampled) req.numPendingTokens -= 1;
      for (const { req } of step.launched.scheduled)
        this.finish(req, RequestStatus.FINISHED_ERROR, (e as Error).message);
      return;
    }
    this.stepCount += 1;
    for (const [req, after] of step.computedAfter) {
      // Aborted or preempted since: its blocks went back already.
      if (isFinished(req.status) || req.numPreemptions !== after.preemptions) continue;
      this.kv.cacheFullBlocks(req, after.tokens);
      this.kv.releaseOutsideWindow(req, after.tokens);
    }
    for (const s of sampled) {
      s.req.numPendingTokens -= 1;
      if (!isFinished(s.req.status)) this.append(s);
    }
  }

  /**
   * Grammar masks are made while the forward pass runs only where cores are left for them;
   * with every core in the compute pool, the mask workers would take them from the matmuls.
   */
  private readonly overlapMasks: boolean;

  private readonly guards = new Map<boolean, Utf8Guard>();
  /** Built on first use (it reads every token's bytes once); JSON also bans raw control characters. */
  private utf8Guard(json: boolean): Utf8Guard {
    let g = this.guards.get(json);
    if (!g) {
      g = new Utf8Guard(this.model.tokenizer, this.model.spec.config.vocabSize, this.model.spec.eosTokenIds, json);
      this.guards.set(json, g);
    }
    return g;
  }

  /**
   * The allowed-token masks of the constrained requests that sample in this step, as they
   * come (made while the step's forward pass runs). A mask that fails ends its request
   * once the step is done; its row then allows every token and its sample is dropped.
   */
  private grammarMasks(scheduled: readonly ScheduledRequest[]): Map<Request, Promise<Int32Array | null>> {
    const masks = new Map<Request, Promise<Int32Array | null>>();
    for (const { req, numNewTokens } of scheduled) {
      if (req.matcher === null || req.numComputedTokens + numNewTokens !== req.numTokens) continue;
      const matcher = req.matcher;
      const guard = this.utf8Guard(this.grammar.isJson(matcher));
      let next: Promise<Int32Array | null>;
      if (req.numPendingTokens > 0) {
        // The step in flight is drawing its last token: the mask follows that token (append).
        next = new Promise((resolve) => (req.maskWaiter = resolve));
      } else {
        next = req.nextMask ?? this.grammar.mask(matcher);
        req.nextMask = null;
      }
      masks.set(
        req,
        next.then(
          // The guard's state is read once the mask is there: after the token it follows.
          (m) => (m === null ? null : guard.apply(m, req.utf8State)),
          (e: Error) => {
            queueMicrotask(() => this.finish(req, RequestStatus.FINISHED_ERROR, e.message));
            return null;
          },
        ),
      );
    }
    return masks;
  }

  private append(s: SampledToken): void {
    const req = s.req;
    const entry = this.requests.get(req.id);
    if (!entry) return;
    const p = req.params;
    // Before this token; a grammar that allows only the end ends the request whatever min_tokens says.
    const heldOff = req.matcher === null && req.numOutputTokens < p.minTokens;
    // The grammar follows every token; it allowed this one, and its next mask will follow.
    if (req.matcher !== null) {
      void this.grammar.accept(req.matcher, s.tokenId).catch(() => {});
      req.utf8State = this.utf8Guard(this.grammar.isJson(req.matcher)).next(req.utf8State, s.tokenId);
    }
    req.tokenIds.push(s.tokenId);
    const now = performance.now();
    if (req.firstTokenMs === null) {
      req.firstTokenMs = now;
      this.metrics.timeToFirstToken.observe((now - req.arrivalMs) / 1000);
      this.metrics.queueTime.observe(((req.firstScheduledMs ?? now) - req.arrivalMs) / 1000);
    } else this.metrics.interTokenLatency.observe((now - (req.lastTokenMs ?? now)) / 1000);
    req.lastTokenMs = now;
    this.metrics.generationTokens.inc();

    const stopToken =
      !heldOff &&
      (((!p.ignoreEos || req.matcher !== null) && this.model.spec.eosTokenIds.includes(s.tokenId)) ||
        p.stopTokenIds.includes(s.tokenId));
    const atLength = req.numOutputTokens >= p.maxTokens || req.tokenIds.length >= this.maxModelLen;
    entry.pending.push({ tokenId: s.tokenId, logprob: s.logprob, top: s.top });
    let text = "";
    let released = entry.pending.length; // without a detokenizer, every token goes out at once
    let stopString = false;
    if (stopToken && req.output) {
      // A stop token ends the text and is not part of it.
      req.output.addSilent();
      ({ delta: text, released } = req.output.flush(req.tokenIds.slice(0, -1)));
    } else if (req.output) {
      const u = req.output.update(req.tokenIds, req.numOutputTokens > p.minTokens, atLength);
      ({ delta: text, released } = u);
      stopString = u.stopped;
    }
    const status =
      stopToken || stopString ? RequestStatus.FINISHED_STOPPED : atLength ? RequestStatus.FINISHED_LENGTH : null;
    const tokens = entry.pending.splice(0, released);
    entry.sink.push({
      requestId: req.id,
      newTokenIds: tokens.map((t) => t.tokenId),
      newLogprobs: tokens,
      text,
      finished: status !== null,
      finishReason: status !== null ? finishReason(status) : null,
      stopReason: stopString
        ? req.output!.stopString
        : stopToken && !this.model.spec.eosTokenIds.includes(s.tokenId)
          ? s.tokenId
          : null,
      numPromptTokens: req.promptTokenIds.length,
      numOutputTokens: req.numOutputTokens,
      numCachedTokens: req.numCachedPromptTokens ?? 0,
      ...(status !== null ? { timings: timingsOf(req, now) } : {}),
    });
    if (status !== null) this.finish(req, status);
    else if (req.matcher !== null) {
      // The next mask is asked for now (the worker takes it after the accept), so that it is
      // made while this step's outputs go out and the next step is scheduled. Never after the
      // end: a matcher that accepted its stop token has no next mask (xgrammar aborts).
      const mask = this.grammar.mask(req.matcher);
      mask.catch(() => {}); // a failure is reported when the step takes it
      if (req.maskWaiter !== null) {
        req.maskWaiter(mask);
        req.maskWaiter = null;
      } else req.nextMask = mask;
    }
  }

  private finish(req: Request, status: RequestStatus, error?: string): void {
    const entry = this.requests.get(req.id);
    if (!entry) return;
    this.requests.delete(req.id);
    this.scheduler.remove(req);
    // A step queued behind the one that ended it may wait for its mask: it allows every token.
    req.maskWaiter?.(null);
    req.maskWaiter = null;
    if (req.matcher !== null) this.grammar.close(req.matcher);
    const alreadyReported = status === RequestStatus.FINISHED_STOPPED || status === RequestStatus.FINISHED_LENGTH;
    req.status = status;
    this.metrics.e2eLatency.observe((performance.now() - req.arrivalMs) / 1000);
    this.metrics.requestSuccess.inc({ finished_reason: finishReason(status) ?? "unknown" });
    if (!alreadyReported) {
      // An abort or error still reports what was generated and held back.
      const text = req.output?.flush(req.tokenIds).delta ?? "";
      entry.sink.push({
        requestId: req.id,
        newTokenIds: entry.pending.map((t) => t.tokenId),
        newLogprobs: entry.pending,
        text,
        finished: true,
        finishReason: finishReason(status),
        stopReason: null,
        numPromptTokens: req.promptTokenIds.length,
        numOutputTokens: req.numOutputTokens,
        numCachedTokens: req.numCachedPromptTokens ?? 0,
        timings: timingsOf(req, performance.now()),
        ...(error ? { error } : {}),
      });
    }
    entry.sink.close();
  }

  /** Aborts what is left, waits for the step in flight, then frees the native engine. */
  async shutdown(): Promise<void> {
    for (const id of [...this.requests.keys()]) this.abort(id);
    while (this.looping) await Bun.sleep(1);
    this.native.destroy();
    this.grammar.terminate();
  }
}
