// The scheduler alone, in pure TypeScript over a counting block pool: budget
// splitting, chunked prefill, preemption order, and blocks always given back.
import { describe, expect, test } from "bun:test";
import { KvCacheManager, type BlockPool } from "../src/engine/kv_cache_manager.ts";
import { DEFAULT_SAMPLING, Request, RequestStatus } from "../src/engine/request.ts";
import { QueueFullError, Scheduler } from "../src/engine/scheduler.ts";

class FakePool implements BlockPool {
  private free: number[];
  constructor(readonly size: number) {
    this.free = Array.from({ length: size }, (_, i) => i);
  }
  allocateBlocks(n: number): number[] {
    if (n > this.free.length) throw new Error("exhausted");
    return this.free.splice(0, n);
  }
  cacheBlocks(): void {}
  lookupCachedBlocks(): number[] {
    return [];
  }
  freeBlocks(ids: readonly number[]): void {
    for (const id of ids) {
      if (this.free.includes(id)) throw new Error(`double free ${id}`);
      this.free.push(id);
    }
  }
  get numFreeBlocks(): number {
    return this.free.length;
  }
}

function setup(numBlocks: number, budget: number, maxNumSeqs = 8) {
  const pool = new FakePool(numBlocks);
  const kv = new KvCacheManager(pool, 4, numBlocks, 64, false);
  const s = new Scheduler({ maxNumBatchedTokens: budget, maxNumSeqs, maxQueueLen: 16 }, kv);
  return { pool, kv, s };
}

let nextId = 0;
function req(promptLen: number, groupId?: string): Request {
  const id = `r${nextId++}`;
  return new Request(id, new Array(promptLen).fill(7), DEFAULT_SAMPLING, 0n, null, groupId ?? id);
}

/** What the engine loop does after a step: advance, and sample one token for finished prefills. */
function advance(scheduled: ReturnType<Scheduler["schedule"]>): void {
  for (const { req: r, numNewTokens } of scheduled) {
    r.numComputedTokens += numNewTokens;
    if (r.numComputedTokens === r.numTokens) r.tokenIds.push(9);
  }
}

describe("scheduler", () => {
  test("seats go fairly between requests: a later request's sequence starts before an earlier request's remaining ones", () => {
    const { s } = setup(64, 64, 4);
    const big = Array.from({ length: 10 }, () => req(2, "big"));
    for (const r of big) s.add(r);
    /** One step: the sequences it starts, then the step's work is done. */
    const started = () => {
      const before = new Set(s.running);
      const sch = s.schedule();
      advance(sch);
      return sch.map((x) => x.req).filter((r) => !before.has(r));
    };
    expect(started()).toEqual(big.slice(0, 4)); // alone, the big request takes every seat, oldest first
    const small = [req(2, "small-a"), req(2, "small-b")];
    for (const r of small) s.add(r);
    // Free two seats: the two small requests take them, though six of "big" waited longer.
    s.remove(big[0]);
    s.remove(big[1]);
    expect(started()).toEqual(small);
    // Once each request holds seats, a free seat goes to the request with the fewest running.
    s.remove(small[0]);
    expect(started()).toEqual([big[4]]);
  });

  test("a long prompt is prefilled in chunks under the token budget", () => {
    const { s } = setup(64, 10);
    const r = req(25);
    s.add(r);
    const chunks: number[] = [];
    for (let i = 0; i < 3; i++) {
      const sch = s.schedule();
      chunks.push(sch[0].numNewTokens);
      advance(sch);
    }
    expect(chunks).toEqual([10, 10, 5]);
    expect(r.blockTable.length).toBe(7); // ceil(25 computed tokens / 4)
  });

  test("running decodes come first, and the rest of the budget goes to waiting prefills", () => {
    const { s } = setup(64, 8);
    const a = req(3);
    s.add(a);
    advance(s.schedule()); // a prefilled, now decoding
    const b = req(20);
    s.add(b);
    const sch = s.schedule();
    expect(sch.map((x) => [x.req.id, x.numNewTokens])).toEqual([
      [a.id, 1],
      [b.id, 7],
    ]);
  });

  test("max_num_seqs caps the running set", () => {
    const { s } = setup(64, 100, 2);
    for (let i = 0; i < 4; i++) s.add(req(3));
    const sch = s.schedule();
    expect(sch.length).toBe(2);
    expect(s.waiting.length).toBe(2);
  });

  test("when blocks run out, the newest running request is preempted and resumes from scratch", () => {
    const { s, pool } = setup(4, 64);
    const old = req(8); // 2 blocks
    const young = req(8); // 2 blocks
    s.add(old);
    s.add(young);
    advance(s.schedule());
    expect(pool.numFreeBlocks).toBe(0);
    // Both now hold 9 tokens (8 + 1 sampled): computing the 9th needs a third block each.
    const sch = s.schedule();
    expect(sch.map((x) => x.req.id)).toEqual([old.id]);
    expect(young.status).toBe(RequestStatus.PREEMPTED);
    expect(young.numComputedTokens).toBe(0);
    expect(young.blockTable).toEqual([]);
    expect(s.waiting[0]).toBe(young);
    expect(s.numPreemptions).toBe(1);
  });

  test("remove returns every block wherever the request is", () => {
    const { s, pool } = setup(16, 6);
    const a = req(10);
    const b = req(3);
    s.add(a);
    s.add(b);
    advance(s.schedule()); // a mid-prefill, b waiting or running
    s.remove(a);
    s.remove(b);
    expect(pool.numFreeBlocks).toBe(16);
    expect(s.hasWork).toBe(false);
  });

  test("the waiting queue is bounded, and refusing a request changes nothing", () => {
    const { s } = setup(64, 100);
    for (let i = 0; i < 16; i++) s.add(req(3));
    expect(() => s.add(req(3))).toThrow(QueueFullError);
    expect(s.waiting.length).toBe(16);
    s.schedule(); // admits up to max_num_seqs, making room
    expect(s.waiting.length).toBe(8);
    s.add(req(3));
    expect(s.waiting.length).toBe(9);
  });

  test("preemption takes the newest running request first, then the next newest", () => {
    const { s } = setup(6, 64);
    const rs = [req(8), req(4), req(4)]; // 2 + 1 + 1 blocks
    for (const r of rs) s.add(r);
    advance(s.schedule());
    // 9, 5, 5 tokens: the oldest needs a 3rd block, the others a 2nd: 3 more, 2 free.
    const sch = s.schedule();
    expect(rs[2].status).toBe(RequestStatus.PREEMPTED);
    expect(rs[1].status).toBe(RequestStatus.RUNNING);
    expect(sch.map((x) => x.req.id)).toEqual([rs[0].id, rs[1].id]);
    expect(s.waiting.map((r) => r.id)).toEqual([rs[2].id]);
  });
});
