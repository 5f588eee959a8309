// Request and response schemas: the single source of truth for validation, for
// the OpenAPI document behind /docs, and for the TypeScript types (`typeof X.static`).
// Field names and ranges follow OpenAI's API, plus vLLM's sampling extras.
import { Type as T } from "@sinclair/typebox";
import { t } from "elysia";
// Numbers and booleans use TypeBox's own types: Elysia's accept numeric strings, OpenAI does not.

const strict = { additionalProperties: false } as const;

const Stop = t.Union([t.String(), t.Array(t.String(), { maxItems: 16 }), t.Null()], {
  description: "Up to 16 sequences where generation stops; not included in the output.",
});

// Sampling fields shared by completions, chat and batch.
const samplingFields = {
  temperature: t.Optional(
    t.Union([T.Number({ minimum: 0, maximum: 2 }), t.Null()], { description: "0 = greedy. Default 1." }),
  ),
  top_p: t.Optional(t.Union([T.Number({ exclusiveMinimum: 0, maximum: 1 }), t.Null()])),
  top_k: t.Optional(t.Union([T.Integer({ minimum: -1 }), t.Null()], { description: "vLLM extra: -1 or 0 = off." })),
  min_p: t.Optional(t.Union([T.Number({ minimum: 0, maximum: 1 }), t.Null()], { description: "vLLM extra." })),
  presence_penalty: t.Optional(t.Union([T.Number({ minimum: -2, maximum: 2 }), t.Null()])),
  frequency_penalty: t.Optional(t.Union([T.Number({ minimum: -2, maximum: 2 }), t.Null()])),
  repetition_penalty: t.Optional(
    t.Union([T.Number({ exclusiveMinimum: 0, maximum: 10 }), t.Null()], { description: "vLLM extra: 1 = off." }),
  ),
  logit_bias: t.Optional(
    t.Union(
      [
        t.Record(t.String({ pattern: "^[0-9]+$" }), T.Number({ minimum: -100, maximum: 100 }), {
          additionalProperties: false,
        }),
        t.Null(),
      ],
      {
        description: "A map of token ids (as strings) to biases in [-100, 100].",
      },
    ),
  ),
  seed: t.Optional(t.Union([T.Integer({ minimum: -(2 ** 53), maximum: 2 ** 53 }), t.Null()])),
  stop: t.Optional(Stop),
  stop_token_ids: t.Optional(
    t.Union([t.Array(T.Integer({ minimum: 0 }), { maxItems: 256 }), t.Null()], { description: "vLLM extra." }),
  ),
  ignore_eos: t.Optional(T.Boolean({ description: "vLLM extra." })),
  min_tokens: t.Optional(T.Integer({ minimum: 0, description: "vLLM extra." })),
  n: t.Optional(t.Union([T.Integer({ minimum: 1, maximum: 16 }), t.Null()])),
  stream: t.Optional(t.Union([T.Boolean(), t.Null()])),
  stream_options: t.Optional(t.Union([t.Object({ include_usage: t.Optional(T.Boolean()) }, strict), t.Null()])),
  user: t.Optional(t.String({ maxLength: 256 })),
};

export const ResponseFormat = t.Union(
  [
    t.Object({ type: t.Literal("text") }, strict),
    t.Object({ type: t.Literal("json_object") }, strict),
    t.Object(
      {
        type: t.Literal("json_schema"),
        json_schema: t.Object(
          {
            name: t.String({ minLength: 1, maxLength: 64, pattern: "^[a-zA-Z0-9_-]+$" }),
            description: t.Optional(t.String()),
            schema: t.Optional(t.Record(t.String(), t.Unknown())),
            strict: t.Optional(t.Union([T.Boolean(), t.Null()])),
          },
          strict,
        ),
      },
      strict,
    ),
  ],
  { description: "A response format: text, any JSON object, or JSON valid against a JSON schema." },
);
export type ResponseFormat = typeof ResponseFormat.static;

export const StructuredOutputs = t.Object(
  {
    choice: t.Optional(t.Array(t.String({ minLength: 1 }), { minItems: 1, maxItems: 256 })),
    regex: t.Optional(t.String({ minLength: 1, maxLength: 2000 })),
    json: t.Optional(t.Record(t.String(), t.Unknown())),
  },
  {
    ...strict,
    description: "vLLM extra: exactly one of choice (one of these strings), regex, or json (a JSON schema).",
  },
);
export type StructuredOutputs = typeof StructuredOutputs.static;

const TokenIds = t.Array(T.Integer({ minimum: 0 }), { minItems: 1 });
export const PromptSchema = t.Union(
  [
    t.String(),
    t.Array(t.String(), { minItems: 1, maxItems: 64 }),
    TokenIds,
    t.Array(TokenIds, { minItems: 1, maxItems: 64 }),
  ],
  {
    description: "A string, a list of strings, a list of token ids, or a list of lists of token ids.",
  },
);

