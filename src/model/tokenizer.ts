// Tokenizing and chat templates. HF folders use their tokenizer.json through
// @huggingface/tokenizers; a GGUF's embedded vocabulary is turned into the
// equivalent tokenizer.json first, so both paths run the same tokenizer code.
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ModelLoadError } from "./errors.ts";
import type { GgufFile, GgufValue } from "./gguf.ts";

/** A message as chat templates read it (tool calls with arguments as objects, tool_call_id, name). */
export interface ChatMessage {
  role: string;
  content: string;
  [field: string]: unknown;
}

// Used when a model ships no chat template (base models): plain "role: content" turns.
const FALLBACK_CHAT_TEMPLATE =
  "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

type Json = Record<string, unknown>;

/** What a tokenizer is built from: enough to build the same one on another thread. */
export interface TokenizerSource {
  tokenizerJson: Json;
  tokenizerConfig: Json;
  chatTemplate: string | null;
}

export class ModelTokenizer {
  readonly source: TokenizerSource;
  /** The longest text one token stands for (UTF-16 units): bounds how much text fits in N tokens. */
  readonly maxTokenChars: number;
  /** How token pieces spell bytes, as a grammar engine must read them (xgrammar's names). */
  readonly vocabType: "byte_fallback" | "byte_level" | "raw";
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly chatTemplateSource: "model" | "fallback";
  private readonly tokenizer: Tokenizer;
  private readonly template: Template;
  private readonly specialIds: Set<number>;

  constructor(tokenizerJson: Json, tokenizerConfig: Json, chatTemplate: string | null) {
    this.source = { tokenizerJson, tokenizerConfig, chatTemplate };
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.bosToken = tokenText(tokenizerConfig.bos_token);
    this.eosToken = tokenText(tokenizerConfig.eos_token);
    this.chatTemplateSource = chatTemplate ? "model" : "fallback";
    try {
      this.template = new Template(chatTemplate ?? FALLBACK_CHAT_TEMPLATE);
    } catch (e) {
      throw new ModelLoadError(`the model's chat template does not parse: ${(e as Error).message}`);
    }
    const added = (tokenizerJson.added_tokens as { id: number; special?: boolean }[] | undefined) ?? [];
    this.specialIds = new Set(added.filter((t) => t.special).map((t) => t.id));
    this.maxTokenChars = longestPiece(tokenizerJson);
    this.vocabType = vocabTypeOf(tokenizerJson);
  }

  encode(text: string, addSpecialTokens = true): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids: readonly number[], skipSpecialTokens = true): string {
    if (ids.length === 0) return "";
    return this.tokenizer.decode(ids as number[], { skip_special_tokens: skipSpecialTokens });
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** The bytes a token stands for (byte-fallback pieces as their byte, byte-level pieces decoded). */
  tokenBytes(id: number): Uint8Array {
    const piece = this.idToToken(id) ?? "";
    if (this.vocabType === "byte_level")
      return Uint8Array.from([...piece].map((ch) => BYTE_LEVEL_DECODE.get(ch) ?? 0x3f));
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (byte) return Uint8Array.of(parseInt(byte[1], 16));
    return new TextEncoder().encode(piece.replaceAll("\u2581", " "));
  }

  /** Renders the chat template; the prompt's BOS comes from the template when it writes one. */
  /** The chat template's source (to tell which tool-call syntax its model writes). */
  get chatTemplate(): string {
    return this.source.chatTemplate ?? FALLBACK_CHAT_TEMPLATE;
  }

  applyChatTemplate(
    messages: ChatMessage[],
    addGenerationPrompt = true,
    tools: unknown[] | null = null,
  ): { text: string; ids: number[] } {
    const text = this.template.render({
      messages,
      ...(tools ? { tools } : {}),
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.bosToken ?? "",
      eos_token: this.eosToken ?? "",
    });
    const templateWritesBos = this.bosToken !== null && this.bosToken !== "" && text.startsWith(this.bosToken);
    return { text, ids: this.encode(text, !templateWritesBos) };
  }
}

/**
 * The longest vocabulary piece or added token, in UTF-16 units (a piece decodes to at most
 * that many). Infinity where one unknown-token id can stand for any run of text (fused
 * unknowns without byte fallback): no bound can be drawn from the vocabulary then.
 */
function longestPiece(tokenizerJson: Json): number {
  let longest = 1;
  const model = tokenizerJson.model as
    | {
        type?: string;
        vocab?: Record<string, number> | [string, number][];
        byte_fallback?: boolean;
        unk_token?: string | null;
        unk_id?: number | null;
      }
    | undefined;
  const unknownsFuse =
    model?.type !== "BPE" ? model?.unk_id !== null && model?.unk_id !== undefined : Boolean(model?.unk_token);
  if (unknownsFuse && !model?.byte_fallback) return Infinity;
  const vocab = model?.vocab;
  const pieces = Array.isArray(vocab) ? vocab.map(([p]) => p) : Object.keys(vocab ?? {});
  for (const p of pieces) longest = Math.max(longest, p.length);
  for (const t of (tokenizerJson.added_tokens as { content?: string }[] | undefined) ?? [])
    longest = Math.max(longest, t.content?.length ?? 0);
  return longest;
}

