// Which KV blocks each request holds. The block pool itself (free queue, ref
// counts, cached-block hashes) lives in the engine; this side decides who gets
// blocks, names full blocks for the prefix cache, and gives blocks back on every
// finish, abort, preemption and error. Its boundary with the scheduler is vLLM's:
// getComputedBlocks, allocateSlots, free.
import type { Request } from "./request.ts";

/** The pool's verbs, as the native engine (or a test double) provides them. */
export interface BlockPool {
  allocateBlocks(n: number): number[];
  freeBlocks(ids: readonly number[]): void;
  cacheBlocks(ids: readonly number[], hashes: readonly bigint[]): void;
  lookupCachedBlocks(hashes: readonly bigint[]): number[];
  readonly numFreeBlocks: number;
}

/** Chained: a block's hash folds in the one before it, so equal hashes mean equal prefixes. */
export function blockHash(previous: bigint, tokens: readonly number[]): bigint {
  const h = Bun.hash.wyhash(Int32Array.from(tokens), previous === 0n ? 0x9e3779b97f4a7c15n : previous);
  return h === 0n ? 1n : BigInt(h);
}

export class KvCacheManager {
  /** Prompt tokens looked up, and found, at first admission (the scheduler counts them). */
  numPrefixQueryTokens = 0;
  numPrefixHitTokens = 0;

  constructor(
    private readonly pool: BlockPool,
    readonly blockSizeTokens: number,
    readonly numBlocks: number,
    readonly maxBlocksPerSeq: number,
    readonly enablePrefixCaching: boolean,
    /** Positions a query sees when every layer has a sliding window (Mistral); 0: the whole context. */
    readonly slidingWindow = 0,
  ) {}

  get numFreeBlocks(): number {
    return this.pool.numFreeBlocks;
  }

  get usage(): number {
    return 1 - this.pool.numFreeBlocks / this.numBlocks;
  }

  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSizeTokens);
  }

  /**
   * The most blocks a request of `numTokens` holds at once, computing at most `chunk` tokens a
   * step: all of them, or, under a sliding window, the window's and a chunk's.
   */
  blocksHeld(numTokens: number, chunk: number): number {
    const all = this.blocksFor(numTokens);
    return this.slidingWindow > 0 ? Math.min(all, this.blocksFor(this.slidingWindow + chunk) + 1) : all;
  }

  private hashesUpTo(req: Request, numBlocks: number): bigint[] {
    const bs = this.blockSizeTokens;
    for (let i = req.blockHashes.length; i < numBlocks; i++) {
      req.blockHashes.push(blockHash(i === 0 ? 0n : req.blockHashes[i - 1], req.tokenIds.slice(i * bs, (i + 1) * bs)));
    }
    return req.blockHashes.slice(0, numBlocks);
  }

  /**
   * For a request with nothing computed: takes the cached blocks that hold its leading
   * tokens and counts them as computed. The block that holds the last token is never
   * taken from the cache (its logits are needed), so shared blocks are never written.
   */
  getComputedBlocks(req: Request): number {
    if (!this.enablePrefixCaching || req.numComputedTokens > 0 || req.blockTable.length > 0) return 0;
    const usable = Math.floor((req.numTokens - 1) / this.blockSizeTokens);
    const hits = this.pool.lookupCachedBlocks(this.hashesUpTo(req, usable));
    req.blockTable = hits;
    req.numOfferedBlocks = hits.length;
    req.numComputedTokens = hits.length * this.blockSizeTokens;
    return req.numComputedTokens;
  }

  /** Hashes of the full blocks among the first `numTokens` tokens ([] with caching off). */
  fullBlockHashes(req: Request, numTokens: number): bigint[] {
    if (!this.enablePrefixCaching) return [];
    return this.hashesUpTo(req, Math.floor(numTokens / this.blockSizeTokens));
  }

  /** Makes room for `numNewTokens` more computed tokens; false (and nothing changed) when the pool is short. */
  allocateSlots(req: Request, numNewTokens: number): boolean {
    const needed = this.blocksFor(req.numComputedTokens + numNewTokens) - req.blockTable.length;
    if (needed <= 0) return true;
    if (needed > this.pool.numFreeBlocks) return false;
    req.blockTable.push(...this.pool.allocateBlocks(needed));
    return true;
  }

  /**
   * After a step: offers the request's newly full blocks among its first `computedTokens` (what
   * the steps that ended have computed) to the pool's cache, so later requests can share them.
   */
  cacheFullBlocks(req: Request, computedTokens: number): void {
    if (!this.enablePrefixCaching) return;
    const full = Math.floor(computedTokens / this.blockSizeTokens);
    if (full <= req.numOfferedBlocks) return;
    const hashes = this.hashesUpTo(req, full);
    this.pool.cacheBlocks(req.blockTable.slice(req.numOfferedBlocks, full), hashes.slice(req.numOfferedBlocks));
    req.numOfferedBlocks = full;
  }

  /**
   * Under a sliding window on every layer: gives back the blocks that lie wholly before the
   * window of the position after the first `computedTokens`, which no later query reads (nor
   * the step in flight behind them, whose queries come later). Their entries in the
   * block table then name the first block still held, so the engine's table stays whole (a
   * prefill tile reads whole chunks and masks what lies before the window).
   */
  releaseOutsideWindow(req: Request, computedTokens: number): void {
    if (this.slidingWindow === 0) return;
    const firstSeen = computedTokens + 1 - this.slidingWindow;
    const dead = Math.min(Math.floor(Math.max(0, firstSeen) / this.blockSizeTokens), req.blockTable.length - 1);
    if (dead <= req.numReleasedBlocks) return;
    this.pool.freeBlocks(req.blockTable.slice(req.numReleasedBlocks, dead));
    req.blockTable.fill(req.blockTable[dead], req.numReleasedBlocks, dead);
    req.numReleasedBlocks = dead;
  }

  free(req: Request): void {
    req.numOfferedBlocks = 0;
    const held = req.blockTable.slice(req.numReleasedBlocks);
    req.numReleasedBlocks = 0;
    req.blockTable = [];
    // Tail first: cached blocks are evicted least recently freed first, so a prefix outlives its tail.
    if (held.length > 0) this.pool.freeBlocks(held.reverse());
  }
}
