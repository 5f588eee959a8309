#!/usr/bin/env bun
// Structured output's cost: aggregate decode tok/s of N concurrent streams with a JSON
// schema against the same streams unconstrained, alternating, in one server process.
//   bun scripts/bench-structured.ts --model <path> [--streams 16] [--tokens 64] [--rounds 2]
// Also reports the time to compile a schema the first time (the grammar cache keeps it).
import { parseArgs } from "node:util";
import { postJson, startTestServer } from "../test/helpers/server.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    streams: { type: "string", default: "16" },
    tokens: { type: "string", default: "64" },
    rounds: { type: "string", default: "2" },
    threads: { type: "string", default: "2" },
  },
});
if (!values.model)
  throw new Error("usage: bun scripts/bench-structured.ts --model <path> [--streams 16] [--tokens 64] [--rounds 2]");
const streams = Number(values.streams);
const tokens = Number(values.tokens);
const s = await startTestServer(values.model, [
  "--served-model-name",
  "m",
  "--max-num-seqs",
  String(streams),
  "--threads",
  values.threads!,
]);
// A schema whose one string can outlast max_tokens: every stream decodes exactly `tokens` tokens.
const schema = {
  type: "object",
  properties: { story: { type: "string", maxLength: 4 * tokens } },
  required: ["story"],
  additionalProperties: false,
};
const format = { type: "json_schema", json_schema: { name: "story", schema } };

async function round(constrained: boolean, tag: string): Promise<number> {
  const start = performance.now();
  const results = await Promise.all(
    Array.from({ length: streams }, (_, i) =>
      postJson(`${s.url}/v1/completions`, {
        model: "m",
        prompt: `story ${tag} ${i}`,
        max_tokens: tokens,
        ignore_eos: true,
        seed: i,
        ...(constrained ? { response_format: format } : {}),
      }),
    ),
  );
  const generated = results.reduce(
    (a, r) => a + ((r.json.usage as { completion_tokens: number } | undefined)?.completion_tokens ?? 0),
    0,
  );
  return generated / ((performance.now() - start) / 1000);
}

const t0 = performance.now();
await postJson(`${s.url}/v1/completions`, { model: "m", prompt: "warm", max_tokens: 2, response_format: format });
const compileMs = performance.now() - t0;
await round(false, "warm");
const ratios: number[] = [];
for (let r = 0; r < Number(values.rounds); r++) {
  const free = await round(false, `f${r}`);
  const bound = await round(true, `c${r}`);
  ratios.push(bound / free);
  console.log(
    `round ${r + 1}: unconstrained ${free.toFixed(1)} tok/s, constrained ${bound.toFixed(1)} tok/s, ratio ${(bound / free).toFixed(3)}`,
  );
}
ratios.sort((a, b) => a - b);
console.log(
  `${values.model}: ${streams} streams x ${tokens} tokens: constrained/unconstrained decode ${ratios[Math.floor(ratios.length / 2)].toFixed(3)} (median of ${ratios.length}); first schema compile + request ${compileMs.toFixed(0)} ms`,
);
await s.stop();
