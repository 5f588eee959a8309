#!/usr/bin/env bun
// Serving benchmark, in the manner of `vllm bench serve`: N requests against a running
// OpenAI-compatible server on loopback, at a request rate, under a concurrency cap.
//   bun scripts/bench-serve.ts --base-url http://127.0.0.1:8000 --model M [--num-prompts 64]
//       [--max-concurrency 8] [--request-rate inf] [--input-len 64] [--output-len 128] [--seed 0]
// Or let it start the server itself: --serve <model path> [--threads N] [--dtype bfloat16] (stopped at the end).
// Fixed-seed random prompts (token ids); EOS ignored so every request yields --output-len.
import { parseArgs } from "node:util";
import { runLoad, type Stats } from "./serve_load.ts";

const { values } = parseArgs({
  options: {
    "base-url": { type: "string" },
    serve: { type: "string" },
    threads: { type: "string" },
    dtype: { type: "string" },
    model: { type: "string" },
    "num-prompts": { type: "string", default: "64" },
    "max-concurrency": { type: "string", default: "8" },
    "request-rate": { type: "string", default: "inf" },
    "input-len": { type: "string", default: "64" },
    "output-len": { type: "string", default: "128" },
    seed: { type: "string", default: "0" },
  },
});

let baseUrl = values["base-url"];
let stopServer: (() => Promise<void>) | null = null;
if (values.serve) {
  const { parseServeArgs, serveConfig, startServer } = await import("../src/server/serve.ts");
  const args = [
    "--model",
    values.serve,
    "--port",
    "0",
    "--served-model-name",
    values.model ?? "bench",
    "--max-num-seqs",
    String(Math.max(8, Number(values["max-concurrency"]))),
  ];
  if (values.threads) args.push("--threads", values.threads);
  if (values.dtype) args.push("--dtype", values.dtype);
  const s = await startServer(serveConfig(parseServeArgs(args, {})), () => {});
  baseUrl = s.url;
  stopServer = () => s.stop("done");
}
if (!baseUrl) {
  console.error(
    "usage: bun scripts/bench-serve.ts (--base-url URL --model M | --serve <model path>) [--num-prompts N] [--max-concurrency N] [--request-rate R]",
  );
  process.exit(2);
}
const model =
  values.model ?? ((await (await fetch(`${baseUrl}/v1/models`)).json()) as { data: { id: string }[] }).data[0].id;
const r = await runLoad({
  baseUrl,
  model,
  numPrompts: Number(values["num-prompts"]),
  maxConcurrency: Number(values["max-concurrency"]),
  requestRate: values["request-rate"] === "inf" ? Infinity : Number(values["request-rate"]),
  inputLen: Number(values["input-len"]),
  outputLen: Number(values["output-len"]),
  seed: Number(values.seed),
});
await stopServer?.();
const fmt = (x: Stats) => `mean ${x.mean.toFixed(1)} p50 ${x.p50.toFixed(1)} p99 ${x.p99.toFixed(1)} ms`;
console.log(
  `${model} at ${baseUrl}: ${r.ok}/${values["num-prompts"]} ok, concurrency ${values["max-concurrency"]}, rate ${values["request-rate"]}, ` +
    `in ${values["input-len"]} out ${values["output-len"]}: ${r.requestsPerS.toFixed(2)} req/s, ${r.outputTokPerS.toFixed(1)} output tok/s; ` +
    `TTFT ${fmt(r.ttftMs)}; TPOT ${fmt(r.tpotMs)}; ITL ${fmt(r.itlMs)}`,
);
