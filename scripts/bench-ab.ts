#!/usr/bin/env bun
// Two builds of the engine library against each other, in one process: single-token decode
// steps of one model, A and B alternating step by step, so that both see the same minute of
// a machine whose memory bandwidth moves by tens of percent from one minute to the next.
//   bun scripts/bench-ab.ts --model <path> --a <libinferneo.so> --b <libinferneo.so> [--steps 400] [--rounds 2] [--threads N]
// Each engine's weights land in their own memory, and that alone moves a step by a few
// percent either way: every round loads both afresh, in the other order than the round
// before. Prints, per round and over all, B's step time over A's (the median of the ratios
// of adjacent steps; below 1: B is faster).
import { availableParallelism } from "node:os";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { GREEDY_ROW } from "../src/ffi/native.ts";
import { loadModel } from "../src/model/load.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    a: { type: "string" },
    b: { type: "string" },
    steps: { type: "string", default: "400" },
    rounds: { type: "string", default: "2" },
    threads: { type: "string", default: String(availableParallelism()) },
  },
});
if (!values.model || !values.a || !values.b) {
  console.error(
    "usage: bun scripts/bench-ab.ts --model <path> --a <libinferneo.so> --b <libinferneo.so> [--steps 400] [--rounds 2] [--threads N]",
  );
  process.exit(2);
}
const steps = Number(values.steps);
const model = await loadModel(values.model);
const config = model.spec.config;
const blockSize = 16;
const contextMax = 128; // positions cycle through 0..127: a short context, as in a benchmark's decode

interface Side {
  engine: any; // NativeEngine of its own copy of the FFI module
  blocks: number[];
  times: number[];
}

let loads = 0;
// A fresh module instance per library: the FFI module opens one library per instance.
async function open(lib: string): Promise<Side> {
  process.env.INFERNEO_LIB = resolve(lib);
  const ffi = await import(`../src/ffi/native.ts?instance=${loads++}`);
  const engine = new ffi.NativeEngine(
    config,
    {
      numBlocks: contextMax / blockSize,
      kvCacheBytes: 0,
      blockSizeTokens: blockSize,
      maxNumBatchedTokens: 16,
      maxNumSeqs: 1,
      maxBlocksPerSeq: contextMax / blockSize,
      kvCacheDtype: ffi.DType.F32,
      cpu: { numThreads: Number(values.threads), computeDtype: ffi.DType.F32 },
    },
    model.spec.files,
    model.spec.tensors,
  );
  return { engine, blocks: engine.allocateBlocks(contextMax / blockSize), times: [] };
}

function step(side: Side, pos: number): void {
  const n = side.engine;
  const b = n.batch;
  b.queryStartLoc[0] = 0;
  b.queryStartLoc[1] = 1;
  b.tokenIds[0] = 300 + (pos % 50);
  b.positions[0] = pos;
  b.slotMapping[0] = side.blocks[Math.floor(pos / blockSize)] * blockSize + (pos % blockSize);
  b.seqLens[0] = pos + 1;
  b.blockTables.set(side.blocks, 0);
  b.sampleIndices[0] = 0;
  n.descriptors[0].setSampling(0, GREEDY_ROW);
  n.descriptors[0].setCounts(1, 1, 1, false);
  const t = performance.now();
  n.stepSync();
  side.times.push(performance.now() - t);
}

const quantile = (xs: number[], f: number) =>
  [...xs].sort((x, y) => x - y)[Math.min(xs.length - 1, Math.floor(xs.length * f))];
const mean = (xs: number[]) => xs.reduce((x, y) => x + y, 0) / xs.length;
const warmup = 20;
const allRatios: number[] = [];
for (let round = 0; round < Number(values.rounds); round++) {
  // Round 0 loads A first, round 1 B first, and so on.
  const [first, second] = round % 2 === 0 ? [values.a, values.b] : [values.b, values.a];
  const s1 = await open(first);
  const s2 = await open(second);
  const [A, B] = round % 2 === 0 ? [s1, s2] : [s2, s1];
  for (let i = 0; i < steps + warmup; i++) {
    const pos = i % contextMax;
    // Which goes first alternates too.
    if (i % 2 === 0) {
      step(A, pos);
      step(B, pos);
    } else {
      step(B, pos);
      step(A, pos);
    }
  }
  const a = A.times.slice(warmup);
  const b = B.times.slice(warmup);
  const ratios = b.map((x, i) => x / a[i]);
  allRatios.push(...ratios);
  console.log(
    `round ${round + 1} (${round % 2 === 0 ? "A" : "B"} loaded first): A step p50 ${quantile(a, 0.5).toFixed(2)} ms mean ${mean(a).toFixed(2)}; ` +
      `B step p50 ${quantile(b, 0.5).toFixed(2)} ms mean ${mean(b).toFixed(2)}; B/A ${quantile(ratios, 0.5).toFixed(4)} (ratio of means ${(mean(b) / mean(a)).toFixed(4)})`,
  );
  A.engine.destroy();
  B.engine.destroy();
}
console.log(
  `${values.model}: B/A step time ${quantile(allRatios, 0.5).toFixed(4)} (median of ${allRatios.length} adjacent-step ratios over ${values.rounds} rounds, loading order alternated)`,
);