/** GPT-2's byte-level alphabet: each byte as a printable character, and back. */
const BYTE_LEVEL_DECODE: Map<string, number> = (() => {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const map = new Map<string, number>();
  let extra = 0;
  for (let b = 0; b < 256; b++) map.set(String.fromCharCode(printable(b) ? b : 256 + extra++), b);
  return map;
})();

function vocabTypeOf(tokenizerJson: Json): "byte_fallback" | "byte_level" | "raw" {
  if ((tokenizerJson.model as { byte_fallback?: boolean } | undefined)?.byte_fallback) return "byte_fallback";
  const parts = JSON.stringify([tokenizerJson.decoder ?? null, tokenizerJson.pre_tokenizer ?? null]);
  return parts.includes('"ByteLevel"') ? "byte_level" : "raw";
}

function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string")
    return (v as { content: string }).content;
  return null;
}

function pickTemplate(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    const named = v as { name?: string; template?: string }[];
    return named.find((t) => t.name === "default")?.template ?? named[0]?.template ?? null;
  }
  return null;
}

export function tokenizerFromHfFolder(dir: string): ModelTokenizer {
  const tokPath = join(dir, "tokenizer.json");
  if (!existsSync(tokPath))
    throw new ModelLoadError(`${dir}: no tokenizer.json (slow SentencePiece-only tokenizers are not supported)`);
  const read = (p: string): Json => {
    try {
      return JSON.parse(readFileSync(p, "utf8")) as Json;
    } catch {
      throw new ModelLoadError(`${p}: not valid JSON`);
    }
  };
  const tokenizerJson = read(tokPath);
  const configPath = join(dir, "tokenizer_config.json");
  const tokenizerConfig = existsSync(configPath) ? read(configPath) : {};
  let template = pickTemplate(tokenizerConfig.chat_template);
  const jinjaPath = join(dir, "chat_template.jinja");
  if (!template && existsSync(jinjaPath)) template = readFileSync(jinjaPath, "utf8");
  return new ModelTokenizer(tokenizerJson, tokenizerConfig, template);
}

// GGUF token types (llama.cpp's llama_token_type).
const TOKEN_TYPE = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;
const SPIECE = "\u2581";

function strings(v: GgufValue | undefined, key: string): string[] {
  if (!Array.isArray(v)) throw new ModelLoadError(`GGUF metadata ${key} is missing`);
  return v as string[];
}

// GGUF's byte-level BPE pre-tokenizers (`tokenizer.ggml.pre`, as llama.cpp names them), as the
// models' own tokenizer.json files state them: the split pattern, whether text is NFC-normalized
// first, and whether a word that is itself in the vocabulary skips the merges.
const LLAMA3_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const BPE_PRE: Record<string, { split: string; nfc: boolean; ignoreMerges: boolean }> = {
  "llama-bpe": { split: LLAMA3_SPLIT, nfc: false, ignoreMerges: true },
  llama3: { split: LLAMA3_SPLIT, nfc: false, ignoreMerges: true },
  "smaug-bpe": { split: LLAMA3_SPLIT, nfc: false, ignoreMerges: true },
  qwen2: { split: QWEN2_SPLIT, nfc: true, ignoreMerges: false },
  "gpt-2": {
    split: "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    nfc: false,
    ignoreMerges: false,
  },
};

function bpePreTokenizer(g: GgufFile): { split: string; nfc: boolean; ignoreMerges: boolean } {
  const pre = g.metadata.get("tokenizer.ggml.pre");
  // Files written before llama.cpp recorded the kind: Llama 3's, as it assumed.
  if (pre === undefined || pre === "default") return BPE_PRE["llama-bpe"];
  const known = BPE_PRE[String(pre)];
  if (!known)
    throw new ModelLoadError(
      `${g.path}: tokenizer.ggml.pre ${JSON.stringify(pre)} is not supported (supported: ${Object.keys(BPE_PRE).join(", ")})`,
    );
  return known;
}

