// `inferneo generate` as a user runs it: a subprocess, streamed text, a figures line,
// and one-line errors with a non-zero exit.
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "./helpers/cli.ts";
import { EMBEDDED_GGUF, goldens, SHARED, stories } from "./helpers/engine.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const run = (args: string[]) => runCli(args);

describe.skipIf(SHARED === null)("inferneo generate (stories260K)", () => {
  test("greedy from the HF folder prints the golden continuation and a figures line", () => {
    const g = goldens()[0];
    const r = run([
      "generate",
      "--model",
      stories("hf"),
      "--prompt",
      g.prompt,
      "--max-tokens",
      "64",
      "--temperature",
      "0",
    ]);
    expect(r.code).toBe(0);
    expect(g.completion_text_all!.startsWith(r.stdout.trimEnd())).toBe(true);
    expect(r.stdout.length).toBeGreaterThan(100);
    expect(r.stderr).toMatch(/prompt tokens: 5, generated tokens: 64, prefill: [\d.]+ tok\/s, decode: [\d.]+ tok\/s/);
  });
});

describe("inferneo generate (the embedded stories260K GGUF)", () => {
  test("sampling from the GGUF with a seed repeats itself", () => {
    const args = [
      "generate",
      "--model",
      EMBEDDED_GGUF,
      "--prompt",
      "Lily wanted to",
      "--max-tokens",
      "32",
      "--seed",
      "7",
    ];
    const a = run(args);
    const b = run(args);
    expect(a.code).toBe(0);
    expect(a.stdout).toBe(b.stdout);
    expect(a.stdout.trim().length).toBeGreaterThan(20);
  });

  test("--prompts-file runs every line and writes results in input order, each equal to its golden", () => {
    const cases = goldens();
    const dir = mkdtempSync(join(tmpdir(), "inferneo-offline-"));
    try {
      const input = join(dir, "prompts.jsonl");
      const output = join(dir, "results.jsonl");
      // Long ones first, so that they finish last and order has to be restored.
      writeFileSync(
        input,
        cases
          .map((c, i) =>
            JSON.stringify({ prompt: c.prompt_ids, max_tokens: 128 - i * 15, temperature: 0, ignore_eos: true }),
          )
          .join("\n") + "\n\n",
      );
      const r = run(["generate", "--model", EMBEDDED_GGUF, "--prompts-file", input, "--output", output]);
      expect(r.code).toBe(0);
      expect(r.stderr).toContain(`${cases.length} of ${cases.length} prompts completed`);
      const results = readFileSync(output, "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
      expect(results.map((x) => x.index)).toEqual(cases.map((_, i) => i));
      results.forEach((x, i) => expect(x.token_ids).toEqual(cases[i].completion_ids.slice(0, 128 - i * 15)));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("inferneo errors", () => {
  test("a missing model is one line and exit code 1", () => {
    const r = run(["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe("inferneo: model path /nonexistent/model does not exist");
  });

  test("--device cuda without a usable GPU is one line and exit code 1; auto runs on the CPU", () => {
    // Here either no CUDA build exists (no nvcc) or it finds no GPU: one line says which.
    const cuda = run(["generate", "--model", EMBEDDED_GGUF, "--device", "cuda", "--prompt", "hi", "--max-tokens", "2"]);
    expect(cuda.code).toBe(1);
    expect(cuda.stderr.trim().split("\n").length).toBe(1);
    expect(cuda.stderr.trim()).toMatch(/^inferneo: device cuda: (this build has no CUDA backend|no usable GPU)/);
    const auto = run(["generate", "--model", EMBEDDED_GGUF, "--device", "auto", "--prompt", "hi", "--max-tokens", "2"]);
    expect(auto.code).toBe(0);
  });

  test("serve: a bad --port or --host is one line and exit code 2", () => {
    for (const [args, message] of [
      [["--port", "99999"], "inferneo serve: --port must be a port number (0-65535), got 99999"],
      [["--port", "abc"], 'inferneo serve: --port must be a non-negative integer, got "abc"'],
      [["--host", "not a host", "--port", "0"], /^inferneo serve: cannot listen on not a host:0: /],
    ] as const) {
      const r = run(["serve", "--model", "/nonexistent/model", ...args]);
      expect(r.code).toBe(2);
      expect(r.stderr.trim().split("\n").length).toBe(1);
      if (typeof message === "string") expect(r.stderr.trim()).toBe(message);
      else expect(r.stderr.trim()).toMatch(message);
    }
  });

  test("--prompts-file: a line that is not JSON, or has a key the API refuses, is one line naming it", () => {
    const dir = mkdtempSync(join(tmpdir(), "inferneo-offline-bad-"));
    try {
      const input = join(dir, "prompts.jsonl");
      for (const [line, message] of [
        ["{not json", `${input}:2: not valid JSON`],
        ['{"prompt": "x", "frobnicate": 1}', `${input}:2: Unrecognized request argument supplied: frobnicate`],
        [
          '{"prompt": "x", "temperature": 9}',
          `${input}:2: Invalid value for 'temperature': 9 is not a number >= 0 and <= 2 or null.`,
        ],
        ['{"max_tokens": 3}', `${input}:2: each line needs a prompt (a string or token ids) or messages, not both`],
      ]) {
        writeFileSync(input, `{"prompt": "ok"}\n${line}\n`);
        const r = run(["generate", "--model", "/nonexistent/model", "--prompts-file", input]);
        expect(r.code).toBe(1);
        expect(r.stderr.trim()).toBe(`inferneo: ${message}`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a bad flag prints usage and exit code 2", () => {
    const r = run(["generate", "--model", "x", "--prompt", "y", "--max-tokens", "lots"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--max-tokens must be an integer >= 1, got 'lots'");
    expect(r.stderr).toContain("usage:");
  });
});
