// --load-format dummy (as vLLM has): a model's shape with no weights to read. The engine makes
// random weights of that shape on the device (the CUDA backend), so a benchmark of a 7B or 8B
// model needs no multi-gigabyte file. The shape comes from a config.json (a Hugging Face folder,
// or the file itself) or from a preset of a known model; the tokenizer from the folder if it has
// one, else a made-up vocabulary of the model's size (byte tokens, then letters and pairs).
import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { readHfConfig, specFromHfConfig } from "./config.ts";
import { ModelLoadError } from "./errors.ts";
import type { LoadedModel } from "./load.ts";
import type { StoredTensor } from "./safetensors.ts";
import { tokenizerFromGguf, tokenizerFromHfFolder, type ModelTokenizer } from "./tokenizer.ts";
import type { GgufFile } from "./gguf.ts";

const llama = (o: Record<string, unknown>) => ({
  architectures: ["LlamaForCausalLM"],
  hidden_act: "silu",
  rms_norm_eps: 1e-5,
  bos_token_id: 1,
  eos_token_id: 2,
  tie_word_embeddings: false,
  ...o,
});

/** config.json of known models' shapes (the fields the engine reads). */
export const DUMMY_PRESETS: Record<string, Record<string, unknown>> = {
  "llama-2-7b": llama({
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 32,
    vocab_size: 32000,
    max_position_embeddings: 4096,
    rope_theta: 10000,
  }),
  "llama-3-8b": llama({
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    vocab_size: 128256,
    max_position_embeddings: 8192,
    rope_theta: 500000,
    bos_token_id: 128000,
    eos_token_id: 128001,
  }),
  "llama-1b-gqa": llama({
    hidden_size: 2048,
    intermediate_size: 5632,
    num_hidden_layers: 22,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    vocab_size: 32000,
    max_position_embeddings: 2048,
    rope_theta: 10000,
  }),
};

/** A made-up vocabulary of n pieces: specials, the 256 byte tokens, then letters and pairs. */
export function vocabPieces(n: number): string[] {
  const pieces = ["<unk>", "<s>", "</s>"];
  for (let b = 0; b < 256; b++) pieces.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
  const letters = "etaoinshrdlcumwfgypbvkjxqz";
  const seen = new Set(pieces);
  const add = (p: string) => {
    if (pieces.length < n && !seen.has(p)) {
      pieces.push(p);
      seen.add(p);
    }
  };
  add("\u2581");
  for (const c of letters) add(c);
  for (const c of letters) add(`\u2581${c}`);
  for (const a of letters) for (const b of letters) add(`${a}${b}`);
  for (const a of letters) for (const b of letters) add(`\u2581${a}${b}`);
  // Real shapes' vocabularies go on with pieces no text makes, as Gemma's <unusedN>.
  for (let i = 0; pieces.length < n; i++) add(`<unused${i}>`);
  return pieces;
}

/** A SentencePiece-style tokenizer over vocabPieces(n), as a Llama GGUF would describe it. */
function madeUpTokenizer(n: number, bos: number | null, eos: number | null): ModelTokenizer {
  const pieces = vocabPieces(n);
  const metadata = new Map<string, unknown>([
    ["tokenizer.ggml.model", "llama"],
    ["tokenizer.ggml.tokens", pieces],
    ["tokenizer.ggml.token_type", pieces.map((_, i) => (i < 3 ? 3 : i < 259 ? 6 : 1))],
    ["tokenizer.ggml.bos_token_id", bos !== null && bos < n ? bos : 1],
    ["tokenizer.ggml.eos_token_id", eos !== null && eos < n ? eos : 2],
  ]);
  return tokenizerFromGguf({ path: "(dummy)", metadata } as unknown as GgufFile);
}

