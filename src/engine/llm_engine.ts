// LLMEngine: addRequest → an async stream of outputs, abort, and the step loop
// that drives the native engine on Bun's event loop: schedule(), execute(),
// postprocess(). One step is in flight at a time; while it runs on the engine
// thread, the event loop serves everything else.
import { availableParallelism } from "node:os";
import { NativeEngine } from "../ffi/native.ts";
import { loadModel, type LoadedModel } from "../model/load.ts";
import { AsyncQueue } from "./async_queue.ts";
import { IncrementalDetokenizer } from "./detokenizer.ts";
import { KvCacheManager } from "./kv_cache_manager.ts";
import { ModelRunner } from "./model_runner.ts";
import { finishReason, isFinished, Request, RequestStatus, type FinishReason, type SamplingParams } from "./request.ts";
import { Scheduler, type ScheduledRequest } from "./scheduler.ts";

export interface EngineOptions {
  maxModelLen?: number; // default: the model's own context length
  maxNumBatchedTokens: number;
  maxNumSeqs: number;
  blockSizeTokens: number;
  numBlocksOverride?: number; // fixes the pool at N blocks
  kvCacheMemoryBytes: number; // pool budget when no override
  threads: number;
}

export const DEFAULT_ENGINE_OPTIONS: EngineOptions = {
  maxNumBatchedTokens: 512,
  maxNumSeqs: 64,
  blockSizeTokens: 16,
  kvCacheMemoryBytes: 2 * 1024 ** 3,
  threads: availableParallelism(),
};

export interface RequestOutput {
  requestId: string;
  newTokenIds: number[];
  newLogprobs: number[];
  text: string; // the text these tokens add
  finished: boolean;
  finishReason: FinishReason | null;
  numPromptTokens: number;
  numOutputTokens: number;
  error?: string;
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
  readonly maxModelLen: number;
  private readonly runner: ModelRunner;
  private readonly requests = new Map<string, { req: Request; queue: AsyncQueue<RequestOutput> }>();
  private looping = false;
  private nextId = 0;
  stepCount = 0;
  /** Sees each step's schedule before it runs (metrics, tests). Must not throw. */
  stepObserver: ((scheduled: readonly ScheduledRequest[]) => void) | null = null;

  static async create(modelArg: string, options: Partial<EngineOptions> = {}): Promise<LLMEngine> {
    return new LLMEngine(await loadModel(modelArg), { ...DEFAULT_ENGINE_OPTIONS, ...options });
  }

  constructor(model: LoadedModel, readonly options: EngineOptions) {
    this.model = model;
    const c = model.spec.config;
    const maxModelLen = options.maxModelLen ?? c.maxPosition;
    if (!Number.isInteger(maxModelLen) || maxModelLen < 1 || maxModelLen > c.maxPosition) {
      throw new InvalidRequestError(`max model length ${maxModelLen} must be between 1 and the model's context length ${c.maxPosition}`, "max_model_len");
    }
    this.maxModelLen = maxModelLen;
    const bs = options.blockSizeTokens;
    const maxBlocksPerSeq = Math.ceil(maxModelLen / bs);
    const bytesPerBlock = bs * c.numLayers * 2 * c.numKvHeads * c.headDim * 4;
    const numBlocks = options.numBlocksOverride ?? Math.max(1, Math.min(Math.floor(options.kvCacheMemoryBytes / bytesPerBlock), options.maxNumSeqs * maxBlocksPerSeq));
    this.native = new NativeEngine(
      c,
      {
        numBlocks,
        blockSizeTokens: bs,
        maxNumBatchedTokens: options.maxNumBatchedTokens,
        maxNumSeqs: options.maxNumSeqs,
        maxBlocksPerSeq,
        numThreads: options.threads,
      },
      model.spec.files,
      model.spec.tensors,
    );
    this.kv = new KvCacheManager(this.native, bs, numBlocks, maxBlocksPerSeq);
    this.scheduler = new Scheduler({ maxNumBatchedTokens: options.maxNumBatchedTokens, maxNumSeqs: options.maxNumSeqs, maxModelLen }, this.kv);
    this.runner = new ModelRunner(this.native, bs);
  }

  get numBlocks(): number {
    return this.kv.numBlocks;
  }

  /** Checks a request the way the server reports it: one message naming the numbers. */
  validate(promptTokenIds: readonly number[], params: SamplingParams): void {
    if (promptTokenIds.length === 0) throw new InvalidRequestError("the prompt is empty", "prompt");
    const vocab = this.model.spec.config.vocabSize;
    for (const id of promptTokenIds) {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new InvalidRequestError(`token id ${id} is outside the vocabulary (0..${vocab - 1})`, "prompt");
    }
    if (!Number.isInteger(params.maxTokens) || params.maxTokens < 1) throw new InvalidRequestError(`max_tokens must be at least 1, got ${params.maxTokens}`, "max_tokens");
    const total = promptTokenIds.length + params.maxTokens;
    if (total > this.maxModelLen) {
      throw new InvalidRequestError(
        `this model's maximum context length is ${this.maxModelLen} tokens, but the request asks for ${total} (${promptTokenIds.length} in the prompt and ${params.maxTokens} to generate)`,
        "max_tokens",
      );
    }
    if (this.kv.blocksFor(total) > this.kv.numBlocks) {
      throw new InvalidRequestError(`the request needs ${this.kv.blocksFor(total)} KV blocks but the pool has ${this.kv.numBlocks}`, "max_tokens");
    }
    if (!(params.temperature >= 0)) throw new InvalidRequestError(`temperature must be >= 0, got ${params.temperature}`, "temperature");
    if (!(params.topP > 0 && params.topP <= 1)) throw new InvalidRequestError(`top_p must be in (0, 1], got ${params.topP}`, "top_p");
    if (!(params.minP >= 0 && params.minP <= 1)) throw new InvalidRequestError(`min_p must be in [0, 1], got ${params.minP}`, "min_p");
    if (!Number.isInteger(params.topK) || params.topK < 0) throw new InvalidRequestError(`top_k must be a non-negative integer, got ${params.topK}`, "top_k");
  }

