#!/usr/bin/env bun
// inferneo: the command line. `inferneo generate` runs prompts offline;
// `inferneo serve` starts the OpenAI-compatible server.
import { createWriteStream } from "node:fs";
import { parseArgs } from "node:util";
import { PromptsFileError, readPromptsFile, runOffline, type OfflinePrompt } from "./engine/offline.ts";
import { EngineError } from "./ffi/native.ts";
import { InvalidRequestError, LLMEngine, type EngineOptions } from "./engine/llm_engine.ts";
import { argOptions, ConfigError, ENGINE_KEYS, ENGINE_USAGE, engineOptionsOf, valuesFromArgs } from "./flags.ts";
import { DEFAULT_SAMPLING, type SamplingParams } from "./engine/request.ts";
import { ModelLoadError } from "./model/errors.ts";
import { QUANT_MIXES, QUANT_TYPES, quantizeGguf, type QuantTarget } from "./model/quantize_gguf.ts";
import { PromptsFileLine } from "./server/schemas.ts";
import { checkBody } from "./server/validation.ts";

/** A prompts-file line, checked as an HTTP body is: unknown keys and bad values are refused by name. */
function checkPromptLine(value: unknown): OfflinePrompt {
  const line = checkBody(PromptsFileLine, value, "line");
  if ((line.prompt === undefined) === (line.messages === undefined))
    throw new Error("each line needs a prompt (a string or token ids) or messages, not both");
  return line as OfflinePrompt;
}

const USAGE = `usage:
  inferneo generate --model <hf folder | file.gguf | org/name> --prompt <text> [options]
  inferneo serve --model <...> [--host 127.0.0.1] [--port 8000]
  inferneo quantize <in.gguf> <out.gguf> --type q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q5_k|q6_k|q3_k|iq4_nl|q4_k_m|q5_k_m

generate options:
  --max-tokens N        tokens to generate (default 128)
  --temperature T       0 = greedy (default 1.0)
  --top-p P, --top-k K, --min-p P
  --seed S              fixed seed for reproducible sampling
  --chat                wrap the prompt as a user message in the model's chat template
  --ignore-eos          keep generating past the end-of-sequence token
  --prompts-file F      run every line of a JSONL file ({"prompt": ..., "max_tokens": ...}
                        or {"messages": [...]}) and write results as JSONL, in input order
  -o, --output F        where --prompts-file results go (default: stdout)
${ENGINE_USAGE}`;

class UsageError extends Error {}

function intFlag(v: string | undefined, name: string, min = 0): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}, got '${v}'`);
  return n;
}

function floatFlag(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${v}'`);
  return n;
}

/** generate's engine flags are serve's (one table, src/flags.ts), read the same way. */
function engineOptions(parsed: Record<string, unknown>): Partial<EngineOptions> {
  return engineOptionsOf(valuesFromArgs(parsed, ENGINE_KEYS));
}

