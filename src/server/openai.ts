// The OpenAI endpoints' logic, shared by HTTP (JSON and SSE) and the WebSocket:
// turn a request into engine requests, and engine outputs into OpenAI responses
// and stream chunks.
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../engine/async_queue.ts";
import type { LLMEngine, RequestOutput } from "../engine/llm_engine.ts";
import { samplingFromSnake } from "../engine/params.ts";
import { DEFAULT_SAMPLING, type SamplingParams, type TokenLogprob } from "../engine/request.ts";
import type { ModelTokenizer } from "../model/tokenizer.ts";
import { ApiError, notFoundModel } from "./errors.ts";
import type { BatchCompletionRequest, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse } from "./schemas.ts";

type Json = Record<string, unknown>;

interface Job {
  choice: number; // choice index in the response
  promptIds: number[];
  params: SamplingParams;
}

interface Prepared {
  id: string;
  created: number;
  jobs: Job[];
  logprobs: number | null;
  includeUsage: boolean;
}

/** One engine output, tagged with the choice it belongs to. */
interface Tagged {
  choice: number;
  out: RequestOutput;
}

export interface Running {
  outputs: AsyncGenerator<Tagged>;
  cancel: () => void;
}

export class OpenAIService {
  constructor(
    private readonly engine: LLMEngine,
    readonly servedModelName: string,
  ) {}

  private get tok(): ModelTokenizer {
    return this.engine.model.tokenizer;
  }

  checkModel(model: string | undefined): void {
    if (model !== undefined && model !== this.servedModelName) throw notFoundModel(model);
  }

  /** A token's text as OpenAI reports it in logprobs: "▁" as a space, byte tokens as their byte. */
  tokenText(id: number): string {
    const piece = this.tok.idToToken(id) ?? "";
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (byte) return String.fromCharCode(parseInt(byte[1], 16));
    return piece.replaceAll("\u2581", " ").replaceAll("\u0120", " ").replaceAll("\u010a", "\n");
  }

  private tokenBytes(id: number): number[] {
    const piece = this.tok.idToToken(id) ?? "";
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (byte) return [parseInt(byte[1], 16)];
    return [...Buffer.from(this.tokenText(id), "utf8")];
  }

  private params(body: CompletionRequest | ChatCompletionRequest | BatchCompletionRequest, maxTokens: number | null, logprobs: number | null): SamplingParams {
    return samplingFromSnake({ ...body, max_tokens: maxTokens ?? undefined, logprobs } as never, { ...DEFAULT_SAMPLING, maxTokens: maxTokens ?? 16 });
  }

  private jobs(prompts: number[][], params: SamplingParams, n: number): Job[] {
    const jobs: Job[] = [];
    prompts.forEach((promptIds, p) => {
      for (let i = 0; i < n; i++) {
        // Each of the n choices draws its own stream; a seeded request stays reproducible.
        const seed = params.seed === null ? null : params.seed + i;
        jobs.push({ choice: p * n + i, promptIds, params: { ...params, seed } });
      }
    });
    return jobs;
  }

  private promptIds(prompt: CompletionRequest["prompt"]): number[][] {
    if (typeof prompt === "string") return [this.tok.encode(prompt)];
    if (prompt.length > 0 && typeof prompt[0] === "number") return [prompt as number[]];
    return (prompt as (string | number[])[]).map((p) => (typeof p === "string" ? this.tok.encode(p) : p));
  }

  /** OpenAI refuses stream_options on a request that does not stream. */
  private static checkStreamOptions(body: { stream?: boolean | null; stream_options?: unknown }): void {
    if (body.stream_options && !body.stream) throw new ApiError(400, "stream_options is only allowed when stream is true.", "invalid_request_error", "stream_options");
  }

  prepareCompletion(body: CompletionRequest): Prepared & { echo: boolean } {
    this.checkModel(body.model);
    OpenAIService.checkStreamOptions(body);
    const prompts = this.promptIds(body.prompt);
    const params = this.params(body, body.max_tokens ?? 16, body.logprobs ?? null);
    for (const ids of prompts) this.engine.validate(ids, params);
    return {
      id: `cmpl-${randomUUID().replaceAll("-", "")}`,
      created: Math.floor(Date.now() / 1000),
      jobs: this.jobs(prompts, params, body.n ?? 1),
      logprobs: body.logprobs ?? null,
      includeUsage: body.stream_options?.include_usage === true,
      echo: body.echo === true,
    };
  }

