import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { LLMEngine, RequestOutput } from "../../src/engine/llm_engine.ts";
import { ModelRunner } from "../../src/engine/model_runner.ts";
import { DEFAULT_SAMPLING, Request, type SamplingParams, type TokenLogprob } from "../../src/engine/request.ts";

/** The shared test data beside the repository (models, goldens, reference tools), or null. */
export const SHARED: string | null = (() => {
  const dir = process.env.INFERNEO_SHARED ?? resolve(import.meta.dir, "..", "..", "..", "shared");
  return existsSync(join(dir, "models", "stories260K")) ? dir : null;
})();

export const SKIP_SHARED_MESSAGE =
  "skipped: ../shared/models/stories260K is absent (set INFERNEO_SHARED to its folder to run these)";

if (SHARED === null) console.warn(SKIP_SHARED_MESSAGE);

export function stories(...parts: string[]): string {
  if (SHARED === null) throw new Error(SKIP_SHARED_MESSAGE);
  return join(SHARED, "models", "stories260K", ...parts);
}

export interface GoldenCase {
  name: string;
  prompt: string;
  prompt_ids: number[];
  completion_ids: number[];
  completion_text_all: string | null;
}

/** The stories260K GGUF the repository ships (assets/, the server's default model): no shared folder needed. */
export const EMBEDDED_GGUF = resolve(import.meta.dir, "..", "..", "assets", "stories260K", "stories260K.gguf");

/** run.c's greedy goldens for stories260K, a copy of the shared folder's golden.json kept with the tests. */
export function goldens(): GoldenCase[] {
  return (
    JSON.parse(readFileSync(join(import.meta.dir, "..", "data", "stories260K", "golden.json"), "utf8")) as {
      cases: GoldenCase[];
    }
  ).cases;
}

export const GREEDY: SamplingParams = { ...DEFAULT_SAMPLING, temperature: 0, ignoreEos: true };

export async function generate(
  engine: LLMEngine,
  promptIds: number[],
  params: Partial<SamplingParams>,
): Promise<{ ids: number[]; text: string; logprobs: TokenLogprob[]; last: RequestOutput | null }> {
  const ids: number[] = [];
  const logprobs: TokenLogprob[] = [];
  let last: RequestOutput | null = null;
  let text = "";
  for await (const out of engine.addRequest(promptIds, { ...GREEDY, ...params })) {
    if (out.error) throw new Error(out.error);
    ids.push(...out.newTokenIds);
    logprobs.push(...out.newLogprobs);
    text += out.text;
    last = out;
  }
  return { ids, text, logprobs, last };
}

/** Logits for the token after `promptIds`, from one prefill step (engine must be idle). */
export function nextTokenLogits(engine: LLMEngine, promptIds: number[]): Float32Array {
  const req = new Request("logits-probe", promptIds, GREEDY, 0n, null);
  if (!engine.kv.allocateSlots(req, promptIds.length)) throw new Error("pool too small for the probe");
  try {
    const runner = new ModelRunner(engine.native, engine.kv.blockSizeTokens, engine.model.spec.eosTokenIds);
    const [out] = runner.executeSync([{ req, numNewTokens: promptIds.length }], true);
    return out.logits!;
  } finally {
    engine.kv.free(req);
  }
}
