import { join } from "node:path";

const CLI = join(import.meta.dir, "..", "..", "src", "cli.ts");

/** `inferneo ARGS` as a subprocess on this Bun: exit code and what it printed. */
export function runCli(args: string[], env: Record<string, string | undefined> = process.env) {
  const r = Bun.spawnSync([process.execPath, CLI, ...args], { stdout: "pipe", stderr: "pipe", env });
  return { code: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}