export const CompletionRequest = t.Object(
  {
    model: t.String({ minLength: 1 }),
    prompt: PromptSchema,
    max_tokens: t.Optional(t.Union([T.Integer({ minimum: 1 }), t.Null()], { description: "Default 16." })),
    echo: t.Optional(t.Union([T.Boolean(), t.Null()])),
    logprobs: t.Optional(t.Union([T.Integer({ minimum: 0, maximum: 20 }), t.Null()])),
    best_of: t.Optional(
      t.Union([T.Integer({ minimum: 1, maximum: 1 }), t.Null()], { description: "Only 1 is supported." }),
    ),
    suffix: t.Optional(t.Null({ description: "Not supported; must be null." })),
    response_format: t.Optional(t.Union([ResponseFormat, t.Null()], { description: "vLLM extra on completions." })),
    structured_outputs: t.Optional(t.Union([StructuredOutputs, t.Null()])),
    ...samplingFields,
  },
  { ...strict, description: "OpenAI text completion request" },
);
export type CompletionRequest = typeof CompletionRequest.static;

const TextPart = t.Object({ type: t.Literal("text"), text: t.String() }, strict);
const FunctionName = t.String({
  pattern: "^[a-zA-Z0-9_-]{1,64}$",
  description: "Letters, digits, _ and -; at most 64.",
});
export const ToolCallSchema = t.Object(
  {
    id: t.String({ maxLength: 256 }),
    type: t.Literal("function"),
    function: t.Object(
      { name: FunctionName, arguments: t.String({ description: "The arguments, a JSON string." }) },
      strict,
    ),
  },
  strict,
);
export const ChatMessage = t.Object(
  {
    role: t.Union([
      t.Literal("system"),
      t.Literal("developer"),
      t.Literal("user"),
      t.Literal("assistant"),
      t.Literal("tool"),
    ]),
    content: t.Optional(t.Union([t.String(), t.Array(TextPart, { minItems: 1 }), t.Null()])),
    name: t.Optional(t.String()),
    tool_calls: t.Optional(t.Array(ToolCallSchema, { maxItems: 128, description: "An assistant message's calls." })),
    tool_call_id: t.Optional(t.String({ maxLength: 256, description: "A tool message's answer to this call." })),
  },
  strict,
);

const Tool = t.Object(
  {
    type: t.Literal("function"),
    function: t.Object(
      {
        name: FunctionName,
        description: t.Optional(t.String()),
        parameters: t.Optional(t.Record(t.String(), t.Unknown(), { description: "A JSON schema of the arguments." })),
        strict: t.Optional(t.Union([T.Boolean(), t.Null()])),
      },
      strict,
    ),
  },
  strict,
);
const ToolChoice = t.Union(
  [
    t.Literal("none"),
    t.Literal("auto"),
    t.Literal("required"),
    t.Object({ type: t.Literal("function"), function: t.Object({ name: FunctionName }, strict) }, strict),
    t.Null(),
  ],
  { description: "A string none, auto or required, or a named function." },
);

export const ChatCompletionRequest = t.Object(
  {
    model: t.String({ minLength: 1 }),
    messages: t.Array(ChatMessage, { minItems: 1 }),
    max_tokens: t.Optional(t.Union([T.Integer({ minimum: 1 }), t.Null()])),
    max_completion_tokens: t.Optional(t.Union([T.Integer({ minimum: 1 }), t.Null()])),
    logprobs: t.Optional(t.Union([T.Boolean(), t.Null()])),
    top_logprobs: t.Optional(t.Union([T.Integer({ minimum: 0, maximum: 20 }), t.Null()])),
    add_generation_prompt: t.Optional(T.Boolean({ description: "vLLM extra. Default true." })),
    response_format: t.Optional(t.Union([ResponseFormat, t.Null()])),
    structured_outputs: t.Optional(t.Union([StructuredOutputs, t.Null()])),
    tools: t.Optional(t.Union([t.Array(Tool, { maxItems: 128 }), t.Null()])),
    tool_choice: t.Optional(ToolChoice),
    parallel_tool_calls: t.Optional(t.Union([T.Boolean(), t.Null()])),
    ...samplingFields,
  },
  { ...strict, description: "OpenAI chat completion request" },
);
export type ChatCompletionRequest = typeof ChatCompletionRequest.static;

export const BatchCompletionRequest = t.Object(
  {
    model: t.String({ minLength: 1 }),
    prompts: t.Array(t.Union([t.String(), TokenIds]), { minItems: 1, maxItems: 256 }),
    max_tokens: t.Optional(t.Union([T.Integer({ minimum: 1 }), t.Null()])),
    logprobs: t.Optional(t.Union([T.Integer({ minimum: 0, maximum: 20 }), t.Null()])),
    ...samplingFields,
  },
  { ...strict, description: "Runs every prompt concurrently; one completion per prompt, in order." },
);
export type BatchCompletionRequest = typeof BatchCompletionRequest.static;

