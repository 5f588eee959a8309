// Turns a schedule into the engine's flat step descriptor, runs the step, and
// reads back the sampled tokens. The descriptor's arrays are engine-owned and
// reused, so a step allocates nothing on the native side.
import type { NativeEngine } from "../ffi/native.ts";
import type { Request } from "./request.ts";
import type { ScheduledRequest } from "./scheduler.ts";

export interface SampledToken {
  req: Request;
  tokenId: number;
  logprob: number;
  logits: Float32Array | null; // a copy, only when asked for
}

export class ModelRunner {
  constructor(
    private readonly engine: NativeEngine,
    readonly blockSizeTokens: number,
  ) {}

  /** Fills the step descriptor; returns the requests whose last token is in this step (they sample). */
  private prepare(scheduled: readonly ScheduledRequest[], returnLogits: boolean): Request[] {
    const b = this.engine.batch;
    const bs = this.blockSizeTokens;
    const maxBlocks = this.engine.config.maxBlocksPerSeq;
    const sampled: Request[] = [];
    let t = 0;
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
      if (req.numComputedTokens + numNewTokens === req.numTokens) {
        const row = sampled.length;
        b.sampleIndices[row] = t - 1;
        const p = req.params;
        this.engine.setSampling(row, { temperature: p.temperature, topP: p.topP, minP: p.minP, topK: p.topK, seed: req.seed, drawIndex: req.numOutputTokens });
        sampled.push(req);
      }
    });
    b.queryStartLoc[scheduled.length] = t;
    this.engine.setCounts(t, scheduled.length, sampled.length, returnLogits);
    return sampled;
  }

  private collect(sampled: Request[], returnLogits: boolean): SampledToken[] {
    const b = this.engine.batch;
    const vocab = this.engine.model.vocabSize;
    return sampled.map((req, i) => ({
      req,
      tokenId: b.outTokenIds[i],
      logprob: b.outLogprobs[i],
      logits: returnLogits ? b.logits.slice(i * vocab, (i + 1) * vocab) : null,
    }));
  }

  /** Runs on the engine thread; the event loop stays free. */
  async execute(scheduled: readonly ScheduledRequest[], returnLogits = false): Promise<SampledToken[]> {
    const sampled = this.prepare(scheduled, returnLogits);
    await this.engine.step();
    return this.collect(sampled, returnLogits);
  }

  /** Runs on the calling thread (tools and tests that want no event loop in between). */
  executeSync(scheduled: readonly ScheduledRequest[], returnLogits = false): SampledToken[] {
    const sampled = this.prepare(scheduled, returnLogits);
    this.engine.stepSync();
    return this.collect(sampled, returnLogits);
  }
}