/** The tensors a config.json's model has, in HF's names, none of them in a file. */
function madeUpTensors(cfg: Record<string, unknown>): StoredTensor[] {
  const n = (k: string) => cfg[k] as number;
  const archs = (cfg.architectures as string[] | undefined) ?? [];
  const arch = archs[0] ?? "";
  if (!/^(Llama|Mistral|Qwen2|Qwen3|Gemma2|Gemma3)ForCausalLM$/.test(arch))
    throw new ModelLoadError(`--load-format dummy makes Llama, Mistral, Qwen 2/3 and Gemma 2/3 models, not ${arch}`);
  const hidden = n("hidden_size");
  const heads = n("num_attention_heads");
  const kvHeads = (cfg.num_key_value_heads as number | undefined) ?? heads;
  const hd = (cfg.head_dim as number | undefined) ?? hidden / heads;
  const ffn = n("intermediate_size");
  const out: StoredTensor[] = [];
  const dtype = cfg.torch_dtype === "float16" ? "F16" : cfg.torch_dtype === "float32" ? "F32" : "BF16";
  const add = (name: string, shape: number[]) =>
    out.push({ name, file: "(dummy)", dtype, shape, offset: 0, sizeBytes: shape.reduce((a, b) => a * b, 2) });
  add("model.embed_tokens.weight", [n("vocab_size"), hidden]);
  add("model.norm.weight", [hidden]);
  if (cfg.tie_word_embeddings !== true) add("lm_head.weight", [n("vocab_size"), hidden]);
  for (let l = 0; l < n("num_hidden_layers"); l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [hidden]);
    add(`${p}.post_attention_layernorm.weight`, [hidden]);
    add(`${p}.self_attn.q_proj.weight`, [heads * hd, hidden]);
    add(`${p}.self_attn.k_proj.weight`, [kvHeads * hd, hidden]);
    add(`${p}.self_attn.v_proj.weight`, [kvHeads * hd, hidden]);
    add(`${p}.self_attn.o_proj.weight`, [hidden, heads * hd]);
    add(`${p}.mlp.gate_proj.weight`, [ffn, hidden]);
    add(`${p}.mlp.up_proj.weight`, [ffn, hidden]);
    add(`${p}.mlp.down_proj.weight`, [hidden, ffn]);
    if (arch === "Qwen2ForCausalLM")
      for (const [k, rows] of [
        ["q", heads],
        ["k", kvHeads],
        ["v", kvHeads],
      ] as const)
        add(`${p}.self_attn.${k}_proj.bias`, [rows * hd]);
    if (arch === "Qwen3ForCausalLM" || arch === "Gemma3ForCausalLM")
      for (const k of ["q", "k"]) add(`${p}.self_attn.${k}_norm.weight`, [hd]);
    if (arch.startsWith("Gemma"))
      for (const k of ["pre_feedforward_layernorm", "post_feedforward_layernorm"]) add(`${p}.${k}.weight`, [hidden]);
  }
  // 2 bytes a weight for bf16/f16 (the reduce's seed), 4 for f32.
  if (dtype === "F32") for (const t of out) t.sizeBytes *= 2;
  return out;
}

/** The model `arg` names (a preset, an HF folder or a config.json) with random weights, in its
 * torch_dtype (bf16 where it names none). */
export function dummyModel(arg: string): LoadedModel {
  const preset = DUMMY_PRESETS[arg];
  const isFile = !preset && existsSync(arg) && statSync(arg).isFile();
  const dir = preset ? null : isFile ? dirname(arg) : arg;
  if (!preset && !existsSync(arg))
    throw new ModelLoadError(
      `--load-format dummy takes a preset (${Object.keys(DUMMY_PRESETS).join(", ")}), a model folder or a config.json; got ${arg}`,
    );
  let cfg: Record<string, unknown>;
  if (preset) cfg = { ...preset };
  else if (isFile) cfg = JSON.parse(readFileSync(arg, "utf8")) as Record<string, unknown>;
  else cfg = readHfConfig(arg);
  const spec = specFromHfConfig(cfg, preset ? `preset ${arg}` : arg, madeUpTensors(cfg), []);
  const hasTokenizer = dir !== null && existsSync(join(dir, "tokenizer.json"));
  const tokenizer = hasTokenizer
    ? tokenizerFromHfFolder(dir)
    : madeUpTokenizer(spec.config.vocabSize, spec.bosTokenId, spec.eosTokenIds[0] ?? null);
  return { source: { kind: "dummy", name: arg }, spec, tokenizer };
}
