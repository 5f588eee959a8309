// Bad input is refused with a clear message, never a crash: at load (in TypeScript
// and again in the engine), per request, per step, and in the block pool.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { copyFileSync, cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";
import { InvalidRequestError, LLMEngine } from "../src/engine/llm_engine.ts";
import { DType, EngineError, NativeEngine, Status } from "../src/ffi/native.ts";
import { specFromHfFolder } from "../src/model/config.ts";
import { ModelLoadError } from "../src/model/errors.ts";
import { loadModel } from "../src/model/load.ts";
import { resolveModel } from "../src/model/resolve.ts";
import { makeWeights, TINY, writeGguf, writeHfModel, writeSafetensors } from "./helpers/random_llama.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-bad-"));
const weights = makeWeights(TINY, "f32");
let good: string;
let ggufPath: string;

beforeAll(() => {
  good = writeHfModel(join(dir, "good"), TINY, "f32", weights);
  ggufPath = join(dir, "good.gguf");
  writeGguf(ggufPath, TINY, "f32", weights);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function variant(name: string): string {
  const d = join(dir, name);
  cpSync(good, d, { recursive: true });
  return d;
}

async function loadError(path: string): Promise<string> {
  try {
    const engine = await LLMEngine.create(path, { threads: 1 });
    await engine.shutdown();
  } catch (e) {
    expect(e).toBeInstanceOf(ModelLoadError);
    return (e as Error).message;
  }
  throw new Error(`${path} loaded`);
}

describe("model loading refuses", () => {
  test("a path that does not exist", async () => {
    expect(await loadError(join(dir, "nope"))).toContain("does not exist");
  });

  test("a file that is neither a folder nor .gguf", async () => {
    const p = join(dir, "weights.bin");
    writeFileSync(p, "x");
    expect(await loadError(p)).toContain("expected a Hugging Face model folder or a .gguf file");
  });

  test("a truncated safetensors file", async () => {
    const d = variant("truncated-st");
    const st = join(d, "model.safetensors");
    truncateSync(st, readFileSync(st).length - 100);
    expect(await loadError(d)).toMatch(/truncated/);
  });

  test("a safetensors file cut inside its header", async () => {
    const d = variant("truncated-header");
    truncateSync(join(d, "model.safetensors"), 50);
    expect(await loadError(d)).toMatch(/header length .* does not fit the file/);
  });

  test("a truncated GGUF, in its data and in its header", async () => {
    const a = join(dir, "cut-data.gguf");
    copyFileSync(ggufPath, a);
    truncateSync(a, readFileSync(a).length - 64);
    expect(await loadError(a)).toMatch(/truncated/);
    const b = join(dir, "cut-header.gguf");
    copyFileSync(ggufPath, b);
    truncateSync(b, 300);
    expect(await loadError(b)).toMatch(/truncated/);
  });

  test("a tensor whose shape disagrees with config.json", async () => {
    const d = variant("wrong-shape");
    const cfg = JSON.parse(readFileSync(join(d, "config.json"), "utf8"));
    cfg.intermediate_size = 160;
    writeFileSync(join(d, "config.json"), JSON.stringify(cfg));
    expect(await loadError(d)).toMatch(
      /tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(172, 64\) but the config needs \(160, 64\)/,
    );
  });

  test("an unsupported dtype, naming it", async () => {
    const d = variant("f64");
    writeSafetensors(join(d, "model.safetensors"), weights, "f32");
    const raw = readFileSync(join(d, "model.safetensors"));
    const n = Number(raw.readBigUInt64LE(0));
    const header = raw
      .subarray(8, 8 + n)
      .toString()
      .replace('"F32"', '"I32"');
    writeFileSync(
      join(d, "model.safetensors"),
      Buffer.concat([raw.subarray(0, 8), Buffer.from(header), raw.subarray(8 + n)]),
    );
    expect(await loadError(d)).toMatch(/has dtype I32, which is not supported/);
  });

  test("a quantized GGUF type this build cannot run, naming it", async () => {
    const p = join(dir, "q2k.gguf");
    const raw = Buffer.from(readFileSync(ggufPath));
    // Retype the first 2-D tensor (token_embd, type F32 = 0) as Q2_K (10) by editing its info record.
    const name = Buffer.from("token_embd.weight");
    const at = raw.indexOf(name) + name.length; // then n_dims u32, 2 dims u64, type u32
    raw.writeUInt32LE(10, at + 4 + 16);
    writeFileSync(p, raw);
    expect(await loadError(p)).toMatch(/token_embd\.weight is Q2_K, which is not supported yet/);
  });

  test("an unsupported architecture", async () => {
    const d = variant("gpt2");
    const cfg = JSON.parse(readFileSync(join(d, "config.json"), "utf8"));
    cfg.architectures = ["GPT2LMHeadModel"];
    writeFileSync(join(d, "config.json"), JSON.stringify(cfg));
    expect(await loadError(d)).toMatch(/architecture GPT2LMHeadModel is not supported/);
  });

  test("a RoPE scaling that is not supported, and a GGUF architecture that is not", async () => {
    const d = variant("mrope");
    const cfg = JSON.parse(readFileSync(join(d, "config.json"), "utf8"));
    cfg.rope_scaling = { rope_type: "mrope", mrope_section: [16, 24, 24] };
    writeFileSync(join(d, "config.json"), JSON.stringify(cfg));
    expect(await loadError(d)).toMatch(
      /rope_scaling .*mrope.* is not supported \(supported: linear, dynamic, llama3, yarn, longrope\)/,
    );
    const p = join(dir, "grok1.gguf");
    const raw = Buffer.from(readFileSync(ggufPath));
    // Same length, so the file stays well formed: "llama" -> "grok1" in general.architecture.
    const at = raw.indexOf(Buffer.from("general.architecture")) + "general.architecture".length + 4 + 8;
    raw.write("grok1", at);
    writeFileSync(p, raw);
    expect(await loadError(p)).toMatch(
      /architecture grok1 is not supported \(supported: llama, qwen2, qwen3, phi3, gemma2, gemma3\)/,
    );
  });

  test("a hub id that is not cached, offline, with a hint to pass a path", async () => {
    const env = { HF_HOME: join(dir, "hf-home"), HF_HUB_OFFLINE: "1" };
    await expect(resolveModel("someorg/some-model", env)).rejects.toThrow(
      /not in the Hugging Face cache .* pass a local path instead/,
    );
    // Not offline but the hub is unreachable: the same kind of one-line answer.
    const unreachable = { HF_HOME: join(dir, "hf-home"), HF_ENDPOINT: "http://127.0.0.1:9" };
    await expect(resolveModel("someorg/some-model", unreachable)).rejects.toThrow(
      /could not be reached .* pass a local path instead/,
    );
  });

  test("the engine itself refuses a wrong shape and a truncated file that slipped past TypeScript", async () => {
    const spec = specFromHfFolder(good);
    const config = {
      numBlocks: 8,
      blockSizeTokens: 16,
      maxNumBatchedTokens: 64,
      maxNumSeqs: 2,
      maxBlocksPerSeq: 16,
      kvCacheDtype: DType.F32,
      cpu: { numThreads: 1, computeDtype: DType.F32 },
      kvCacheBytes: 0,
    };
    const badShape = spec.tensors.map((t) =>
      t.name.endsWith("layers.1.self_attn.k_proj.weight") ? { ...t, rows: t.rows * 2, sizeBytes: t.sizeBytes * 2 } : t,
    );
    expect(() => new NativeEngine(spec.config, config, spec.files, badShape)).toThrow(
      /shape mismatch: tensor attn_k \(layer 1\) has shape \(64, 64\); the config needs \(32, 64\)/,
    );
    const pastEnd = spec.tensors.map((t) =>
      t.name === "model.norm.weight" ? { ...t, offset: t.offset + 10_000_000 } : t,
    );
    expect(() => new NativeEngine(spec.config, config, spec.files, pastEnd)).toThrow(/past the end of its file/);
    const missing = spec.tensors.filter((t) => t.name !== "model.layers.0.mlp.up_proj.weight");
    expect(() => new NativeEngine(spec.config, config, spec.files, missing)).toThrow(
      /missing tensor ffn_up \(layer 0\)/,
    );
    expect(() => new NativeEngine(spec.config, config, [join(dir, "nope.safetensors")], spec.tensors)).toThrow(
      /cannot map model file/,
    );
  });
});

describe("requests and steps refuse", () => {
  let engine: LLMEngine;
  beforeAll(async () => {
    engine = await LLMEngine.create(good, { threads: 1, maxNumSeqs: 2, maxNumBatchedTokens: 64 });
  });
  afterAll(async () => engine?.shutdown());

  test("a prompt longer than the context, giving both numbers", () => {
    const prompt = new Array(250).fill(5);
    expect(() => engine.addRequest(prompt, { ...DEFAULT_SAMPLING, maxTokens: 10 })).toThrow(
      "this model's maximum context length is 256 tokens, but the request asks for 260 (250 in the prompt and 10 to generate)",
    );
  });

  test("empty prompts, out-of-vocabulary ids and bad sampling values", () => {
    const bad: [number[], Partial<typeof DEFAULT_SAMPLING>, RegExp][] = [
      [[], {}, /prompt is empty/],
      [[1, 512], {}, /token id 512 is outside the vocabulary/],
      [[1, -1], {}, /token id -1/],
      [[1, 2], { maxTokens: 0 }, /max_tokens must be at least 1/],
      [[1, 2], { temperature: -1 }, /temperature/],
      [[1, 2], { topP: 0 }, /top_p/],
      [[1, 2], { topK: -3 }, /top_k/],
    ];
    for (const [prompt, params, message] of bad) {
      expect(() => engine.addRequest(prompt, { ...DEFAULT_SAMPLING, ...params })).toThrow(message);
    }
    expect(() => engine.addRequest([], DEFAULT_SAMPLING)).toThrow(InvalidRequestError);
  });

  test("a step with an out-of-range token or slot is refused by the engine, which keeps working", () => {
    const n = engine.native;
    const b = n.batch;
    b.tokenIds[0] = 9999;
    b.positions[0] = 0;
    b.slotMapping[0] = 0;
    b.queryStartLoc[0] = 0;
    b.queryStartLoc[1] = 1;
    b.seqLens[0] = 1;
    b.blockTables[0] = 0;
    n.descriptors[0].setCounts(1, 1, 0, false);
    expect(() => n.stepSync()).toThrow(/token id 9999 is outside the vocabulary/);
    b.tokenIds[0] = 5;
    b.slotMapping[0] = 17;
    expect(() => n.stepSync()).toThrow(/slot 17 does not match its block table/);
    b.slotMapping[0] = 0;
    b.blockTables[0] = 1_000_000;
    expect(() => n.stepSync()).toThrow(/block table holds block 1000000/);
    b.blockTables[0] = 0;
    n.stepSync();
  });

  test("the block pool refuses a double free and an exhausted allocation, all or nothing", () => {
    const n = engine.native;
    const free0 = n.numFreeBlocks;
    const ids = n.allocateBlocks(2);
    n.refBlocks([ids[0]]);
    expect(n.refCount(ids[0])).toBe(2);
    n.freeBlocks(ids);
    expect(n.numFreeBlocks).toBe(free0 - 1);
    n.freeBlocks([ids[0]]);
    expect(n.numFreeBlocks).toBe(free0);
    try {
      n.freeBlocks([ids[1]]);
      throw new Error("double free accepted");
    } catch (e) {
      expect((e as EngineError).status).toBe(Status.INVALID_ARGUMENT);
      expect((e as Error).message).toMatch(/DoubleFree/);
    }
    expect(() => n.allocateBlocks(free0 + 1)).toThrow(/KV block pool exhausted: asked for \d+ KV blocks/);
    expect(n.numFreeBlocks).toBe(free0);
  });

  test("loading twice from the same files is fine (files are mapped, not consumed)", async () => {
    const m = await loadModel(good);
    expect(m.spec.config.numLayers).toBe(2);
  });
});
