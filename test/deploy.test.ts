// Deployment files as a cluster and a Docker build would read them (there is no Docker
// engine or cluster here): the Dockerfiles parsed by a maintained parser, every
// Kubernetes manifest validated against its schema (kubernetes-models; KEDA and Gateway
// API from their schema packages; InferencePool has none, so its fields are checked
// here), each container's arguments parsed by the server's own flag parser, and each
// probe's path asked of a running server.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { DockerfileParser } from "dockerfile-ast";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import YAML from "yaml";
import { parseServeArgs, serveConfig } from "../src/server/serve.ts";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { runCli } from "./helpers/cli.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

setDefaultTimeout(60_000);

const ROOT = join(import.meta.dir, "..");
const DEPLOY = join(ROOT, "deploy");

type Manifest = {
  apiVersion: string;
  kind: string;
  metadata: { name: string };
  spec: Record<string, unknown>;
} & Record<string, unknown>;

function yamlFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? yamlFiles(p) : f.endsWith(".yaml") ? [p] : [];
  });
}
const manifests: { file: string; doc: Manifest }[] = yamlFiles(DEPLOY)
  .filter((f) => !f.endsWith("kustomization.yaml"))
  .flatMap((file) =>
    YAML.parseAllDocuments(readFileSync(file, "utf8")).map((d) => ({
      file: relative(ROOT, file),
      doc: d.toJS() as Manifest,
    })),
  );

/** The maintained schema class for each kind, by apiVersion/kind. */
async function schemaFor(apiVersion: string, kind: string): Promise<(new (o: unknown) => { validate(): void }) | null> {
  const paths: Record<string, string> = {
    "apps/v1/Deployment": "kubernetes-models/apps/v1/Deployment",
    "v1/Service": "kubernetes-models/v1/Service",
    "policy/v1/PodDisruptionBudget": "kubernetes-models/policy/v1/PodDisruptionBudget",
    "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    "gateway.networking.k8s.io/v1/HTTPRoute": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute",
  };
  const path = paths[`${apiVersion}/${kind}`];
  if (!path) return null;
  const mod = (await import(path)) as Record<string, new (o: unknown) => { validate(): void }>;
  return mod[kind];
}

type Container = {
  name: string;
  args: string[];
  startupProbe: Probe;
  readinessProbe: Probe;
  livenessProbe: Probe;
  ports: { containerPort: number }[];
};
type Probe = { httpGet: { path: string; port: string | number }; periodSeconds: number; failureThreshold: number };
const deployments = manifests.filter((m) => m.doc.kind === "Deployment");
const podSpec = (d: Manifest) =>
  (d.spec.template as { spec: { containers: Container[]; terminationGracePeriodSeconds: number } }).spec;

describe("Kubernetes manifests", () => {
  test("every manifest validates against its schema (InferencePool: fields checked by hand)", async () => {
    const unchecked: string[] = [];
    for (const { file, doc } of manifests) {
      const Schema = await schemaFor(doc.apiVersion, doc.kind);
      if (!Schema) {
        unchecked.push(`${doc.kind} (${file})`);
        continue;
      }
      expect(() => new Schema(doc).validate(), `${file}: ${doc.kind}`).not.toThrow();
    }
    expect(unchecked).toEqual(["InferencePool (deploy/gateway/inferencepool.yaml)"]);
    expect(deployments.map((d) => d.file).sort()).toEqual([
      "deploy/overlays/cpu/deployment.yaml",
      "deploy/overlays/gpu/deployment.yaml",
    ]);
    // Kustomizations name files that exist.
    for (const k of yamlFiles(DEPLOY).filter((f) => f.endsWith("kustomization.yaml"))) {
      for (const r of (YAML.parse(readFileSync(k, "utf8")) as { resources: string[] }).resources)
        expect(existsSync(join(k, "..", r)), `${k}: ${r}`).toBe(true);
    }
  });

  test("the InferencePool selects the Deployment's pods on the port they serve", () => {
    const pool = manifests.find((m) => m.doc.kind === "InferencePool")!.doc;
    expect(pool.apiVersion).toBe("inference.networking.k8s.io/v1");
    const spec = pool.spec as {
      selector: { matchLabels: Record<string, string> };
      targetPorts: { number: number }[];
      endpointPickerRef: { name: string; port: { number: number } };
    };
    for (const d of deployments) {
      const labels = (d.doc.spec.template as { metadata: { labels: Record<string, string> } }).metadata.labels;
      expect(labels).toMatchObject(spec.selector.matchLabels);
      expect(podSpec(d.doc).containers[0].ports[0].containerPort).toBe(spec.targetPorts[0].number);
    }
    expect(spec.endpointPickerRef.name.length).toBeGreaterThan(0);
    const route = manifests.find((m) => m.doc.kind === "HTTPRoute")!.doc;
    expect(JSON.stringify(route.spec)).toContain('"kind":"InferencePool"');
  });

  test("each container's arguments parse with the server's own parser; the grace period outlasts the drain", () => {
    for (const { file, doc } of deployments) {
      const pod = podSpec(doc);
      const c = serveConfig(parseServeArgs(pod.containers[0].args, {}));
      expect(c.host).toBe("0.0.0.0");
      expect(c.engine.metricsPrefix).toBe("vllm"); // what the endpoint picker reads by default
      expect(pod.terminationGracePeriodSeconds, file).toBeGreaterThan(c.drainTimeoutS);
      // A slow model load gets ten minutes before the startup probe gives up.
      expect(
        pod.containers[0].startupProbe.periodSeconds * pod.containers[0].startupProbe.failureThreshold,
      ).toBeGreaterThanOrEqual(600);
    }
  });

  describe("probes", () => {
    let s: TestServer;
    const dir = mkdtempSync(join(tmpdir(), "inferneo-deploy-"));
    beforeAll(async () => {
      s = await startTestServer(writeHfModel(dir, TINY, "f32", makeWeights(TINY, "f32")));
    });
    afterAll(async () => {
      await s?.stop();
      rmSync(dir, { recursive: true, force: true });
    });

    test("each probe's path answers 200 on a running server; liveness stays 200 while draining", async () => {
      for (const { doc } of deployments) {
        const c = podSpec(doc).containers[0];
        for (const probe of [c.startupProbe, c.readinessProbe, c.livenessProbe])
          expect((await fetch(s.url + probe.httpGet.path)).status).toBe(200);
      }
      s.server.state.status = "draining";
      const c = podSpec(deployments[0].doc).containers[0];
      expect((await fetch(s.url + c.readinessProbe.httpGet.path)).status).toBe(503);
      expect((await fetch(s.url + c.livenessProbe.httpGet.path)).status).toBe(200);
      s.server.state.status = "ready";
    });
  });
});