export function tokenizerFromGguf(g: GgufFile): ModelTokenizer {
  const kind = g.metadata.get("tokenizer.ggml.model");
  const tokens = strings(g.metadata.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens");
  const typesRaw = g.metadata.get("tokenizer.ggml.token_type");
  const types = Array.isArray(typesRaw) ? (typesRaw as number[]) : tokens.map(() => TOKEN_TYPE.NORMAL);
  const num = (key: string) => {
    const v = g.metadata.get(key);
    return typeof v === "number" && v >= 0 && v < tokens.length ? v : null;
  };
  const bos = num("tokenizer.ggml.bos_token_id");
  const eos = num("tokenizer.ggml.eos_token_id");
  const unk = num("tokenizer.ggml.unknown_token_id");
  const addBos = g.metadata.get("tokenizer.ggml.add_bos_token") ?? kind === "llama";
  const addedTokens = tokens
    .map((content, id) => ({ id, content, type: types[id] }))
    .filter((t) => t.type === TOKEN_TYPE.CONTROL || t.type === TOKEN_TYPE.USER_DEFINED || t.type === TOKEN_TYPE.UNKNOWN)
    .map((t) => ({
      id: t.id,
      content: t.content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: t.type !== TOKEN_TYPE.USER_DEFINED,
    }));
  const vocab: Record<string, number> = {};
  tokens.forEach((t, i) => {
    if (!(t in vocab)) vocab[t] = i;
  });
  const postProcessor =
    addBos && bos !== null
      ? {
          type: "TemplateProcessing",
          single: [{ SpecialToken: { id: tokens[bos], type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
          pair: [
            { SpecialToken: { id: tokens[bos], type_id: 0 } },
            { Sequence: { id: "A", type_id: 0 } },
            { Sequence: { id: "B", type_id: 1 } },
          ],
          special_tokens: { [tokens[bos]]: { id: tokens[bos], ids: [bos], tokens: [tokens[bos]] } },
        }
      : null;
  let tokenizerJson: Json;
  if (kind === "llama") {
    const scoresRaw = g.metadata.get("tokenizer.ggml.scores");
    const scores = Array.isArray(scoresRaw) ? (scoresRaw as number[]) : tokens.map((_, i) => -i);
    // SentencePiece's dummy prefix: a space before the text (Llama), or none (Gemma).
    const spacePrefix = g.metadata.get("tokenizer.ggml.add_space_prefix") !== false;
    tokenizerJson = {
      version: "1.0",
      added_tokens: addedTokens,
      normalizer: {
        type: "Sequence",
        normalizers: [
          ...(spacePrefix ? [{ type: "Prepend", prepend: SPIECE }] : []),
          { type: "Replace", pattern: { String: " " }, content: SPIECE },
        ],
      },
      pre_tokenizer: null,
      post_processor: postProcessor,
      decoder: {
        type: "Sequence",
        decoders: [
          { type: "Replace", pattern: { String: SPIECE }, content: " " },
          { type: "ByteFallback" },
          { type: "Fuse" },
          ...(spacePrefix ? [{ type: "Strip", content: " ", start: 1, stop: 0 }] : []),
        ],
      },
      model: {
        type: "BPE",
        dropout: null,
        unk_token: unk !== null ? tokens[unk] : null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: true,
        byte_fallback: true,
        ignore_merges: false,
        vocab,
        merges: sentencePieceMerges(tokens, types, scores, vocab),
      },
    };
  } else if (kind === "gpt2") {
    const merges = strings(g.metadata.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges");
    const pre = bpePreTokenizer(g);
    tokenizerJson = {
      version: "1.0",
      added_tokens: addedTokens,
      normalizer: pre.nfc ? { type: "NFC" } : null,
      pre_tokenizer: {
        type: "Sequence",
        pretokenizers: [
          { type: "Split", pattern: { Regex: pre.split }, behavior: "Isolated", invert: false },
          { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
        ],
      },
      post_processor: postProcessor,
      decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
      model: {
        type: "BPE",
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: pre.ignoreMerges,
        vocab,
        merges,
      },
    };
  } else {
    throw new ModelLoadError(`${g.path}: tokenizer model ${String(kind)} is not supported (supported: llama, gpt2)`);
  }
  const tokenizerConfig: Json = {
    bos_token: bos !== null ? tokens[bos] : null,
    eos_token: eos !== null ? tokens[eos] : null,
    unk_token: unk !== null ? tokens[unk] : null,
    clean_up_tokenization_spaces: false,
    legacy: true,
  };
  const template = g.metadata.get("tokenizer.chat_template");
  return new ModelTokenizer(tokenizerJson, tokenizerConfig, typeof template === "string" ? template : null);
}

/**
 * SentencePiece merges as BPE merges: every split (a, b) of every normal piece whose
 * halves are both pieces, ranked by the merged piece's score (higher first). Merging
 * by that rank is exactly SentencePiece's (and llama2.c's) "best-scoring pair first".
 */
function sentencePieceMerges(
  tokens: string[],
  types: number[],
  scores: number[],
  vocab: Record<string, number>,
): [string, string][] {
  const merges: { a: string; b: string; score: number; id: number; split: number }[] = [];
  tokens.forEach((piece, id) => {
    if (types[id] !== TOKEN_TYPE.NORMAL && types[id] !== TOKEN_TYPE.USER_DEFINED) return;
    const chars = Array.from(piece);
    for (let split = 1; split < chars.length; split++) {
      const a = chars.slice(0, split).join("");
      const b = chars.slice(split).join("");
      if (a in vocab && b in vocab) merges.push({ a, b, score: scores[id], id, split });
    }
  });
  merges.sort((x, y) => y.score - x.score || x.id - y.id || x.split - y.split);
  return merges.map((m) => [m.a, m.b]);
}
