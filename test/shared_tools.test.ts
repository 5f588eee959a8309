// Models made by the shared generator (make_random_llama.py) against the shared
// numpy reference (ref_llama_numpy.py): the same greedy tokens from the HF folder
// and from the GGUF. Skips where ../shared or python3 with numpy is absent.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { generate, nextTokenLogits, SHARED } from "./helpers/engine.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const hasNumpy = spawnSync("python3", ["-c", "import numpy"], { stdio: "ignore" }).status === 0;
if (SHARED !== null && !hasNumpy)
  console.warn("skipped: python3 with numpy is not available for the shared reference tools");

const dir = mkdtempSync(join(tmpdir(), "inferneo-shared-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function python(args: string[]): string {
  const r = spawnSync("python3", args, { encoding: "utf8", maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`python3 ${args.join(" ")} failed: ${r.stderr}`);
  return r.stdout;
}

const STEPS = 16;
const PROMPT = [1, 400, 500, 600, 31, 1000, 7];

const cases = [
  {
    name: "tiny preset, f32",
    args: ["--preset", "tiny", "--hf-dtype", "f32", "--gguf-dtypes", "f32"],
    gguf: "tiny-f32.gguf",
  },
  {
    name: "GQA 4:1, head_dim 64, untied, rope_theta 500000, f16",
    args: [
      "--preset",
      "tiny",
      "--dim",
      "512",
      "--n-heads",
      "8",
      "--n-kv-heads",
      "2",
      "--n-layers",
      "2",
      "--ffn",
      "1024",
      "--vocab",
      "4096",
      "--rope-theta",
      "500000",
      "--hf-dtype",
      "f16",
      "--gguf-dtypes",
      "f16",
    ],
    gguf: "tiny-f16.gguf",
  },
];

describe.skipIf(SHARED === null || !hasNumpy)("shared generator and numpy reference", () => {
  for (const [i, c] of cases.entries()) {
    test(c.name, async () => {
      const out = join(dir, `m${i}`);
      python([join(SHARED!, "tools", "make_random_llama.py"), ...c.args, "--out", out]);
      const ref = JSON.parse(
        python([
          join(SHARED!, "tools", "ref_llama_numpy.py"),
          join(out, "hf"),
          "--tokens",
          PROMPT.join(","),
          "-n",
          String(STEPS),
          "--top",
          "2",
        ]),
      ) as {
        generated: number[];
        top: [number, number][][];
      };
      // Compare up to the reference's first near-tie (none is expected with these seeds).
      let exact = ref.generated.length;
      ref.top.forEach((top, step) => {
        if (step < exact && top[0][1] - top[1][1] < 1e-3) exact = step;
      });
      expect(exact).toBeGreaterThanOrEqual(8);
      for (const path of [join(out, "hf"), join(out, c.gguf)]) {
        const engine = await LLMEngine.create(path, { threads: 2, maxNumSeqs: 2, kvCacheDtype: "f32" });
        try {
          const { ids } = await generate(engine, PROMPT, { maxTokens: STEPS });
          expect({ path, ids: ids.slice(0, exact) }).toEqual({ path, ids: ref.generated.slice(0, exact) });
        } finally {
          await engine.shutdown();
        }
      }
    });
  }
});

// Qwen 2 and Qwen 3 from the shared generator, whose GGUF writer is not ours (the numpy
// reference runs Llama only): the HF folder and the GGUF give the same logits and tokens.
const qwenCases = [
  { arch: "qwen2", extra: [] as string[] },
  { arch: "qwen3", extra: ["--head-dim", "64"] },
];

describe.skipIf(SHARED === null || !hasNumpy)("shared generator: Qwen from safetensors and from GGUF", () => {
  for (const c of qwenCases) {
    test(`${c.arch}: the same logits and greedy tokens from both formats`, async () => {
      const out = join(dir, c.arch);
      python([
        join(SHARED!, "tools", "make_random_llama.py"),
        ...["--preset", "tiny", "--arch", c.arch, "--dim", "256", "--n-heads", "4", "--n-kv-heads", "2"],
        ...["--vocab", "1024", "--std", "0.05", "--hf-dtype", "f32", "--gguf-dtypes", "f32", ...c.extra],
        ...["--out", out],
      ]);
      const results: { logits: Float32Array; ids: number[] }[] = [];
      for (const path of [join(out, "hf"), join(out, "tiny-f32.gguf")]) {
        const engine = await LLMEngine.create(path, { threads: 2, maxNumSeqs: 2, kvCacheDtype: "f32" });
        try {
          const logits = nextTokenLogits(engine, PROMPT);
          results.push({ logits, ids: (await generate(engine, PROMPT, { maxTokens: STEPS })).ids });
        } finally {
          await engine.shutdown();
        }
      }
      const [hf, gguf] = results;
      const diff = Math.max(...hf.logits.map((v, k) => Math.abs(v - gguf.logits[k])));
      expect(diff).toBeLessThan(1e-4);
      expect(gguf.ids).toEqual(hf.ids);
    });
  }
});
