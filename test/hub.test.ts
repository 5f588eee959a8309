// A hub id resolves through the standard Hugging Face cache: downloaded once from
// HF_ENDPOINT (here a loopback stand-in for the hub) into models--org--name/snapshots,
// then found there offline.
import { afterAll, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { cachedSnapshot, resolveModel } from "../src/model/resolve.ts";
import { generate } from "./helpers/engine.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const dir = mkdtempSync(join(tmpdir(), "inferneo-hub-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

test("a hub id downloads into the HF cache layout, loads, and is found again offline", async () => {
  const source = writeHfModel(join(dir, "source"), TINY, "f32", makeWeights(TINY, "f32"));
  const sha = "0123456789abcdef0123456789abcdef01234567";
  const files = readdirSync(source);
  const requests: string[] = [];
  const hub = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    fetch(req) {
      const path = new URL(req.url).pathname;
      requests.push(path);
      if (path === "/api/models/acme/tiny-llama/revision/main") {
        return Response.json({
          sha,
          siblings: [...files, "README.md", "pytorch_model.bin"].map((rfilename) => ({ rfilename })),
        });
      }
      const m = new RegExp(`^/acme/tiny-llama/resolve/${sha}/(.+)$`).exec(path);
      if (m && files.includes(m[1])) return new Response(Bun.file(join(source, m[1])));
      return new Response("not found", { status: 404 });
    },
  });
  try {
    const env = { HF_HOME: join(dir, "hf-home"), HF_ENDPOINT: `http://127.0.0.1:${hub.port}` };
    const resolved = await resolveModel("acme/tiny-llama", env);
    const snapshot = join(dir, "hf-home", "hub", "models--acme--tiny-llama", "snapshots", sha);
    expect(resolved).toEqual({ kind: "hf", dir: snapshot });
    expect(readFileSync(join(dir, "hf-home", "hub", "models--acme--tiny-llama", "refs", "main"), "utf8")).toBe(sha);
    // Only what a Llama needs is fetched.
    expect(requests.some((p) => p.endsWith("pytorch_model.bin") || p.endsWith("README.md"))).toBe(false);
    expect(existsSync(join(snapshot, "model.safetensors"))).toBe(true);

    // Cached now: resolves with the hub gone and HF_HUB_OFFLINE set.
    hub.stop(true);
    expect(cachedSnapshot("acme/tiny-llama", "main", { HF_HOME: env.HF_HOME })).toBe(snapshot);
    expect(await resolveModel("acme/tiny-llama", { HF_HOME: env.HF_HOME, HF_HUB_OFFLINE: "1" })).toEqual({
      kind: "hf",
      dir: snapshot,
    });

    const engine = await LLMEngine.create(snapshot, { threads: 1, maxNumSeqs: 1 });
    try {
      expect((await generate(engine, [1, 300, 301], { maxTokens: 4 })).ids.length).toBe(4);
    } finally {
      await engine.shutdown();
    }
  } finally {
    hub.stop(true);
  }
});