  prepareBatch(body: BatchCompletionRequest): Prepared {
    this.checkModel(body.model);
    const prompts = body.prompts.map((p) => (typeof p === "string" ? this.tok.encode(p) : p));
    const params = this.params(body, body.max_tokens ?? 16, body.logprobs ?? null);
    for (const ids of prompts) this.engine.validate(ids, params);
    return { id: `cmpl-${randomUUID().replaceAll("-", "")}`, created: Math.floor(Date.now() / 1000), jobs: this.jobs(prompts, params, body.n ?? 1), logprobs: body.logprobs ?? null, includeUsage: false };
  }

  chatPromptIds(messages: ChatCompletionRequest["messages"], addGenerationPrompt = true): number[] {
    const flat = messages.map((m) => ({ role: m.role, content: typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join("") }));
    try {
      return this.tok.applyChatTemplate(flat, addGenerationPrompt).ids;
    } catch (e) {
      throw new ApiError(400, `the chat template could not render these messages: ${(e as Error).message}`, "invalid_request_error", "messages");
    }
  }

  prepareChat(body: ChatCompletionRequest): Prepared {
    this.checkModel(body.model);
    OpenAIService.checkStreamOptions(body);
    const promptIds = this.chatPromptIds(body.messages, body.add_generation_prompt ?? true);
    const logprobs = body.logprobs ? (body.top_logprobs ?? 0) : null;
    if (!body.logprobs && body.top_logprobs) throw new ApiError(400, "top_logprobs requires logprobs to be true", "invalid_request_error", "top_logprobs");
    // Without a limit, a chat reply may use the rest of the context, as vLLM does.
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? Math.max(1, this.engine.maxModelLen - promptIds.length);
    const params = this.params(body, maxTokens, logprobs);
    this.engine.validate(promptIds, params);
    return {
      id: `chatcmpl-${randomUUID().replaceAll("-", "")}`,
      created: Math.floor(Date.now() / 1000),
      jobs: this.jobs([promptIds], params, body.n ?? 1),
      logprobs,
      includeUsage: body.stream_options?.include_usage === true,
    };
  }

  /**
   * Starts every job now (so that a full queue is an error before any response is
   * sent) and returns their outputs as they come, tagged by choice. `cancel` aborts
   * whatever is still running: for a client that went away, at any point.
   */
  start(prepared: Prepared): Running {
    const streams: { job: Job; s: AsyncIterable<RequestOutput> & { requestId: string } }[] = [];
    const cancel = () => {
      for (const { s } of streams) this.engine.abort(s.requestId); // no-op for finished ones
    };
    try {
      for (const job of prepared.jobs) streams.push({ job, s: this.engine.addRequest(job.promptIds, job.params) });
    } catch (e) {
      cancel();
      throw e;
    }
    const merged = new AsyncQueue<Tagged | null>(cancel);
    let open = streams.length;
    for (const { job, s } of streams) {
      void (async () => {
        for await (const out of s) merged.push({ choice: job.choice, out });
        if (--open === 0) merged.push(null);
      })();
    }
    async function* outputs(): AsyncGenerator<Tagged> {
      try {
        for await (const item of merged) {
          if (item === null) return;
          yield item;
        }
      } finally {
        cancel();
      }
    }
    return { outputs: outputs(), cancel };
  }

