// Offline batch: every line of a JSONL file through one engine, concurrently,
// results written as JSONL in input order with a progress bar on stderr.
import { readFileSync } from "node:fs";
import type { LLMEngine } from "./llm_engine.ts";
import { samplingFromSnake, type SnakeSampling } from "./params.ts";
import type { SamplingParams } from "./request.ts";

export interface OfflinePrompt extends SnakeSampling {
  prompt?: string | number[];
  messages?: { role: string; content: string }[];
}

export interface OfflineResult {
  index: number;
  text?: string;
  token_ids?: number[];
  finish_reason?: string | null;
  usage?: { prompt_tokens: number; completion_tokens: number; cached_tokens: number };
  error?: string;
}

/** A prompts file that cannot be run as written: one line of text names the file, line and reason. */
export class PromptsFileError extends Error {}

/** The file's lines, each checked by `check` (which throws a message for a bad line). */
export function readPromptsFile(path: string, check: (value: unknown) => OfflinePrompt): OfflinePrompt[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new PromptsFileError(
      `${path}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`,
    );
  }
  const out: OfflinePrompt[] = [];
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      throw new PromptsFileError(`${path}:${i + 1}: not valid JSON`);
    }
    try {
      out.push(check(value));
    } catch (e) {
      throw new PromptsFileError(`${path}:${i + 1}: ${(e as Error).message}`);
    }
  });
  return out;
}

function progress(done: number, total: number, tokens: number, startMs: number): void {
  const width = 30;
  const bar = "#".repeat(Math.round((done / total) * width)).padEnd(width, ".");
  const s = (performance.now() - startMs) / 1000;
  process.stderr.write(
    `\r[${bar}] ${done}/${total} requests, ${tokens} tokens, ${(tokens / Math.max(s, 1e-3)).toFixed(1)} tok/s`,
  );
}

export async function runOffline(
  engine: LLMEngine,
  prompts: OfflinePrompt[],
  defaults: SamplingParams,
  write: (line: string) => void,
  showProgress = true,
): Promise<OfflineResult[]> {
  const results: (OfflineResult | undefined)[] = new Array(prompts.length);
  let next = 0; // results are written in input order as soon as they are contiguous
  let done = 0;
  let tokens = 0;
  const start = performance.now();
  const flush = () => {
    while (next < results.length && results[next] !== undefined) write(JSON.stringify(results[next++]));
  };
  const tok = engine.model.tokenizer;
  // At most the queue's worth in flight; the rest start as earlier ones finish.
  const limit = engine.options.maxQueueLen + engine.options.maxNumSeqs;
  let cursor = 0;
  const worker = async () => {
    while (cursor < prompts.length) {
      const index = cursor++;
      const p = prompts[index];
      try {
        const ids = p.messages
          ? tok.applyChatTemplate(p.messages).ids
          : typeof p.prompt === "string"
            ? tok.encode(p.prompt)
            : Array.isArray(p.prompt)
              ? p.prompt
              : null;
        if (ids === null) throw new Error("each line needs a prompt (string or token ids) or messages");
        let text = "";
        const outIds: number[] = [];
        let last = null;
        for await (const out of engine.addRequest(ids, samplingFromSnake(p, defaults))) {
          if (out.error) throw new Error(out.error);
          text += out.text;
          outIds.push(...out.newTokenIds);
          tokens += out.newTokenIds.length;
          last = out;
        }
        results[index] = {
          index,
          text,
          token_ids: outIds,
          finish_reason: last?.finishReason ?? null,
          usage: {
            prompt_tokens: ids.length,
            completion_tokens: outIds.length,
            cached_tokens: last?.numCachedTokens ?? 0,
          },
        };
      } catch (e) {
        results[index] = { index, error: (e as Error).message };
      }
      done += 1;
      if (showProgress) progress(done, prompts.length, tokens, start);
      flush();
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, prompts.length) }, worker));
  if (showProgress) process.stderr.write("\n");
  flush();
  return results as OfflineResult[];
}
