// Runs under Node: llama.cpp (through node-llama-cpp) on one GGUF: prefill and decode of
// one sequence, then `batch` sequences decoding at once through node-llama-cpp's batched
// evaluation (one context with `batch` sequences: their tokens go into one llama_decode
// per step). Prints one JSON line: {prefill_tok_s, decode_tok_s, batch_tok_s, tokens}.
// Used by scripts/bench-peer.ts.
import { getLlama } from "node-llama-cpp";

const [modelPath, threadsArg, promptArg, decodeArg, batchArg] = process.argv.slice(2);
const threads = Number(threadsArg);
const promptTokens = Number(promptArg);
const decodeTokens = Number(decodeArg);
const batch = Number(batchArg ?? 0);

const llama = await getLlama({ gpu: false, build: "never", maxThreads: threads, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const context = await model.createContext({
  contextSize: promptTokens + decodeTokens + 32,
  batchSize: promptTokens,
  threads: { ideal: threads, min: threads },
  flashAttention: false,
});
const sequence = context.getSequence();
let state = 12345;
const prompt = [1];
while (prompt.length < promptTokens) {
  state = (state * 1103515245 + 12345) % 2 ** 31;
  prompt.push(259 + ((state % Math.max(1, model.tokens.count ?? 32000)) % (32000 - 259)));
}
const t0 = performance.now();
await sequence.evaluateWithoutGeneratingNewTokens(prompt);
const prefillS = (performance.now() - t0) / 1000;
await sequence.clearHistory();

// Decode: a one-token prompt, then decodeTokens greedy tokens (byte tokens banned, EOS ignored).
let n = 0;
let tFirst = 0;
const tokens = [];
const gen = sequence.evaluate([1], { temperature: 0 });
for await (const token of gen) {
  if (n === 0) tFirst = performance.now();
  tokens.push(token);
  n += 1;
  if (n >= decodeTokens) break;
}
const decodeS = (performance.now() - tFirst) / 1000;
await context.dispose();

// Batched decode: `batch` sequences, each a 4-token prompt (its own), decodeTokens greedy
// tokens each, all at once; aggregate tokens over the wall time, prompts included.
let batchTokS = 0;
if (batch > 0) {
  const shared = await model.createContext({
    contextSize: batch * (4 + decodeTokens + 32),
    sequences: batch,
    batchSize: Math.max(batch * 4, 64),
    threads: { ideal: threads, min: threads },
    flashAttention: false,
  });
  const t = performance.now();
  let total = 0;
  await Promise.all(
    Array.from({ length: batch }, async (_, i) => {
      const seq = shared.getSequence();
      let k = 0;
      for await (const _token of seq.evaluate([1, 300 + i, 400 + i, 500 + i], { temperature: 0 })) {
        total += 1;
        if (++k >= decodeTokens) break;
      }
    }),
  );
  batchTokS = total / ((performance.now() - t) / 1000);
  await shared.dispose();
}
console.log(
  JSON.stringify({
    prefill_tok_s: promptTokens / prefillS,
    decode_tok_s: (n - 1) / decodeS,
    batch_tok_s: batchTokS,
    tokens: tokens.slice(0, 16),
  }),
);
await model.dispose();
await llama.dispose();
