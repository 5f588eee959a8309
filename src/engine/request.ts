// A request and its lifecycle. The status order is the lifecycle:
// anything past PREEMPTED is finished.
import type { IncrementalDetokenizer } from "./detokenizer.ts";

export enum RequestStatus {
  WAITING = 0,
  RUNNING = 1,
  PREEMPTED = 2,
  FINISHED_STOPPED = 3,
  FINISHED_LENGTH = 4,
  FINISHED_ABORTED = 5,
  FINISHED_ERROR = 6,
}

export type FinishReason = "stop" | "length" | "abort" | "error";

export function isFinished(status: RequestStatus): boolean {
  return status > RequestStatus.PREEMPTED;
}

export function finishReason(status: RequestStatus): FinishReason | null {
  switch (status) {
    case RequestStatus.FINISHED_STOPPED:
      return "stop";
    case RequestStatus.FINISHED_LENGTH:
      return "length";
    case RequestStatus.FINISHED_ABORTED:
      return "abort";
    case RequestStatus.FINISHED_ERROR:
      return "error";
    default:
      return null;
  }
}

export interface SamplingParams {
  maxTokens: number;
  temperature: number;
  topP: number;
  topK: number; // 0 = off
  minP: number;
  seed: number | null; // null: a random seed per request
  stopTokenIds: number[];
  ignoreEos: boolean;
}

export const DEFAULT_SAMPLING: SamplingParams = {
  maxTokens: 16,
  temperature: 1,
  topP: 1,
  topK: 0,
  minP: 0,
  seed: null,
  stopTokenIds: [],
  ignoreEos: false,
};

export class Request {
  status = RequestStatus.WAITING;
  /** Prompt followed by every token generated so far. */
  readonly tokenIds: number[];
  numComputedTokens = 0;
  blockTable: number[] = [];
  readonly logprobs: number[] = [];
  readonly arrivalMs = performance.now();
  firstTokenMs: number | null = null;
  numPreemptions = 0;

  constructor(
    readonly id: string,
    readonly promptTokenIds: readonly number[],
    readonly params: SamplingParams,
    readonly seed: bigint,
    readonly detokenizer: IncrementalDetokenizer | null,
  ) {
    this.tokenIds = [...promptTokenIds];
  }

  get numTokens(): number {
    return this.tokenIds.length;
  }

  get numOutputTokens(): number {
    return this.tokenIds.length - this.promptTokenIds.length;
  }

  get outputTokenIds(): number[] {
    return this.tokenIds.slice(this.promptTokenIds.length);
  }
}
