// Which KV blocks each request holds. The block pool itself (free queue, ref
// counts) lives in the engine; this side decides who gets blocks and gives them
// back on every finish, abort, preemption and error.
import type { Request } from "./request.ts";

/** The pool's verbs, as the native engine (or a test double) provides them. */
export interface BlockPool {
  allocateBlocks(n: number): number[];
  freeBlocks(ids: readonly number[]): void;
  readonly numFreeBlocks: number;
}

export class KvCacheManager {
  constructor(
    private readonly pool: BlockPool,
    readonly blockSizeTokens: number,
    readonly numBlocks: number,
    readonly maxBlocksPerSeq: number,
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

  /** Makes room for `numNewTokens` more computed tokens; false (and nothing changed) when the pool is short. */
  allocateSlots(req: Request, numNewTokens: number): boolean {
    const needed = this.blocksFor(req.numComputedTokens + numNewTokens) - req.blockTable.length;
    if (needed <= 0) return true;
    if (needed > this.pool.numFreeBlocks) return false;
    req.blockTable.push(...this.pool.allocateBlocks(needed));
    return true;
  }

  free(req: Request): void {
    if (req.blockTable.length === 0) return;
    // Freed in reverse so that a request's tail blocks are evicted first once caching keeps them.
    this.pool.freeBlocks([...req.blockTable].reverse());
    req.blockTable = [];
  }
}
