// The trained stories260K model against llama2.c's run.c: exact greedy tokens,
// text, and the logits at the last prompt position, from the HF folder and the GGUF.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { EMBEDDED_GGUF, generate, goldens, nextTokenLogits, SHARED, stories } from "./helpers/engine.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

// The HF folder lives in the shared folder; the GGUF also ships in the repository.
const formats = [
  ["hf", () => stories("hf"), SHARED === null],
  ["gguf", () => EMBEDDED_GGUF, false],
] as const;

for (const [format, path, skip] of formats) {
  describe.skipIf(skip)(`stories260K goldens (${format})`, () => {
    let engine: LLMEngine;
    beforeAll(async () => {
      engine = await LLMEngine.create(path(), { threads: 2 });
    });
    afterAll(async () => {
      await engine?.shutdown();
    });

    test("the tokenizer gives run.c's prompt ids", () => {
      for (const c of goldens()) expect(engine.model.tokenizer.encode(c.prompt)).toEqual(c.prompt_ids);
    });

    test("all 7 greedy completions match token for token, and their text", async () => {
      for (const c of goldens()) {
        const out = await generate(engine, c.prompt_ids, { maxTokens: c.completion_ids.length });
        expect({ name: c.name, ids: out.ids }).toEqual({ name: c.name, ids: c.completion_ids });
        if (c.completion_text_all !== null) expect(out.text).toBe(c.completion_text_all);
      }
    });

    test.skipIf(SHARED === null)("last-position logits match run.c within 1e-4", () => {
      const all = JSON.parse(readFileSync(stories("golden_logits.json"), "utf8")) as Record<
        string,
        { last_prompt_pos_logits: number[] }
      >;
      for (const c of goldens()) {
        const want = all[c.name].last_prompt_pos_logits;
        const got = nextTokenLogits(engine, c.prompt_ids);
        expect(got.length).toBe(want.length);
        let maxDiff = 0;
        for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - want[i]));
        expect({ name: c.name, maxDiff: maxDiff < 1e-4 }).toEqual({ name: c.name, maxDiff: true });
      }
    });

    test("every KV block is back in the pool afterwards", () => {
      expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
    });
  });
}
