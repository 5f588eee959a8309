// Turns a schedule into one of the engine's flat step descriptors, queues the step, and
// reads back the sampled tokens when it ends. The descriptors' arrays are engine-owned and
// reused, so a step allocates nothing on the native side.
//
// Two descriptors take turns: while one step runs, the next is filled and queued behind it
// (async scheduling). A decode token whose value the running step is still drawing goes in
// as a placeholder (drawOfStepBefore: the engine fills it in from that step's draw).
import { drawOfStepBefore, LOGIT_BIAS_MAX, NUM_BATCHES, TOP_LOGPROBS_MAX, type NativeEngine } from "../ffi/native.ts";
import { RequestStatus, type Request, type TokenLogprob } from "./request.ts";
import type { ScheduledRequest } from "./scheduler.ts";

export interface SampledToken extends TokenLogprob {
  req: Request;
  logits: Float32Array | null; // a copy, only when asked for
}

/** A step handed to the engine, until its tokens are read. */
export interface LaunchedStep {
  readonly index: number; // its descriptor
  readonly scheduled: readonly ScheduledRequest[];
  readonly sampled: readonly Request[]; // by row
  readonly returnLogits: boolean;
  readonly done: Promise<void>; // the engine's step; rejects with its error
}

export class ModelRunner {
  /** Engine-side sequence states (penalties' token counts) of running requests, by slot. */
  private readonly stateSlots = new Map<Request, number>();
  private readonly freeSlots: number[];
  /** Steps queued and not yet collected, oldest first. */
  private readonly inFlight: LaunchedStep[] = [];
  /** Rows of the step launched last, by request: what a placeholder in the next step names. */
  private lastRows = new Map<Request, number>();
  private launches = 0;

  constructor(
    private readonly engine: NativeEngine,
    readonly blockSizeTokens: number,
    private readonly eosTokenIds: readonly number[],
  ) {
    this.freeSlots = Array.from({ length: engine.config.maxNumSeqs }, (_, i) => engine.config.maxNumSeqs - 1 - i);
  }

  get numInFlight(): number {
    return this.inFlight.length;
  }

  /**
   * The slot of a request's sequence state in the engine, opened with its tokens so far the
   * first time it samples with penalties; the engine appends each token it draws there, so its
   * history crosses once. A request that stopped running (finished, aborted, preempted) gives
   * its slot back at the next step that no step in flight still names it in; one that runs
   * again reopens with its tokens then.
   */
  private stateSlot(req: Request): number {
    const held = this.stateSlots.get(req);
    if (held !== undefined) return held;
    const slot = this.freeSlots.pop();
    if (slot === undefined) throw new Error("no sequence state slot free");
    this.engine.openSeqState(slot, req.tokenIds, req.promptTokenIds.length);
    this.stateSlots.set(req, slot);
    return slot;
  }

  private closeIdleStates(): void {
    for (const [req, slot] of this.stateSlots) {
      if (req.status === RequestStatus.RUNNING) continue;
      if (this.inFlight.some((step) => step.sampled.includes(req))) continue;
      this.engine.closeSeqState(slot);
      this.stateSlots.delete(req);
      this.freeSlots.push(slot);
    }
  }

  /**
   * Fills descriptor `index`; returns the requests whose last token is in this step (they
   * sample), by row. masked: the sampling requests whose rows take a grammar's bitmask.
   */
  private prepare(
    index: number,
    scheduled: readonly ScheduledRequest[],
    returnLogits: boolean,
    masked: ReadonlySet<Request>,
  ): Request[] {
    const d = this.engine.descriptors[index];
    const b = d.batch;
    const bs = this.blockSizeTokens;
    const maxBlocks = this.engine.config.maxBlocksPerSeq;
    const sampled: Request[] = [];
    let t = 0;
    let biasCursor = 0;
    this.closeIdleStates();
    scheduled.forEach(({ req, numNewTokens }, s) => {
      b.queryStartLoc[s] = t;
      for (let j = 0; j < numNewTokens; j++, t++) {
        const pos = req.numComputedTokens + j;
        b.tokenIds[t] = pos < req.tokenIds.length ? req.tokenIds[pos] : this.placeholder(req, pos);
        b.positions[t] = pos;
        b.slotMapping[t] = req.blockTable[Math.floor(pos / bs)] * bs + (pos % bs);
      }
      b.seqLens[s] = req.numComputedTokens + numNewTokens;
      b.blockTables.set(req.blockTable, s * maxBlocks);
      if (req.numComputedTokens + numNewTokens !== req.numTokens) return;

      const row = sampled.length;
      b.sampleIndices[row] = t - 1;
      const p = req.params;
      const penalties = p.presencePenalty !== 0 || p.frequencyPenalty !== 0 || p.repetitionPenalty !== 1;
      const biasOffset = biasCursor;
      b.logitBiasIds.set(req.biasIds, biasCursor);
      b.logitBiasValues.set(req.biasValues, biasCursor);
      biasCursor += req.biasIds.length;
      const mask = masked.has(req);
      // min_tokens: the tokens that would end the request are banned until it has that many
      // (not under a grammar: where it allows only the end, the end comes). Tokens still being
      // drawn count: this row draws the token after them.
      if (req.numOutputTokens + req.numPendingTokens < p.minTokens && !mask) {
        for (const id of [...(p.ignoreEos ? [] : this.eosTokenIds), ...p.stopTokenIds]) {
          b.logitBiasIds[biasCursor] = id;
          b.logitBiasValues[biasCursor++] = -Infinity;
        }
      }
      if (biasCursor - biasOffset > LOGIT_BIAS_MAX)
        throw new Error(`request ${req.id} carries more than ${LOGIT_BIAS_MAX} logit biases`);
      d.setSampling(row, {
        temperature: p.temperature,
        topP: p.topP,
        minP: p.minP,
        topK: p.topK,
        presencePenalty: p.presencePenalty,
        frequencyPenalty: p.frequencyPenalty,
        repetitionPenalty: p.repetitionPenalty,
        numTopLogprobs: Math.min(p.logprobs ?? 0, TOP_LOGPROBS_MAX),
        seed: req.seed,
        drawIndex: req.numOutputTokens + req.numPendingTokens,
        stateSlot: penalties ? this.stateSlot(req) : -1,
        biasOffset,
        biasCount: biasCursor - biasOffset,
        useMask: mask,
      });
      sampled.push(req);
    });
    b.queryStartLoc[scheduled.length] = t;
    d.setCounts(t, scheduled.length, sampled.length, returnLogits);
    return sampled;
  }

