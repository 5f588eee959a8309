// Turns a schedule into the engine's flat step descriptor, runs the step, and
// reads back the sampled tokens. The descriptor's arrays are engine-owned and
// reused, so a step allocates nothing on the native side.
import { LOGIT_BIAS_MAX, TOP_LOGPROBS_MAX, type NativeEngine } from "../ffi/native.ts";
import { RequestStatus, type Request, type TokenLogprob } from "./request.ts";
import type { ScheduledRequest } from "./scheduler.ts";

export interface SampledToken extends TokenLogprob {
  req: Request;
  logits: Float32Array | null; // a copy, only when asked for
}

export class ModelRunner {
  /** Engine-side sequence states (penalties' token counts) of running requests, by slot. */
  private readonly stateSlots = new Map<Request, number>();
  private readonly freeSlots: number[];

  constructor(
    private readonly engine: NativeEngine,
    readonly blockSizeTokens: number,
    private readonly eosTokenIds: readonly number[],
  ) {
    this.freeSlots = Array.from({ length: engine.config.maxNumSeqs }, (_, i) => engine.config.maxNumSeqs - 1 - i);
  }

  /**
   * The slot of a request's sequence state in the engine, opened with its tokens so far the
   * first time it samples with penalties; the engine appends each token it draws there, so its
   * history crosses once. A request that stopped running (finished, aborted, preempted) gives
   * its slot back at the next step; one that runs again reopens with its tokens then.
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
      this.engine.closeSeqState(slot);
      this.stateSlots.delete(req);
      this.freeSlots.push(slot);
    }
  }

  /** Fills the step descriptor; returns the requests whose last token is in this step (they sample). */
  /** masked: the sampling requests whose rows take a grammar's bitmask (written by writeMask). */
  private prepare(
    scheduled: readonly ScheduledRequest[],
    returnLogits: boolean,
    masked: ReadonlySet<Request>,
  ): Request[] {
    const b = this.engine.batch;
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
        b.tokenIds[t] = req.tokenIds[pos];
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
      if (mask) this.rowOf.set(req, row);
      // min_tokens: the tokens that would end the request are banned until it has that many
      // (not under a grammar: where it allows only the end, the end comes).
      if (req.numOutputTokens < p.minTokens && !mask) {
        for (const id of [...(p.ignoreEos ? [] : this.eosTokenIds), ...p.stopTokenIds]) {
          b.logitBiasIds[biasCursor] = id;
          b.logitBiasValues[biasCursor++] = -Infinity;
        }
      }
      if (biasCursor - biasOffset > LOGIT_BIAS_MAX)
        throw new Error(`request ${req.id} carries more than ${LOGIT_BIAS_MAX} logit biases`);
      this.engine.setSampling(row, {
        temperature: p.temperature,
        topP: p.topP,
        minP: p.minP,
        topK: p.topK,
        presencePenalty: p.presencePenalty,
        frequencyPenalty: p.frequencyPenalty,
        repetitionPenalty: p.repetitionPenalty,
        numTopLogprobs: Math.min(p.logprobs ?? 0, TOP_LOGPROBS_MAX),
        seed: req.seed,
        drawIndex: req.numOutputTokens,
        stateSlot: penalties ? this.stateSlot(req) : -1,
        biasOffset,
        biasCount: biasCursor - biasOffset,
        useMask: mask,
      });
      sampled.push(req);
    });
    b.queryStartLoc[scheduled.length] = t;
    this.engine.setCounts(t, scheduled.length, sampled.length, returnLogits);
    return sampled;
  }

  private collect(sampled: Request[], returnLogits: boolean): SampledToken[] {
    const b = this.engine.batch;
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

  /** Rows of this step's masked requests (valid from execute until the step ends). */
  private readonly rowOf = new Map<Request, number>();

  /**
   * Runs on the engine thread; the event loop stays free. Masked requests' rows are filled
   * by `masks`: while the forward pass runs (overlap: the engine waits for them only before
   * sampling), or before the step starts where masks and matmuls would share the same cores.
   */
  async execute(
    scheduled: readonly ScheduledRequest[],
    returnLogits = false,
    masks: ReadonlyMap<Request, Promise<Int32Array | null>> = new Map(),
    overlap = true,
  ): Promise<SampledToken[]> {
    this.rowOf.clear();
    const sampled = this.prepare(scheduled, returnLogits, new Set(masks.keys()));
    const write = () =>
      Promise.all([...masks].map(async ([req, mask]) => this.writeMask(this.rowOf.get(req), await mask)));
    let pending = masks.size > 0;
    if (pending && !overlap) {
      await write();
      pending = false;
    }
    this.engine.setMasksPending(pending);
    const step = this.engine.step();
    if (pending) {
      try {
        await write();
      } finally {
        this.engine.setMasksPending(false);
      }
    }
    await step;
    return this.collect(sampled, returnLogits);
  }

  /** A row's mask; null (its grammar failed) allows every token: the request is ended anyway. */
  private writeMask(row: number | undefined, mask: Int32Array | null): void {
    if (row === undefined) return;
    const b = this.engine.batch;
    const dest = b.allowedTokenMask.subarray(row * b.maskWords, (row + 1) * b.maskWords);
    if (mask === null) dest.fill(0xffffffff);
    else dest.set(new Uint32Array(mask.buffer, mask.byteOffset, b.maskWords));
  }

  /** Runs on the calling thread (tools and tests that want no event loop in between). */
  executeSync(scheduled: readonly ScheduledRequest[], returnLogits = false): SampledToken[] {
    const sampled = this.prepare(scheduled, returnLogits, new Set());
    this.engine.setMasksPending(false);
    this.engine.stepSync();
    return this.collect(sampled, returnLogits);
  }
}
