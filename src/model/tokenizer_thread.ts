// Tokenizing off the event loop: small inputs are tokenized in place (a worker round
// trip costs more than they do), large ones on one worker thread that holds its own
// copy of the tokenizer. The worker starts on first use and never keeps the process alive.
import { JobWorker } from "./job_worker.ts";
import type { ChatMessage, ModelTokenizer } from "./tokenizer.ts";

/** Inputs up to this many characters are tokenized on the calling thread (about 3 ms). */
export const IN_PLACE_CHARS_MAX = 1000;
/** Chats up to this many messages (and IN_PLACE_CHARS_MAX characters) render in place. */
const IN_PLACE_MESSAGES_MAX = 16;
/** Jobs waiting for the worker; more is a sign of a flood, refused rather than queued. */
export const WORKER_JOBS_MAX = 256;

type JobBody =
  | { kind: "encode"; text: string; addSpecialTokens: boolean }
  | { kind: "chat"; messages: ChatMessage[]; addGenerationPrompt: boolean; tools: unknown[] | null };
export type TokenizeJob = JobBody & { id: number };
export type TokenizeResult = { id: number; ids: number[] } | { id: number; error: string };

/** The tokenizer refused the input (a chat template that does not render it). */
export class TokenizeError extends Error {}

/** The worker has WORKER_JOBS_MAX jobs waiting. */
export class TokenizerBusyError extends Error {}

export class TokenizerThread {
  private readonly worker: JobWorker<TokenizeResult>;

  constructor(private readonly tokenizer: ModelTokenizer) {
    this.worker = new JobWorker<TokenizeResult>(
      new URL("./tokenizer_worker.ts", import.meta.url),
      (message) => new Error(`the tokenizer thread failed: ${message}`),
      (w) => w.postMessage({ init: tokenizer.source }),
    );
  }

  async encode(text: string, addSpecialTokens = true): Promise<number[]> {
    if (text.length <= IN_PLACE_CHARS_MAX) return this.tokenizer.encode(text, addSpecialTokens);
    return this.run({ kind: "encode", text, addSpecialTokens });
  }

  async chat(messages: ChatMessage[], addGenerationPrompt = true, tools: unknown[] | null = null): Promise<number[]> {
    const chars = messages.reduce((a, m) => a + m.content.length, 0);
    if (chars <= IN_PLACE_CHARS_MAX && messages.length <= IN_PLACE_MESSAGES_MAX) {
      try {
        return this.tokenizer.applyChatTemplate(messages, addGenerationPrompt, tools).ids;
      } catch (e) {
        throw new TokenizeError((e as Error).message);
      }
    }
    return this.run({ kind: "chat", messages, addGenerationPrompt, tools });
  }

  private async run(job: JobBody): Promise<number[]> {
    if (this.worker.numPending >= WORKER_JOBS_MAX) {
      throw new TokenizerBusyError(`${WORKER_JOBS_MAX} large inputs are already being tokenized`);
    }
    const r = await this.worker.post(job);
    if ("ids" in r) return r.ids;
    throw new TokenizeError(r.error);
  }

  terminate(): void {
    this.worker.terminate();
  }
}
