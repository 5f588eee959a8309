// LoadBalancedClient against three real `inferneo serve` replicas on loopback, while one
// is killed (SIGKILL) and another drained (SIGTERM) mid-run: every non-streamed request
// and every stream that had no token yet gets one complete answer; a stream cut after
// its first token ends with an error the caller sees; the drained replica finishes its
// streams and exits 0. The TypeScript client here, the Python one through python3.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { LoadBalancedClient } from "../src/client/index.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { spawnServer } from "./helpers/server.ts";

setDefaultTimeout(180_000);

const M = "tiny";
const REQUESTS = 200;
const CONCURRENCY = 8;
const KILL_AT = 40; // request index at which replica 0 gets SIGKILL
const DRAIN_AT = 100; // ... and replica 1 SIGTERM
const dir = mkdtempSync(join(tmpdir(), "inferneo-lb-"));
let modelPath: string;
beforeAll(() => {
  const shape = { ...TINY, ctx: 512 };
  modelPath = writeHfModel(dir, shape, "f32", makeWeights(shape, "f32"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Replica {
  url: string;
  proc: Subprocess<"ignore", "pipe", "pipe">;
}

function startReplica(): Promise<Replica> {
  return spawnServer(["--model", modelPath, "--threads", "1", "--served-model-name", M, "--drain-timeout", "60"]);
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};

describe("LoadBalancedClient through a kill and a drain", () => {
  let replicas: Replica[] = [];
  beforeAll(async () => {
    replicas = await Promise.all([startReplica(), startReplica(), startReplica()]);
  });
  afterAll(async () => {
    for (const r of replicas) r.proc.kill("SIGKILL");
  });

  test("TypeScript: 200 requests, a third streamed; nothing is lost or silent", async () => {
    const lb = new LoadBalancedClient(
      replicas.map((r) => r.url),
      { backoffMs: 200 },
    );
    const outcome = { ok: 0, streamsOk: 0, cutAfterToken: 0, failed: [] as string[] };
    const latencies: number[] = [];
    let started = 0;
    const worker = async () => {
      while (started < REQUESTS) {
        const i = started++;
        if (i === KILL_AT) replicas[0].proc.kill("SIGKILL");
        if (i === DRAIN_AT) replicas[1].proc.kill("SIGTERM");
        const t0 = performance.now();
        const body = { model: M, prompt: `request ${i}`, max_tokens: 24, ignore_eos: true, temperature: 0 };
        if (i % 3 === 0) {
          let tokens = false;
          try {
            let finish: string | null = null;
            for await (const c of await lb.completions.create({ ...body, stream: true })) {
              tokens ||= c.choices.some((x) => x.text !== "");
              finish = c.choices[0]?.finish_reason ?? finish;
            }
            if (finish === "length") outcome.streamsOk++;
            else outcome.failed.push(`stream ${i} finished ${finish}`);
          } catch (e) {
            if (tokens) outcome.cutAfterToken++;
            else outcome.failed.push(`stream ${i}: ${(e as Error).message}`);
          }
        } else {
          try {
            const r = await lb.completions.create(body);
            if (r.choices[0].finish_reason === "length" && r.usage.completion_tokens === 24) outcome.ok++;
            else outcome.failed.push(`request ${i}: ${JSON.stringify(r.choices[0])}`);
          } catch (e) {
            outcome.failed.push(`request ${i}: ${(e as Error).message}`);
          }
        }
        latencies.push(performance.now() - t0);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    console.log(
      `LoadBalancedClient (TS): ${outcome.ok} answers, ${outcome.streamsOk} whole streams, ${outcome.cutAfterToken} streams cut after a token (errors seen), ` +
        `${outcome.failed.length} lost; latency p50 ${pct(latencies, 50).toFixed(0)} ms, p99 ${pct(latencies, 99).toFixed(0)} ms`,
    );
    expect(outcome.failed).toEqual([]);
    expect(outcome.ok + outcome.streamsOk + outcome.cutAfterToken).toBe(REQUESTS);
    expect(outcome.cutAfterToken).toBeLessThanOrEqual(CONCURRENCY); // only streams in flight on the killed replica
    // The drained replica finished what it had and exited cleanly.
    expect(await replicas[1].proc.exited).toBe(0);
    expect(lb.status().find((s) => s.url === replicas[2].url)?.healthy).toBe(true);
  });

  const hasPython = spawnSync("python3", ["--version"], { stdio: "ignore" }).status === 0;
  test.skipIf(!hasPython)("Python: the same run through LoadBalancedClient", async () => {
    // Fresh replicas 0 and 1 (the TypeScript run killed and drained them); 2 kept serving.
    replicas[0] = await startReplica();
    replicas[1] = await startReplica();
    const script = join(import.meta.dir, "helpers", "lb_run.py");
    const py = Bun.spawn(
      ["python3", script, ...replicas.map((r) => r.url), "--pids", `${replicas[0].proc.pid},${replicas[1].proc.pid}`],
      {
        stdout: "pipe",
        stderr: "pipe",
        env: { ...process.env, PYTHONPATH: join(import.meta.dir, "..", "clients", "python") },
      },
    );
    const [out, err] = [await new Response(py.stdout).text(), await new Response(py.stderr).text()];
    expect(await py.exited).toBe(0);
    const r = JSON.parse(out.trim().split("\n").at(-1)!) as {
      ok: number;
      streams_ok: number;
      cut_after_token: number;
      failed: string[];
      p50_ms: number;
      p99_ms: number;
    };
    console.log(`LoadBalancedClient (Python): ${JSON.stringify(r)}${err ? `\n${err.slice(0, 500)}` : ""}`);
    expect(r.failed).toEqual([]);
    expect(r.ok + r.streams_ok + r.cut_after_token).toBe(REQUESTS);
    expect(r.cut_after_token).toBeLessThanOrEqual(CONCURRENCY);
    expect(await replicas[1].proc.exited).toBe(0);
  });
});

describe("LoadBalancedClient strategies", () => {
  test("least-loaded sends new requests to the replica with fewer running and waiting", async () => {
    const { startTestServer, postJson } = await import("./helpers/server.ts");
    // A long context, so that the long requests outlast the short ones by far (they are stopped with the servers).
    const shape = { ...TINY, ctx: 8192 };
    const longPath = writeHfModel(join(dir, "long"), shape, "f32", makeWeights(shape, "f32"));
    const busy = await startTestServer(longPath, [
      "--served-model-name",
      M,
      "--max-num-seqs",
      "2",
      "--drain-timeout",
      "0",
    ]);
    const idle = await startTestServer(longPath, ["--served-model-name", M]);
    let long: Promise<unknown>[] = [];
    try {
      // Four long requests keep `busy` running two and queueing two.
      long = Array.from({ length: 4 }, (_, i) =>
        postJson(`${busy.url}/v1/completions`, { model: M, prompt: `long ${i}`, max_tokens: 8000, ignore_eos: true }),
      );
      await Bun.sleep(100);
      const lb = new LoadBalancedClient([busy.url, idle.url], { strategy: "least-loaded" });
      // Prompt tokens count at arrival: busy's total moves only if a short request reaches it
      // (its long ones all arrived before, and may finish meanwhile).
      const before = busy.server.engine.metrics.promptTokens;
      const servedBefore = (await before.get()).values.reduce((a, v) => a + v.value, 0);
      for (let i = 0; i < 6; i++) await lb.completions.create({ model: M, prompt: `short ${i}`, max_tokens: 2 });
      const idleServed = (await idle.server.engine.metrics.requestSuccess.get()).values.reduce(
        (a, v) => a + v.value,
        0,
      );
      expect(idleServed).toBe(6);
      expect((await before.get()).values.reduce((a, v) => a + v.value, 0)).toBe(servedBefore);
    } finally {
      await busy.stop();
      await idle.stop();
      await Promise.allSettled(long);
    }
  });
});