  addRequest(promptTokenIds: readonly number[], params: SamplingParams, requestId?: string): AsyncIterable<RequestOutput> & { requestId: string } {
    this.validate(promptTokenIds, params);
    const id = requestId ?? `req-${this.nextId++}`;
    if (this.requests.has(id)) throw new InvalidRequestError(`request id ${id} is already in use`, "request_id");
    const seed = params.seed === null ? BigInt(Math.floor(Math.random() * 2 ** 53)) : BigInt(params.seed);
    const req = new Request(id, promptTokenIds, params, seed, new IncrementalDetokenizer(this.model.tokenizer, promptTokenIds.length));
    const queue = new AsyncQueue<RequestOutput>(() => this.abort(id));
    this.requests.set(id, { req, queue });
    this.scheduler.add(req);
    this.kick();
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

  private kick(): void {
    if (this.looping) return;
    this.looping = true;
    void this.loop().finally(() => {
      this.looping = false;
    });
  }

  private async loop(): Promise<void> {
    while (this.scheduler.hasWork) {
      const scheduled = this.scheduler.schedule();
      if (scheduled.length === 0) {
        // Unreachable while validate() bounds every request by the pool size; fail loudly rather than spin.
        const head = this.scheduler.waiting[0];
        if (head) this.finish(head, RequestStatus.FINISHED_ERROR, "the KV pool cannot hold this request");
        continue;
      }
      this.stepObserver?.(scheduled);
      let sampled;
      try {
        sampled = await this.runner.execute(scheduled);
      } catch (e) {
        for (const { req } of scheduled) this.finish(req, RequestStatus.FINISHED_ERROR, (e as Error).message);
        continue;
      }
      this.stepCount += 1;
      for (const { req, numNewTokens } of scheduled) {
        // An abort that arrived during the step already freed the request.
        if (!isFinished(req.status)) req.numComputedTokens += numNewTokens;
      }
      for (const s of sampled) {
        if (isFinished(s.req.status)) continue;
        this.append(s.req, s.tokenId, s.logprob);
      }
    }
  }

  private append(req: Request, tokenId: number, logprob: number): void {
    const entry = this.requests.get(req.id);
    if (!entry) return;
    req.tokenIds.push(tokenId);
    req.logprobs.push(logprob);
    req.firstTokenMs ??= performance.now();
    const p = req.params;
    const stopped = (!p.ignoreEos && this.model.spec.eosTokenIds.includes(tokenId)) || p.stopTokenIds.includes(tokenId);
    const status = stopped
      ? RequestStatus.FINISHED_STOPPED
      : req.numOutputTokens >= p.maxTokens || req.numTokens >= this.maxModelLen
        ? RequestStatus.FINISHED_LENGTH
        : null;
    // A stop token ends the text; it is not part of it.
    const text = stopped ? "" : (req.detokenizer?.next(req.tokenIds) ?? "");
    const tail = status !== null && !stopped ? (req.detokenizer?.flush(req.tokenIds) ?? "") : "";
    entry.queue.push({
      requestId: req.id,
      newTokenIds: [tokenId],
      newLogprobs: [logprob],
      text: text + tail,
      finished: status !== null,
      finishReason: status !== null ? finishReason(status) : null,
      numPromptTokens: req.promptTokenIds.length,
      numOutputTokens: req.numOutputTokens,
    });
    if (status !== null) this.finish(req, status);
  }

  private finish(req: Request, status: RequestStatus, error?: string): void {
    const entry = this.requests.get(req.id);
    if (!entry) return;
    this.requests.delete(req.id);
    this.scheduler.remove(req);
    const alreadyReported = status === RequestStatus.FINISHED_STOPPED || status === RequestStatus.FINISHED_LENGTH;
    req.status = status;
    if (!alreadyReported) {
      entry.queue.push({
        requestId: req.id,
        newTokenIds: [],
        newLogprobs: [],
        text: "",
        finished: true,
        finishReason: finishReason(status),
        numPromptTokens: req.promptTokenIds.length,
        numOutputTokens: req.numOutputTokens,
        ...(error ? { error } : {}),
      });
    }
    entry.queue.close();
  }

  /** Waits for the step in flight, then frees the native engine. */
  async shutdown(): Promise<void> {
    for (const id of [...this.requests.keys()]) this.abort(id);
    while (this.looping) await Bun.sleep(1);
    this.native.destroy();
  }
}