export const TokenizeRequest = t.Union([
  t.Object({ model: t.Optional(t.String()), prompt: t.String(), add_special_tokens: t.Optional(T.Boolean()) }, strict),
  t.Object(
    {
      model: t.Optional(t.String()),
      messages: t.Array(ChatMessage, { minItems: 1 }),
      add_generation_prompt: t.Optional(T.Boolean()),
    },
    strict,
  ),
]);
export type TokenizeRequest = typeof TokenizeRequest.static;

// A line of `inferneo generate --prompts-file`: a prompt or chat messages and the sampling
// fields the offline runner honours, checked as strictly as an HTTP body.
const { stream: _s, stream_options: _so, n: _n, user: _u, ...offlineSampling } = samplingFields;
export const PromptsFileLine = t.Object(
  {
    model: t.Optional(t.String()),
    prompt: t.Optional(t.Union([t.String(), TokenIds], { description: "A string or a list of token ids." })),
    messages: t.Optional(
      t.Array(t.Object({ role: t.String({ minLength: 1 }), content: t.String() }, strict), { minItems: 1 }),
    ),
    max_tokens: t.Optional(T.Integer({ minimum: 1 })),
    logprobs: t.Optional(t.Union([T.Integer({ minimum: 0, maximum: 20 }), t.Null()])),
    ...offlineSampling,
  },
  strict,
);

export const DetokenizeRequest = t.Object(
  { model: t.Optional(t.String()), tokens: t.Array(T.Integer({ minimum: 0 })) },
  strict,
);

export const ErrorResponse = t.Object(
  {
    error: t.Object({
      message: t.String(),
      type: t.String(),
      param: t.Union([t.String(), t.Null()]),
      code: t.Union([t.String(), t.Null()]),
    }),
  },
  { description: "Every error, OpenAI's shape" },
);

const Usage = t.Object({
  prompt_tokens: T.Integer(),
  completion_tokens: T.Integer(),
  total_tokens: T.Integer(),
  prompt_tokens_details: t.Object({ cached_tokens: T.Integer() }),
});

const CompletionLogprobs = t.Object({
  tokens: t.Array(t.String()),
  token_logprobs: t.Array(t.Union([T.Number(), t.Null()])),
  top_logprobs: t.Array(t.Union([t.Record(t.String(), T.Number()), t.Null()])),
  text_offset: t.Array(T.Integer()),
});

export const CompletionResponse = t.Object({
  id: t.String(),
  object: t.Literal("text_completion"),
  created: T.Integer(),
  model: t.String(),
  choices: t.Array(
    t.Object({
      index: T.Integer(),
      text: t.String(),
      logprobs: t.Union([CompletionLogprobs, t.Null()]),
      finish_reason: t.Union([t.String(), t.Null()]),
      stop_reason: t.Optional(t.Union([t.String(), T.Integer(), t.Null()])),
    }),
  ),
  usage: Usage,
});
export type CompletionResponse = typeof CompletionResponse.static;

const ChatTokenLogprob = t.Object({
  token: t.String(),
  logprob: T.Number(),
  bytes: t.Array(T.Integer()),
  top_logprobs: t.Array(t.Object({ token: t.String(), logprob: T.Number(), bytes: t.Array(T.Integer()) })),
});

export const ChatCompletionResponse = t.Object({
  id: t.String(),
  object: t.Literal("chat.completion"),
  created: T.Integer(),
  model: t.String(),
  choices: t.Array(
    t.Object({
      index: T.Integer(),
      message: t.Object({
        role: t.Literal("assistant"),
        content: t.Union([t.String(), t.Null()]),
        tool_calls: t.Optional(t.Array(ToolCallSchema)),
      }),
      logprobs: t.Union([t.Object({ content: t.Array(ChatTokenLogprob) }), t.Null()]),
      finish_reason: t.Union([t.String(), t.Null()]),
      stop_reason: t.Optional(t.Union([t.String(), T.Integer(), t.Null()])),
    }),
  ),
  usage: Usage,
});
export type ChatCompletionResponse = typeof ChatCompletionResponse.static;

export const BatchCompletionResponse = t.Object({ object: t.Literal("list"), data: t.Array(CompletionResponse) });

export const ModelList = t.Object({
  object: t.Literal("list"),
  data: t.Array(
    t.Object({
      id: t.String(),
      object: t.Literal("model"),
      created: T.Integer(),
      owned_by: t.String(),
      max_model_len: T.Integer(),
    }),
  ),
});

export const Health = t.Object({ status: t.String() });
export const Version = t.Object({ version: t.String() });
export const TokenizeResponse = t.Object({
  tokens: t.Array(T.Integer()),
  count: T.Integer(),
  max_model_len: T.Integer(),
});
export const DetokenizeResponse = t.Object({ prompt: t.String() });