  private usage(outs: Map<number, RequestOutput>, prepared: Prepared) {
    let prompt = 0;
    let completion = 0;
    let cached = 0;
    const countedPrompts = new Set<number[]>();
    for (const job of prepared.jobs) {
      const last = outs.get(job.choice);
      completion += last?.numOutputTokens ?? 0;
      if (countedPrompts.has(job.promptIds)) continue;
      countedPrompts.add(job.promptIds);
      prompt += job.promptIds.length;
      cached += last?.numCachedTokens ?? 0;
    }
    return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion, prompt_tokens_details: { cached_tokens: cached } };
  }

  private completionLogprobs(lps: TokenLogprob[], startOffset: number) {
    const tokens: string[] = [];
    const offsets: number[] = [];
    let offset = startOffset;
    for (const lp of lps) {
      const text = this.tokenText(lp.tokenId);
      tokens.push(text);
      offsets.push(offset);
      offset += text.length;
    }
    return {
      tokens,
      token_logprobs: lps.map((lp) => lp.logprob),
      top_logprobs: lps.map((lp) => Object.fromEntries(lp.top.map((t) => [this.tokenText(t.tokenId), t.logprob]))),
      text_offset: offsets,
    };
  }

  private chatLogprobs(lps: TokenLogprob[]) {
    return {
      content: lps.map((lp) => ({
        token: this.tokenText(lp.tokenId),
        logprob: lp.logprob,
        bytes: this.tokenBytes(lp.tokenId),
        top_logprobs: lp.top.map((t) => ({ token: this.tokenText(t.tokenId), logprob: t.logprob, bytes: this.tokenBytes(t.tokenId) })),
      })),
    };
  }

  private static failIfError(out: RequestOutput): void {
    if (out.error) throw new ApiError(500, `generation failed: ${out.error}`, "internal_error");
  }

  /** Drains a non-streamed request: each choice's text, logprobs and last output. */
  private async collect(running: Running) {
    const text = new Map<number, string>();
    const lps = new Map<number, TokenLogprob[]>();
    const last = new Map<number, RequestOutput>();
    for await (const { choice, out } of running.outputs) {
      OpenAIService.failIfError(out);
      text.set(choice, (text.get(choice) ?? "") + out.text);
      if (!lps.has(choice)) lps.set(choice, []);
      lps.get(choice)!.push(...out.newLogprobs);
      last.set(choice, out);
    }
    return { text, lps, last };
  }

  async completion(prepared: Prepared & { echo: boolean }, running = this.start(prepared)): Promise<CompletionResponse> {
    const { text, lps, last } = await this.collect(running);
    return {
      id: prepared.id,
      object: "text_completion",
      created: prepared.created,
      model: this.servedModelName,
      choices: prepared.jobs.map((job) => {
        const prefix = prepared.echo ? this.tok.decode(job.promptIds) : "";
        return {
          index: job.choice,
          text: prefix + (text.get(job.choice) ?? ""),
          logprobs: prepared.logprobs === null ? null : this.completionLogprobs(lps.get(job.choice) ?? [], prefix.length),
          finish_reason: last.get(job.choice)?.finishReason ?? null,
          stop_reason: last.get(job.choice)?.stopReason ?? null,
        };
      }),
      usage: this.usage(last, prepared),
    };
  }

  async *completionChunks(prepared: Prepared & { echo: boolean }, running: Running): AsyncGenerator<Json> {
    const base = { id: prepared.id, object: "text_completion", created: prepared.created, model: this.servedModelName };
    const last = new Map<number, RequestOutput>();
    const offsets = new Map<number, number>();
    if (prepared.echo) {
      for (const job of prepared.jobs) {
        const prefix = this.tok.decode(job.promptIds);
        offsets.set(job.choice, prefix.length);
        yield { ...base, choices: [{ index: job.choice, text: prefix, logprobs: null, finish_reason: null }] };
      }
    }
    for await (const { choice, out } of running.outputs) {
      OpenAIService.failIfError(out);
      last.set(choice, out);
      if (out.text === "" && !out.finished) continue;
      const offset = offsets.get(choice) ?? 0;
      offsets.set(choice, offset + out.text.length);
      yield {
        ...base,
        choices: [
          {
            index: choice,
            text: out.text,
            logprobs: prepared.logprobs === null ? null : this.completionLogprobs(out.newLogprobs, offset),
            finish_reason: out.finished ? out.finishReason : null,
            ...(out.finished ? { stop_reason: out.stopReason } : {}),
          },
        ],
      };
    }
    if (prepared.includeUsage) yield { ...base, choices: [], usage: this.usage(last, prepared) };
  }

  async chat(prepared: Prepared, running = this.start(prepared)): Promise<ChatCompletionResponse> {
    const { text, lps, last } = await this.collect(running);
    return {
      id: prepared.id,
      object: "chat.completion",
      created: prepared.created,
      model: this.servedModelName,
      choices: prepared.jobs.map((job) => ({
        index: job.choice,
        message: { role: "assistant" as const, content: text.get(job.choice) ?? "" },
        logprobs: prepared.logprobs === null ? null : this.chatLogprobs(lps.get(job.choice) ?? []),
        finish_reason: last.get(job.choice)?.finishReason ?? null,
        stop_reason: last.get(job.choice)?.stopReason ?? null,
      })),
      usage: this.usage(last, prepared),
    };
  }

  async *chatChunks(prepared: Prepared, running: Running): AsyncGenerator<Json> {
    const base = { id: prepared.id, object: "chat.completion.chunk", created: prepared.created, model: this.servedModelName };
    for (const job of prepared.jobs) {
      yield { ...base, choices: [{ index: job.choice, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }] };
    }
    const last = new Map<number, RequestOutput>();
    for await (const { choice, out } of running.outputs) {
      OpenAIService.failIfError(out);
      last.set(choice, out);
      if (out.text === "" && !out.finished) continue;
      yield {
        ...base,
        choices: [
          {
            index: choice,
            delta: out.text === "" ? {} : { content: out.text },
            logprobs: prepared.logprobs === null ? null : this.chatLogprobs(out.newLogprobs),
            finish_reason: out.finished ? out.finishReason : null,
            ...(out.finished ? { stop_reason: out.stopReason } : {}),
          },
        ],
      };
    }
    if (prepared.includeUsage) yield { ...base, choices: [], usage: this.usage(last, prepared) };
  }
}
