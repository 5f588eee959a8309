// The scheduler: vLLM v1's loop with no prefill or decode phase. Every request has
// numComputedTokens and numTokens; each step hands out new tokens under a token
// budget, running requests first (oldest first), then waiting ones (FCFS). A long
// prompt takes as much of the budget as is left (chunked prefill), so decodes of
// others are never held up by more than one budget's worth of prefill.
import type { KvCacheManager } from "./kv_cache_manager.ts";
import { Request, RequestStatus } from "./request.ts";

export interface SchedulerConfig {
  maxNumBatchedTokens: number;
  maxNumSeqs: number;
  maxQueueLen: number; // waiting requests beyond this are refused
}

/** The waiting queue is full: the server answers 429. */
export class QueueFullError extends Error {
  constructor(readonly maxQueueLen: number) {
    super(`the server is at capacity: ${maxQueueLen} requests are already waiting`);
    this.name = "QueueFullError";
  }
}

export interface ScheduledRequest {
  req: Request;
  numNewTokens: number;
}

export class Scheduler {
  readonly waiting: Request[] = [];
  readonly running: Request[] = [];
  numPreemptions = 0;

  constructor(
    readonly config: SchedulerConfig,
    private readonly kv: KvCacheManager,
  ) {}

  add(req: Request): void {
    if (this.waiting.length >= this.config.maxQueueLen) throw new QueueFullError(this.config.maxQueueLen);
    this.waiting.push(req);
  }

  get hasWork(): boolean {
    return this.waiting.length > 0 || this.running.length > 0;
  }

  /**
   * The next step's requests and how many new tokens each computes. computing: hashes of full
   * blocks that a step in flight is computing (they are cached when it ends).
   */
  schedule(computing: ReadonlySet<bigint> = new Set()): ScheduledRequest[] {
    let budget = this.config.maxNumBatchedTokens;
    const scheduled: ScheduledRequest[] = [];
    const preempted = new Set<Request>();

    for (let i = 0; i < this.running.length && budget > 0; i++) {
      const req = this.running[i];
      if (req.drawingLast) continue;
      const numNewTokens = Math.min(req.numTokens - req.numComputedTokens, budget);
      if (numNewTokens <= 0) continue;
      // Not enough blocks: preempt the newest running request (it recomputes later) until there are.
      let admitted = true;
      while (!this.kv.allocateSlots(req, numNewTokens)) {
        const victim = this.running[this.running.length - 1];
        this.preempt(victim);
        preempted.add(victim);
        if (victim === req) {
          admitted = false;
          break;
        }
      }
      if (!admitted) break;
      scheduled.push({ req, numNewTokens });
      budget -= numNewTokens;
    }

    // Nothing new starts in a step that had to preempt: the pool is too tight for it.
    if (preempted.size === 0) this.admitWaiting(budget, scheduled, computing);
    return scheduled;
  }

  /**
   * Starts waiting sequences while budget and seats last, fairly between requests rather
   * than between sequences: the next one is a preempted sequence if any, else the one whose
   * request (its group: the n choices and prompts of one API call) has the fewest sequences
   * running, oldest first among equals. A small request behind one of 1,000 sequences gets
   * the next free seat instead of waiting for all of them.
   */
  private admitWaiting(budget: number, scheduled: ScheduledRequest[], inFlight: ReadonlySet<bigint>): void {
    // Full blocks that requests admitted in this step (or a step in flight) will compute: a
    // waiting request that would compute the same block again waits and then finds it cached
    // (n > 1 choices, or many users sending the same system prompt at once).
    const computing = new Set<bigint>(inFlight);
    const runningInGroup = new Map<string, number>();
    for (const r of this.running) runningInGroup.set(r.groupId, (runningInGroup.get(r.groupId) ?? 0) + 1);
    const passed = new Set<Request>(); // admitted, or skipped for this step
    while (budget > 0 && this.running.length < this.config.maxNumSeqs) {
      const req = this.nextWaiting(passed, runningInGroup);
      if (req === null) break;
      passed.add(req);
      const cachedTokens = this.kv.getComputedBlocks(req);
      const numNewTokens = Math.min(req.numTokens - req.numComputedTokens, budget);
      const newHashes = this.kv.fullBlockHashes(req, req.numComputedTokens + numNewTokens).slice(req.blockTable.length);
      if (newHashes.length > 0 && computing.has(newHashes[0])) {
        this.kv.free(req); // the hits stay cached
        req.numComputedTokens = 0;
        continue;
      }
      if (!this.kv.allocateSlots(req, numNewTokens)) {
        // Give the cache hits back (they stay cached) and try again next step.
        this.kv.free(req);
        req.numComputedTokens = 0;
        break;
      }
      for (const h of newHashes) computing.add(h);
      if (req.numCachedPromptTokens === null) {
        req.numCachedPromptTokens = cachedTokens;
        this.kv.numPrefixQueryTokens += req.promptTokenIds.length;
        this.kv.numPrefixHitTokens += cachedTokens;
      }
      this.waiting.splice(this.waiting.indexOf(req), 1);
      req.firstScheduledMs ??= performance.now();
      req.status = RequestStatus.RUNNING;
      this.running.push(req);
      runningInGroup.set(req.groupId, (runningInGroup.get(req.groupId) ?? 0) + 1);
      scheduled.push({ req, numNewTokens });
      budget -= numNewTokens;
    }
  }

  /** The waiting sequence to start next (see admitWaiting); one pass over the queue, bounded by maxQueueLen. */
  private nextWaiting(passed: ReadonlySet<Request>, runningInGroup: ReadonlyMap<string, number>): Request | null {
    let best: Request | null = null;
    let bestRank = Infinity;
    for (const req of this.waiting) {
      if (passed.has(req)) continue;
      if (req.status === RequestStatus.PREEMPTED) return req; // preempted ones sit at the front: they go first
      const rank = runningInGroup.get(req.groupId) ?? 0;
      if (rank < bestRank) {
        best = req;
        bestRank = rank;
        if (rank === 0) break; // nothing ranks lower; the first found is the oldest
      }
    }
    return best;
  }

  private preempt(req: Request): void {
    const i = this.running.indexOf(req);
    this.running.splice(i, 1);
    this.kv.free(req);
    req.numComputedTokens = 0;
    req.status = RequestStatus.PREEMPTED;
    req.numPreemptions += 1;
    this.numPreemptions += 1;
    this.waiting.unshift(req);
  }

  /** Removes a request wherever it is and returns its blocks; finishing it is the caller's part. */
  remove(req: Request): void {
    const r = this.running.indexOf(req);
    if (r >= 0) this.running.splice(r, 1);
    const w = this.waiting.indexOf(req);
    if (w >= 0) this.waiting.splice(w, 1);
    this.kv.free(req);
  }
}
