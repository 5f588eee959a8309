// Runs under Node: llama.cpp (through node-llama-cpp) on one GGUF, single sequence.
// Prints one JSON line: {prefill_tok_s, decode_tok_s}. Used by scripts/bench-peer.ts.
import { getLlama } from "node-llama-cpp";

const [modelPath, threadsArg, promptArg, decodeArg] = process.argv.slice(2);
const threads = Number(threadsArg);
const promptTokens = Number(promptArg);
const decodeTokens = Number(decodeArg);

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
  prompt.push(259 + (state % Math.max(1, model.tokens.count ?? 32000) % (32000 - 259)));
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
console.log(JSON.stringify({ prefill_tok_s: promptTokens / prefillS, decode_tok_s: (n - 1) / decodeS, tokens: tokens.slice(0, 16) }));
await context.dispose();
await model.dispose();
await llama.dispose();