  /** The placeholder for a token the step launched last is still drawing for `req`. */
  private placeholder(req: Request, pos: number): number {
    const row = this.lastRows.get(req);
    if (row === undefined || pos !== req.tokenIds.length || req.numPendingTokens !== 1)
      throw new Error(`request ${req.id}: position ${pos} is not the draw of the step in flight`);
    return drawOfStepBefore(row);
  }

  /**
   * Fills the next descriptor and queues its step behind the one in flight (at most one).
   * Masked requests' rows are written as their masks come: while the forward pass runs (the
   * engine waits for them only before sampling), or, without overlap, before the step is queued.
   */
  async launch(
    scheduled: readonly ScheduledRequest[],
    masks: ReadonlyMap<Request, Promise<Int32Array | null>> = new Map(),
    overlap = true,
    returnLogits = false,
  ): Promise<LaunchedStep> {
    if (this.inFlight.length >= NUM_BATCHES) throw new Error("a step is queued behind another already");
    const index = this.launches++ % NUM_BATCHES;
    const d = this.engine.descriptors[index];
    const sampled = this.prepare(index, scheduled, returnLogits, new Set(masks.keys()));
    const rows = new Map(sampled.map((req, row) => [req, row]));
    const write = () =>
      Promise.all([...masks].map(async ([req, mask]) => this.writeMask(index, rows.get(req), await mask)));
    let pending = masks.size > 0;
    if (pending && !overlap) {
      await write();
      pending = false;
    }
    d.setMasksPending(pending);
    const done = this.engine.step(index);
    done.catch(() => {}); // collect() reports it
    if (pending)
      void write()
        .catch(() => {}) // a row left unwritten allows every token; its request is ended anyway
        .finally(() => d.setMasksPending(false));
    this.lastRows = rows;
    const step = { index, scheduled, sampled, returnLogits, done };
    this.inFlight.push(step);
    return step;
  }

  /** Waits for the oldest step in flight and reads what its rows drew. */
  async collect(step: LaunchedStep): Promise<SampledToken[]> {
    if (this.inFlight[0] !== step) throw new Error("steps are collected in the order they were launched");
    try {
      await step.done;
    } finally {
      this.inFlight.shift();
    }
    return this.read(step.index, step.sampled, step.returnLogits);
  }

  private read(index: number, sampled: readonly Request[], returnLogits: boolean): SampledToken[] {
    const b = this.engine.descriptors[index].batch;
    const vocab = this.engine.model.vocabSize;
    return sampled.map((req, i) => {
      const k = Math.min(req.params.logprobs ?? 0, TOP_LOGPROBS_MAX);
      const top = [];
      for (let j = 0; j < k; j++)
        top.push({
          tokenId: b.outTopIds[i * TOP_LOGPROBS_MAX + j],
          logprob: b.outTopLogprobs[i * TOP_LOGPROBS_MAX + j],
        });
      return {
        req,
        tokenId: b.outTokenIds[i],
        logprob: b.outLogprobs[i],
        top,
        logits: returnLogits ? b.logits.slice(i * vocab, (i + 1) * vocab) : null,
      };
    });
  }

  /** A row's mask; null (its grammar failed) allows every token: the request is ended anyway. */
  private writeMask(index: number, row: number | undefined, mask: Int32Array | null): void {
    if (row === undefined) return;
    const b = this.engine.descriptors[index].batch;
    const dest = b.allowedTokenMask.subarray(row * b.maskWords, (row + 1) * b.maskWords);
    if (mask === null) dest.fill(0xffffffff);
    else dest.set(new Uint32Array(mask.buffer, mask.byteOffset, b.maskWords));
  }

  /** Runs on the calling thread (tools and tests that want no event loop in between); nothing may be in flight. */
  executeSync(scheduled: readonly ScheduledRequest[], returnLogits = false): SampledToken[] {
    if (this.inFlight.length > 0) throw new Error("a step is in flight");
    const index = this.launches++ % NUM_BATCHES;
    const sampled = this.prepare(index, scheduled, returnLogits, new Set());
    this.lastRows = new Map(sampled.map((req, row) => [req, row]));
    this.engine.descriptors[index].setMasksPending(false);
    this.engine.stepSync(index);
    return this.read(index, sampled, returnLogits);
  }
}
