// /openapi.json and Swagger UI at /docs, served offline. The document comes from the
// same schemas that validate requests (Elysia's route table through the OpenAPI
// plugin's generator); the body parser we install is a function the generator cannot
// read, so each request body is declared JSON here, with its schema under
// components.schemas and an example that "Try it out" can send as it is.
import { toOpenAPISchema } from "@elysiajs/openapi";
import type { TSchema } from "@sinclair/typebox";
import { Elysia, type AnyElysia } from "elysia";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { ApiError } from "../errors.ts";
import {
  BatchCompletionRequest,
  ChatCompletionRequest,
  CompletionRequest,
  DetokenizeRequest,
  TokenizeRequest,
} from "../schemas.ts";
import type { ServerContext } from "../state.ts";
import { VERSION } from "../state.ts";

/** Where swagger-ui-dist's files are: found when /docs first asks (a bundled server may lack it). */
let swaggerDir: string | null = null;
function swaggerFile(file: string): string {
  swaggerDir ??= dirname(createRequire(import.meta.url).resolve("swagger-ui-dist/package.json"));
  return join(swaggerDir, file);
}
const SWAGGER_ASSETS: Record<string, string> = {
  "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
  "swagger-ui.css": "text/css; charset=utf-8",
};

const SWAGGER_HTML = `<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Inferneo API</title><link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });</script>
</body></html>`;

const WEBSOCKET_PROTOCOL = `
## WebSocket chat: \`ws://HOST/v1/chat/completions\`

Send each chat request as one text message: the body of \`POST /v1/chat/completions\`, plus an
optional \`request_id\` (a string of yours, at most 128 characters). Requests on one socket run at
once (at most 16); every frame of a request carries its \`request_id\`:

- chunks: \`{"request_id": "a", "object": "chat.completion.chunk", "choices": [...]}\`, as SSE sends them;
- the end: \`{"request_id": "a", "done": true}\` (the text \`[DONE]\` for a request sent without an id);
- an error: \`{"request_id": "a", "error": {"message", "type", "param", "code"}}\`; the socket stays open.

With API keys on, pass the key as \`Authorization: Bearer KEY\` or, from a browser, \`?api_key=KEY\`.
Each message counts against the rate limit as an HTTP request does.`;

/** Request schemas by route, named in components.schemas. */
const REQUEST_BODIES: Record<string, { name: string; schema: TSchema; example: (model: string) => unknown }> = {
  "/v1/completions": {
    name: "CompletionRequest",
    schema: CompletionRequest,
    example: (model) => ({ model, prompt: "Once upon a time", max_tokens: 32, temperature: 0 }),
  },
  "/v1/chat/completions": {
    name: "ChatCompletionRequest",
    schema: ChatCompletionRequest,
    example: (model) => ({ model, messages: [{ role: "user", content: "Tell me a story." }], max_tokens: 32 }),
  },
  "/v1/completions/batch": {
    name: "BatchCompletionRequest",
    schema: BatchCompletionRequest,
    example: (model) => ({ model, prompts: ["Once upon a time", "Lily wanted to"], max_tokens: 16 }),
  },
  "/tokenize": {
    name: "TokenizeRequest",
    schema: TokenizeRequest,
    example: (model) => ({ model, prompt: "Once upon a time" }),
  },
  "/detokenize": {
    name: "DetokenizeRequest",
    schema: DetokenizeRequest,
    example: (model) => ({ model, tokens: [1, 403, 407] }),
  },
};

type Operation = { requestBody?: { content?: Record<string, unknown>; required?: boolean } };

function buildDocument(app: AnyElysia, { options }: ServerContext): Record<string, unknown> {
  const { paths } = toOpenAPISchema(app, {
    methods: ["ws"],
    paths: ["/docs", "/docs/assets/:file", "/openapi.json"],
  }) as { paths: Record<string, Record<string, Operation>> };
  const schemas: Record<string, unknown> = {};
  for (const [path, body] of Object.entries(REQUEST_BODIES)) {
    const post = paths[path]?.post;
    if (!post) continue;
    schemas[body.name] = JSON.parse(JSON.stringify(body.schema));
    post.requestBody = {
      required: true,
      content: {
        "application/json": {
          schema: { $ref: `#/components/schemas/${body.name}` },
          example: body.example(options.servedModelName),
        },
      },
    };
  }
  return {
    openapi: "3.0.3",
    info: {
      title: "Inferneo",
      version: VERSION,
      description: `OpenAI-compatible inference server.\n${WEBSOCKET_PROTOCOL}`,
    },
    paths,
    components: { schemas, securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
    security: options.apiKeys.length > 0 ? [{ bearer: [] }] : [],
  };
}

/** `root` gives the whole app once it is built: the document describes every route. */
export function docsRoutes(ctx: ServerContext, root: () => AnyElysia) {
  let document: Record<string, unknown> | null = null;
  return new Elysia({ name: "docs" })
    .get("/openapi.json", () => (document ??= buildDocument(root(), ctx)), { detail: { hide: true } })
    .get("/docs", () => new Response(SWAGGER_HTML, { headers: { "content-type": "text/html; charset=utf-8" } }), {
      detail: { hide: true },
    })
    .get(
      "/docs/assets/:file",
      ({ params }) => {
        const type = SWAGGER_ASSETS[params.file];
        if (!type) throw new ApiError(404, `no asset ${params.file}`, "invalid_request_error", null, "not_found");
        return new Response(Bun.file(swaggerFile(params.file)), {
          headers: { "content-type": type, "cache-control": "public, max-age=86400" },
        });
      },
      { detail: { hide: true } },
    );
}
