import { dirname, join } from "node:path";
import { parseServeArgs, serveConfig, startServer } from "../../src/server/serve.ts";

export interface TestServer {
  url: string;
  stop: () => Promise<void>;
  server: Awaited<ReturnType<typeof startServer>>;
}

/** An in-process server on a free loopback port. `args` are `inferneo serve` flags. */
export async function startTestServer(model: string, args: string[] = []): Promise<TestServer> {
  const config = serveConfig(
    parseServeArgs(["--model", model, "--host", "127.0.0.1", "--port", "0", "--threads", "2", ...args], {}),
  );
  const server = await startServer(config, () => {});
  return { url: server.url, server, stop: () => server.stop("test") };
}

export async function postJson(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: Record<string, unknown>; headers: Headers }> {
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown>, headers: res.headers };
}

/** Waits until the engine holds no request and every KV block is free again. */
export async function settled(s: TestServer, timeoutMs = 10_000): Promise<boolean> {
  const e = s.server.engine;
  const start = Date.now();
  while (Date.now() - start < timeoutMs) {
    if (e.numUnfinished === 0 && e.kv.numFreeBlocks === e.numBlocks) return true;
    await Bun.sleep(10);
  }
  return false;
}

/** A real `inferneo serve` process (bin/inferneo, as a user runs it) on a free loopback port, once ready. */
export async function spawnServer(
  args: string[],
): Promise<{ url: string; proc: Bun.Subprocess<"ignore", "pipe", "pipe"> }> {
  const bin = join(import.meta.dir, "..", "..", "bin", "inferneo");
  const proc = Bun.spawn([bin, "serve", "--port", "0", ...args], {
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, PATH: `${dirname(process.execPath)}:${process.env.PATH}` },
  });
  const reader = proc.stderr.getReader();
  let log = "";
  const ready = /ready: (https?:\/\/\S+)\/v1/;
  while (!ready.test(log)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`server exited: ${log}`);
    log += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  void proc.stderr.pipeTo(new WritableStream()); // keep draining its log
  return { url: ready.exec(log)![1], proc };
}