async function generate(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...argOptions(ENGINE_KEYS),
      model: { type: "string" },
      help: { type: "boolean", short: "h" },
      prompt: { type: "string" },
      "max-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-p": { type: "string" },
      "top-k": { type: "string" },
      "min-p": { type: "string" },
      seed: { type: "string" },
      chat: { type: "boolean" },
      "ignore-eos": { type: "boolean" },
      "prompts-file": { type: "string" },
      output: { type: "string", short: "o" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!values.model) throw new UsageError("--model is required");
  if (values.prompt === undefined && values["prompts-file"] === undefined)
    throw new UsageError("--prompt or --prompts-file is required");
  const params: SamplingParams = {
    ...DEFAULT_SAMPLING,
    maxTokens: intFlag(values["max-tokens"], "max-tokens", 1) ?? 128,
    temperature: floatFlag(values.temperature, "temperature") ?? 1,
    topP: floatFlag(values["top-p"], "top-p") ?? 1,
    topK: intFlag(values["top-k"], "top-k", 0) ?? 0,
    minP: floatFlag(values["min-p"], "min-p") ?? 0,
    seed: intFlag(values.seed, "seed", 0) ?? null,
    ignoreEos: values["ignore-eos"] ?? false,
  };
  if (values["prompts-file"] !== undefined) {
    const prompts = readPromptsFile(values["prompts-file"], checkPromptLine);
    const engine = await LLMEngine.create(values.model, engineOptions(values));
    try {
      const out = values.output ? createWriteStream(values.output) : null;
      const write = (line: string) => (out ? out.write(`${line}\n`) : process.stdout.write(`${line}\n`));
      const results = await runOffline(engine, prompts, params, write);
      if (out) await new Promise<void>((resolve) => out.end(resolve));
      const failed = results.filter((r) => r.error).length;
      process.stderr.write(
        `${results.length - failed} of ${results.length} prompts completed${values.output ? `, results in ${values.output}` : ""}\n`,
      );
      return failed > 0 ? 1 : 0;
    } finally {
      await engine.shutdown();
    }
  }
  // One sequence: size the engine for it rather than for a server's load.
  const engine = await LLMEngine.create(values.model, { maxNumSeqs: 1, ...engineOptions(values) });
  try {
    if (values.prompt === undefined) throw new UsageError("--prompt is required");
    const tok = engine.model.tokenizer;
    const promptIds = values.chat
      ? tok.applyChatTemplate([{ role: "user", content: values.prompt }]).ids
      : tok.encode(values.prompt);
    const t0 = performance.now();
    let tFirst = 0;
    let generated = 0;
    for await (const out of engine.addRequest(promptIds, params)) {
      if (out.error) throw new EngineError(0, out.error);
      if (out.newTokenIds.length > 0 && generated === 0) tFirst = performance.now();
      generated += out.newTokenIds.length;
      if (out.text) process.stdout.write(out.text);
    }
    const tEnd = performance.now();
    const prefillTokS = promptIds.length / ((tFirst - t0) / 1000);
    const decodeTokS = generated > 1 ? (generated - 1) / ((tEnd - tFirst) / 1000) : 0;
    process.stdout.write("\n");
    process.stderr.write(
      `prompt tokens: ${promptIds.length}, generated tokens: ${generated}, prefill: ${prefillTokS.toFixed(1)} tok/s, decode: ${decodeTokS.toFixed(1)} tok/s\n`,
    );
  } finally {
    await engine.shutdown();
  }
  return 0;
}

function quantizeCommand(argv: string[]): number {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { type: { type: "string", default: "q8_0" } },
    allowPositionals: true,
    strict: true,
  });
  const type = values.type as QuantTarget;
  if (positionals.length !== 2) throw new UsageError("quantize takes an input and an output .gguf path");
  const targets: readonly string[] = [...QUANT_TYPES, ...QUANT_MIXES];
  if (!targets.includes(type)) throw new UsageError(`--type must be one of ${targets.join(", ")}`);
  const { quantized, kept } = quantizeGguf(positionals[0], positionals[1], type, (done, total) =>
    process.stderr.write(
      `\rquantizing [${"#".repeat(Math.round((done / total) * 30)).padEnd(30, ".")}] ${done}/${total} tensors`,
    ),
  );
  process.stderr.write(`\n${positionals[1]}: ${quantized} tensors in ${type}, ${kept} kept as they were\n`);
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "generate":
        return await generate(rest);
      case "quantize":
        return quantizeCommand(rest);
      case "serve": {
        const { serve } = await import("./server/serve.ts");
        return await serve(rest);
      }
      case undefined:
      case "help":
      case "--help":
      case "-h":
        process.stdout.write(USAGE);
        return command === undefined ? 2 : 0;
      default:
        throw new UsageError(`unknown command '${command}'`);
    }
  } catch (e) {
    if (
      e instanceof UsageError ||
      e instanceof ConfigError ||
      (e instanceof TypeError && "code" in e && String(e.code).startsWith("ERR_PARSE_ARGS"))
    ) {
      process.stderr.write(`inferneo: ${(e as Error).message}\n\n${USAGE}`);
      return 2;
    }
    if (
      e instanceof ModelLoadError ||
      e instanceof InvalidRequestError ||
      e instanceof EngineError ||
      e instanceof PromptsFileError
    ) {
      process.stderr.write(`inferneo: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
