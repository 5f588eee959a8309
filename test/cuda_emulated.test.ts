// The CUDA backend end to end, its kernels run by the host emulator (engine/cuda/emu): the
// stories260K goldens, every model family and weight type against the CPU engine, continuous
// batching with preemption, prefix caching, penalties and async scheduling, with CUDA graphs
// and without. What a GPU adds (cuBLASLt, real concurrency, speed) is scripts/gpu-check's.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine, type EngineOptions } from "../src/engine/llm_engine.ts";
import { withEmulatedCuda, HAVE_EMULATED_CUDA } from "./helpers/cuda.ts";
import { EMBEDDED_GGUF, generate, goldens, nextTokenLogits } from "./helpers/engine.ts";
import { postJson, settled, startTestServer } from "./helpers/server.ts";
import { GEMMA2, GEMMA3, QWEN2, QWEN3 } from "./helpers/families.ts";
import {
  GQA,
  makeWeights,
  quantizedWeights,
  TINY,
  writeGguf,
  writeHfModel,
  type RandomLlamaShape,
} from "./helpers/random_llama.ts";
import { argmaxAndGap, RefLlama } from "./helpers/ref_llama.ts";

setDefaultTimeout(120_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-cuda-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const cudaEngine = (path: string, options: Partial<EngineOptions> = {}) =>
  withEmulatedCuda(() => LLMEngine.create(path, { device: "cuda", threads: 1, ...options }));

describe.skipIf(!HAVE_EMULATED_CUDA)("the CUDA backend (emulated)", () => {
  for (const enforceEager of [false, true]) {
    test(`stories260K: all 7 goldens token for token, ${enforceEager ? "eager" : "decode steps replaying CUDA graphs"}`, async () => {
      const engine = await cudaEngine(EMBEDDED_GGUF, { enforceEager, maxNumSeqs: 8 });
      try {
        expect(engine.native.backendName).toBe("cuda");
        // All at once: batched decode steps (the graphs' buckets), one prefill chunk for all.
        const outs = await Promise.all(
          goldens().map((c) => generate(engine, c.prompt_ids, { maxTokens: c.completion_ids.length })),
        );
        goldens().forEach((c, i) =>
          expect({ name: c.name, ids: outs[i].ids }).toEqual({ name: c.name, ids: c.completion_ids }),
        );
        expect(engine.kv.numFreeBlocks).toBe(engine.numBlocks);
      } finally {
        await engine.shutdown();
      }
    });
  }

  test("the logits after a prompt are the CPU engine's within 1e-4", async () => {
    const cpu = await LLMEngine.create(EMBEDDED_GGUF, { device: "cpu", threads: 1 });
    const gpu = await cudaEngine(EMBEDDED_GGUF);
    try {
      for (const c of goldens()) {
        const want = nextTokenLogits(cpu, c.prompt_ids);
        const got = nextTokenLogits(gpu, c.prompt_ids);
        let maxDiff = 0;
        for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - want[i]));
        expect({ name: c.name, maxDiff }).toEqual({ name: c.name, maxDiff: expect.any(Number) });
        expect(maxDiff).toBeLessThan(1e-4);
      }
    } finally {
      await cpu.shutdown();
      await gpu.shutdown();
    }
  });

  // Every family's features (biases, q/k norms, Gemma's norms, caps and windows) from HF f32,
  // against the CPU engine; GGUF f16 too.
  const cases: { name: string; shape: RandomLlamaShape; format: "hf" | "gguf" }[] = [
    { name: "Llama GQA f32 (HF)", shape: GQA, format: "hf" },
    { name: "Qwen 2 f32 (HF)", shape: QWEN2, format: "hf" },
    { name: "Qwen 3 f32 (HF)", shape: QWEN3, format: "hf" },
    { name: "Gemma 2 f32 (HF)", shape: GEMMA2, format: "hf" },
    { name: "Gemma 3 f32 (HF)", shape: GEMMA3, format: "hf" },
    { name: "Llama GQA f16 (GGUF)", shape: GQA, format: "gguf" },
  ];
  const prompts = [[1, 17, 42, 99, 5, 300], Array.from({ length: 40 }, (_, i) => 3 + ((i * 37) % 500))];
  const fileOf = (name: string) => join(dir, name.replace(/\W+/g, "-"));
  for (const c of cases) {
    test(`${c.name}: the CPU engine's greedy tokens, logprobs within 1e-3`, async () => {
      const weights = makeWeights(c.shape, "f32");
      let path = writeHfModel(fileOf(c.name), c.shape, "f32", weights);
      if (c.format === "gguf") writeGguf((path = `${fileOf(c.name)}.gguf`), c.shape, "f16", weights);
      // f32 KV on both, so that only the kernels differ.
      const options = { kvCacheDtype: "f32" as const, maxNumSeqs: 4 };
      const cpu = await LLMEngine.create(path, { device: "cpu", threads: 1, ...options });
      const gpu = await cudaEngine(path, options);
      try {
        for (const prompt of prompts) {
          const want = await generate(cpu, prompt, { maxTokens: 12, logprobs: 1 });
          const got = await generate(gpu, prompt, { maxTokens: 12, logprobs: 1 });
          // A near tie may go either way on another backend: compare up to the first difference.
          const differ = want.ids.findIndex((t, i) => t !== got.ids[i]);
          const upTo = differ === -1 ? want.ids.length : differ;
          expect(upTo).toBeGreaterThanOrEqual(want.ids.length - 2);
          for (let i = 0; i < upTo; i++)
            expect(Math.abs(got.logprobs[i].logprob - want.logprobs[i].logprob)).toBeLessThan(1e-3);
        }
        expect(gpu.kv.numFreeBlocks).toBe(gpu.numBlocks);
      } finally {
        await cpu.shutdown();
        await gpu.shutdown();
      }
    });
  }

  // Quantized weights: the CPU meets them with 8-bit activations (as llama.cpp does), the GPU
  // with f32 ones, so each is held to the f64 reference over the weights the file really holds.
  for (const type of ["q8_0", "q4_0", "q4_k", "q6_k", "q5_0", "q3_k"] as const) {
    test(`Llama GQA ${type}: the reference's logits within 1e-3, its greedy tokens`, async () => {
      const weights = makeWeights(GQA, "f32");
      const path = `${fileOf(type)}.gguf`;
      writeGguf(path, GQA, type, weights);
      const gpu = await cudaEngine(path, { kvCacheDtype: "f32", maxNumSeqs: 2 });
      try {
        const ref = new RefLlama(GQA, quantizedWeights(weights, type), false);
        const ids = prompts[1];
        for (const t of ids.slice(0, -1)) ref.forward(t);
        let logits = ref.forward(ids[ids.length - 1]);
        const got = nextTokenLogits(gpu, ids);
        let maxDiff = 0;
        for (let v = 0; v < logits.length; v++) maxDiff = Math.max(maxDiff, Math.abs(got[v] - logits[v]));
        expect(maxDiff).toBeLessThan(1e-3);
        const { ids: tokens } = await generate(gpu, ids, { maxTokens: 8 });
        for (const [step, token] of tokens.entries()) {
          const { id } = argmaxAndGap(logits);
          expect({ step, withinTie: logits[id] - logits[token] < 2e-3 }).toEqual({ step, withinTie: true });
          logits = ref.forward(token);
        }
      } finally {
        await gpu.shutdown();
      }
    });
  }

  test("batched, preempted, penalized, prefix-cached and seeded: each request as the CPU (greedy) or as itself alone (seeded)", async () => {
    const path = writeHfModel(
      join(dir, "tiny"),
      { ...TINY, ctx: 512 },
      "f32",
      makeWeights({ ...TINY, ctx: 512 }, "f32"),
    );
    const prompt = (len: number, salt: number) =>
      Array.from({ length: len }, (_, i) => (i === 0 ? 1 : 3 + ((i * 131 + salt * 977) % 509)));
    const shared = prompt(64, 99);
    const requests = Array.from({ length: 12 }, (_, i) => ({
      prompt: i % 3 === 0 ? [...shared, ...prompt(10, i).slice(1)] : prompt(5 + ((i * 37) % 90), i),
      params: {
        maxTokens: 6 + (i % 7),
        ...(i % 4 === 1 ? { repetitionPenalty: 1.3, presencePenalty: 0.4 } : {}),
        ...(i % 4 === 2 ? { temperature: 0.8, seed: i, topK: 20, topP: 0.9 } : {}),
      },
    }));
    const tight = { maxNumSeqs: 6, maxNumBatchedTokens: 64, numBlocksOverride: 20, kvCacheDtype: "f32" as const };
    const cpu = await LLMEngine.create(path, { device: "cpu", threads: 1, ...tight });
    const gpu = await cudaEngine(path, tight);
    const alone = await cudaEngine(path, { maxNumSeqs: 1, kvCacheDtype: "f32" });
    try {
      const want = await Promise.all(requests.map((r) => generate(cpu, r.prompt, r.params)));
      const got = await Promise.all(requests.map((r) => generate(gpu, r.prompt, r.params)));
      for (const [i, r] of requests.entries()) {
        if (r.params.temperature === undefined) expect({ i, ids: got[i].ids }).toEqual({ i, ids: want[i].ids });
        else expect({ i, ids: got[i].ids }).toEqual({ i, ids: (await generate(alone, r.prompt, r.params)).ids });
      }
      expect(gpu.scheduler.numPreemptions).toBeGreaterThan(0);
      expect(gpu.kv.numPrefixHitTokens).toBeGreaterThan(0);
      expect(gpu.kv.numFreeBlocks).toBe(20);
    } finally {
      await cpu.shutdown();
      await gpu.shutdown();
      await alone.shutdown();
    }
  });

  test("over HTTP: --device cuda serves the golden completion, a JSON-schema answer, and GPU gauges", async () => {
    const s = await withEmulatedCuda(() =>
      startTestServer(EMBEDDED_GGUF, ["--device", "cuda", "--served-model-name", "m", "--max-num-seqs", "4"]),
    );
    try {
      const c = goldens()[0];
      const r = await postJson(`${s.url}/v1/completions`, {
        model: "m",
        prompt: c.prompt_ids,
        max_tokens: 40,
        temperature: 0,
        ignore_eos: true,
      });
      expect(r.status).toBe(200);
      const text = (r.json.choices as { text: string }[])[0].text;
      expect(c.completion_text_all === null || c.completion_text_all.startsWith(text)).toBe(true);
      // The grammar's masks go to the device with the sampling rows.
      const schema = {
        type: "object",
        properties: { n: { type: "integer", minimum: 0, maximum: 99 } },
        required: ["n"],
        additionalProperties: false,
      };
      const j = await postJson(`${s.url}/v1/chat/completions`, {
        model: "m",
        messages: [{ role: "user", content: "a number" }],
        max_tokens: 40,
        response_format: { type: "json_schema", json_schema: { name: "n", schema } },
      });
      expect(j.status).toBe(200);
      const answer = JSON.parse((j.json.choices as { message: { content: string } }[])[0].message.content) as {
        n: unknown;
      };
      expect(Number.isInteger(answer.n)).toBe(true);
      const m = (await (await fetch(`${s.url}/metrics`)).json()) as Record<string, unknown>;
      expect(m.gpu_utilization).toBeNull(); // no NVML under the emulator
      expect(m.gpu_memory_total_bytes).toBeGreaterThan(0);
      const prom = await (await fetch(`${s.url}/metrics`, { headers: { accept: "text/plain" } })).text();
      expect(prom).toMatch(/inferneo:gpu_memory_used_bytes\{model_name="m"\} \d+/);
      expect(await settled(s)).toBe(true);
    } finally {
      await s.stop();
    }
  });

  test("--load-format dummy: a config.json's shape with random weights, no files; the CPU refuses it", async () => {
    const folder = join(dir, "dummy");
    mkdirSync(folder);
    writeFileSync(
      join(folder, "config.json"),
      JSON.stringify({
        architectures: ["LlamaForCausalLM"],
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 1000,
        max_position_embeddings: 512,
        rope_theta: 10000,
      }),
    );
    const gpu = await cudaEngine(folder, { loadFormat: "dummy" });
    try {
      expect(gpu.model.spec.files).toEqual([]);
      expect(gpu.model.spec.dtype).toBe("bf16");
      const out = await generate(gpu, [1, 20, 30], { maxTokens: 8 });
      expect(out.ids.length).toBe(8);
    } finally {
      await gpu.shutdown();
    }
    await expect(LLMEngine.create(folder, { device: "cpu", loadFormat: "dummy" })).rejects.toThrow(
      /dummy\) weights are made by the CUDA backend/,
    );
  });
});