describe("what routers and the endpoint picker read", () => {
  const dir = mkdtempSync(join(tmpdir(), "inferneo-router-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const hasOpenssl = spawnSync("openssl", ["version"], { stdio: "ignore" }).status === 0;

  test.skipIf(!hasOpenssl)(
    "--metrics-prefix vllm over HTTPS: vLLM's gauge names, the cache config, and /live",
    async () => {
      const [cert, key] = [join(dir, "cert.pem"), join(dir, "key.pem")];
      const made = spawnSync(
        "openssl",
        [
          "req",
          "-x509",
          "-newkey",
          "rsa:2048",
          "-nodes",
          "-keyout",
          key,
          "-out",
          cert,
          "-days",
          "1",
          "-subj",
          "/CN=127.0.0.1",
        ],
        { stdio: "ignore" },
      );
      expect(made.status).toBe(0);
      const model = writeHfModel(dir, TINY, "f32", makeWeights(TINY, "f32"));
      const s = await startTestServer(model, [
        "--metrics-prefix",
        "vllm",
        "--ssl-certfile",
        cert,
        "--ssl-keyfile",
        key,
        "--block-size",
        "16",
        "--num-gpu-blocks-override",
        "64",
      ]);
      try {
        expect(s.url.startsWith("https://")).toBe(true);
        const insecure = { tls: { rejectUnauthorized: false } } as RequestInit;
        const text = await (await fetch(`${s.url}/metrics`, { ...insecure, headers: { accept: "text/plain" } })).text();
        for (const name of [
          "num_requests_waiting",
          "num_requests_running",
          "kv_cache_usage_perc",
          "gpu_cache_usage_perc",
          "prefix_cache_queries_total",
          "prefix_cache_hits_total",
        ]) {
          expect(text).toMatch(new RegExp(`^vllm:${name}\\{`, "m"));
        }
        expect(text).toMatch(
          /^vllm:cache_config_info\{block_size="16",num_gpu_blocks="64",enable_prefix_caching="true",model_name="[^"]+"\} 1$/m,
        );
        expect(text).not.toContain("inferneo:");
        expect((await fetch(`${s.url}/live`, insecure)).status).toBe(200);
        const json = (await (await fetch(`${s.url}/metrics`, insecure)).json()) as Record<string, unknown>;
        expect(json.kv_cache_blocks_total).toBe(64);
      } finally {
        await s.stop();
      }
    },
  );
});

describe("Dockerfiles", () => {
  for (const name of ["Dockerfile", "Dockerfile.cuda"]) {
    test(`${name}: multi-stage, the README's install, a non-root image with volumes, health check and the serve entrypoint`, () => {
      const d = DockerfileParser.parse(readFileSync(join(ROOT, name), "utf8"));
      const stages = d.getFROMs();
      expect(stages.length).toBeGreaterThanOrEqual(2);
      const instructions = d.getInstructions();
      const finalFrom = instructions.lastIndexOf(stages.at(-1)!);
      const build = instructions.slice(0, finalFrom);
      const final = instructions.slice(finalFrom);
      const args = (i: (typeof instructions)[number]) => i.getArgumentsContent() ?? "";
      const of = (list: typeof instructions, keyword: string) =>
        list.filter((i) => i.getKeyword() === keyword).map(args);
      const fromStage = (i: (typeof instructions)[number]) =>
        (i as unknown as { getFromFlag(): { getValue(): string } | null }).getFromFlag()?.getValue() ?? null;
      const copies = (list: typeof instructions) => list.filter((i) => i.getKeyword() === "COPY");
      expect(of(build, "RUN").some((r) => r.startsWith("npm ci"))).toBe(true);
      expect(of(build, "ARG")[0]).toMatch(/^INFERNEO_CPU=x86_64_v3,x86_64_v4\+avx512vnni/); // portable levels, not the build host's CPU
      expect(of(build, "ENV")).toContain("INFERNEO_CPU=${INFERNEO_CPU}");
      // Everything the build stage copies from the context exists.
      for (const c of copies(build).filter((i) => fromStage(i) === null)) {
        for (const src of args(c).split(/\s+/).slice(0, -1))
          expect(existsSync(join(ROOT, src)), `${name}: COPY ${src}`).toBe(true);
      }
      // The image takes only what the build stage made.
      expect(
        copies(final)
          .map(fromStage)
          .every((f) => f === "build"),
      ).toBe(true);
      const user = of(final, "USER")[0];
      expect(user).toBeDefined();
      expect(["0", "root"]).not.toContain(user);
      expect(of(final, "EXPOSE")).toEqual(["8000"]);
      expect(of(final, "VOLUME")[0]).toContain("/models");
      expect(of(final, "VOLUME")[0]).toContain("/cache");
      expect(of(final, "ENV")).toContain("HF_HOME=/cache/huggingface");
      expect(of(final, "HEALTHCHECK")[0]).toContain("/health");
      const entry = JSON.parse(of(final, "ENTRYPOINT")[0]) as string[];
      expect(entry.slice(0, 2)).toEqual(["/app/bin/inferneo", "serve"]);
      // `docker run IMAGE --model x` appends to the entrypoint: those arguments parse.
      expect(serveConfig(parseServeArgs([...entry.slice(2), "--model", "/models/m.gguf"], {})).model).toBe(
        "/models/m.gguf",
      );
      if (name === "Dockerfile.cuda") expect(stages.at(-1)!.getImageName()).toBe("nvidia/cuda");
    });
  }

  test(".dockerignore keeps build outputs and dependencies out of the context", () => {
    const ignored = readFileSync(join(ROOT, ".dockerignore"), "utf8").split("\n");
    for (const p of ["node_modules", "zig-out", ".zig-cache", ".git"]) expect(ignored).toContain(p);
  });
});

describe("engine builds per CPU level (what an image carries)", () => {
  test("the loader takes the richest build this CPU runs", async () => {
    const { flagsNeeded, pickLevel } = await import("../src/ffi/cpu_levels.ts");
    const levels = ["x86_64_v3", "x86_64_v4+avx512vnni", "x86_64_v4+avx512vnni+avx512bf16"];
    const v3 = ["sse4_2", "popcnt", "avx2", "fma", "bmi2", "f16c", "movbe"];
    const v4 = [...v3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];
    expect(pickLevel(levels, new Set(v3))).toBe("x86_64_v3"); // Haswell to Zen 3
    expect(pickLevel(levels, new Set([...v4, "avx512_vnni"]))).toBe("x86_64_v4+avx512vnni"); // Cascade Lake, Ice Lake
    expect(pickLevel(levels, new Set([...v4, "avx512_vnni", "avx512_bf16"]))).toBe("x86_64_v4+avx512vnni+avx512bf16"); // Zen 4, Sapphire Rapids
    expect(pickLevel(levels, new Set([...v4]))).toBe("x86_64_v3"); // AVX-512 without VNNI: v4 builds need it
    expect(pickLevel(levels, new Set(["sse4_2"]))).toBeNull();
    expect(flagsNeeded("x86_64_v4+frobnicate")).toBeNull();
  });

  const portable = join(ROOT, "zig-out", "cpu", "x86_64_v3", "lib", "libinferneo.so");
  if (!existsSync(portable))
    console.warn(
      `skipped: no portable engine build at ${portable} (INFERNEO_CPU=x86_64_v3 node scripts/build-engine.mjs; .ci/run makes it)`,
    );
  test.skipIf(!existsSync(portable))("the x86-64-v3 build (no AVX-512) gives run.c's greedy text", async () => {
    const { EMBEDDED_GGUF, goldens } = await import("./helpers/engine.ts");
    const g = goldens()[0];
    const args = [
      "generate",
      "--model",
      EMBEDDED_GGUF,
      "--prompt",
      g.prompt,
      "--max-tokens",
      "64",
      "--temperature",
      "0",
    ];
    const r = runCli(args, { ...process.env, INFERNEO_LIB: portable });
    expect(r.code).toBe(0);
    const text = r.stdout.trimEnd();
    expect(text.length).toBeGreaterThan(100);
    expect(g.completion_text_all!.startsWith(text)).toBe(true);
  });
});
