// Tokenizers against run.c's encoder on 313 strings (spaces, tabs, digits, non-Latin,
// 4-byte UTF-8), for tokenizer.json and for the tokenizer rebuilt from the GGUF vocab;
// and incremental detokenizing that never emits half a character.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IncrementalDetokenizer } from "../src/engine/detokenizer.ts";
import { readGguf } from "../src/model/gguf.ts";
import { tokenizerFromGguf, tokenizerFromHfFolder, type ModelTokenizer } from "../src/model/tokenizer.ts";
import { SHARED, stories } from "./helpers/engine.ts";
import { makeWeights, TINY, writeGguf } from "./helpers/random_llama.ts";

interface Case {
  text: string;
  ids: number[];
  hf_ids?: number[];
}

describe.skipIf(SHARED === null)("stories260K tokenizers", () => {
  const cases = () => (JSON.parse(readFileSync(stories("tokenizer_cases.json"), "utf8")) as { cases: Case[] }).cases;
  const tokenizers: [string, () => ModelTokenizer][] = [
    ["tokenizer.json", () => tokenizerFromHfFolder(stories("hf"))],
    ["GGUF vocab", () => tokenizerFromGguf(readGguf(stories("stories260K.gguf")))],
  ];

  for (const [name, make] of tokenizers) {
    test(`${name}: encodes all ${313} fuzz strings as run.c does`, () => {
      const tok = make();
      const all = cases();
      expect(all.length).toBe(313);
      const wrong = all.filter((c) => JSON.stringify(tok.encode(c.text)) !== JSON.stringify(c.hf_ids ?? c.ids));
      expect(wrong.map((c) => c.text)).toEqual([]);
    });

    test(`${name}: decoding round-trips the text`, () => {
      const tok = make();
      for (const c of cases()) {
        if (c.hf_ids) continue;
        expect(tok.decode(c.ids)).toBe(c.text);
      }
    });
  }

  test("incremental detokenizing: no partial characters, and the pieces add up to the whole", () => {
    const tok = tokenizerFromHfFolder(stories("hf"));
    let multiByteCases = 0;
    for (const c of cases()) {
      if (c.hf_ids || c.ids.length < 3) continue;
      // Treat the first token after BOS as the prompt and stream the rest.
      const promptLen = 2;
      const detok = new IncrementalDetokenizer(tok, promptLen);
      let streamed = "";
      for (let n = promptLen + 1; n <= c.ids.length; n++) {
        const delta = detok.next(c.ids.slice(0, n));
        expect(delta.includes("\uFFFD")).toBe(false);
        streamed += delta;
      }
      streamed += detok.flush(c.ids);
      const whole = tok.decode(c.ids);
      const prompt = tok.decode(c.ids.slice(0, promptLen));
      expect(prompt + streamed).toBe(whole);
      if (c.ids.some((id) => id >= 3 && id < 259)) multiByteCases += 1;
    }
    // The fuzz set has byte-fallback characters; the check above must have met them.
    expect(multiByteCases).toBeGreaterThan(10);
  });
});

describe("GGUF SentencePiece vocabularies without the dummy prefix", () => {
  test("tokenizer.ggml.add_space_prefix false (Gemma's files): no space before the text, none stripped after", () => {
    const dir = mkdtempSync(join(tmpdir(), "inferneo-spm-"));
    try {
      const tok = (addSpacePrefix: boolean | undefined) => {
        const path = join(dir, `${String(addSpacePrefix)}.gguf`);
        writeGguf(path, { ...TINY, addSpacePrefix }, "f32", makeWeights(TINY, "f32"));
        return tokenizerFromGguf(readGguf(path));
      };
      const [llama, gemma] = [tok(undefined), tok(false)];
      const pieces = (t: ModelTokenizer, text: string) => t.encode(text, false).map((id) => t.idToToken(id));
      expect(pieces(llama, "at it")).toEqual(["\u2581a", "t", "\u2581i", "t"]);
      expect(pieces(gemma, "at it")).toEqual(["at", "\u2581i", "t"]);
      expect(gemma.decode(gemma.encode("at it", false))).toBe("at it");
      expect(llama.decode(llama.encode("at it", false))).toBe("at it");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
