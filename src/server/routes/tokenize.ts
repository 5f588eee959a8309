// Tokenize and detokenize (vLLM's extra routes): counted and charged like any request.
import { Elysia } from "elysia";
import { ApiError } from "../errors.ts";
import type { ServerContext } from "../state.ts";
import { DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeRequest, TokenizeResponse } from "../schemas.ts";

export function tokenizeRoutes({ state, guard }: ServerContext) {
  return new Elysia({ name: "tokenize" })
    .post(
      "/tokenize",
      async ({ body, request }) => {
        const service = state.serving();
        service.checkModel(body.model);
        const tokens =
          "prompt" in body
            ? await service.encode(body.prompt, body.add_special_tokens ?? true)
            : await service.chatPromptIds(body.messages, body.add_generation_prompt ?? true);
        guard.charge(guard.callerOf(request), tokens.length);
        return { tokens, count: tokens.length, max_model_len: service.maxModelLen };
      },
      {
        body: TokenizeRequest,
        response: { 200: TokenizeResponse, 400: ErrorResponse },
        detail: { summary: "Prompt or chat messages to token ids (vLLM extra)" },
      },
    )
    .post(
      "/detokenize",
      ({ body, request }) => {
        const service = state.serving();
        service.checkModel(body.model);
        const vocab = state.engine!.model.spec.config.vocabSize;
        const bad = body.tokens.find((t) => t >= vocab);
        if (bad !== undefined)
          throw new ApiError(
            400,
            `token id ${bad} is outside the vocabulary (0..${vocab - 1})`,
            "invalid_request_error",
            "tokens",
          );
        if (body.tokens.length > service.maxModelLen) {
          throw new ApiError(
            400,
            `${body.tokens.length} tokens are more than the model's context of ${service.maxModelLen}`,
            "invalid_request_error",
            "tokens",
          );
        }
        guard.charge(guard.callerOf(request), body.tokens.length);
        return { prompt: state.engine!.model.tokenizer.decode(body.tokens) };
      },
      {
        body: DetokenizeRequest,
        response: { 200: DetokenizeResponse, 400: ErrorResponse },
        detail: { summary: "Token ids to text (vLLM extra)" },
      },
    );
}
