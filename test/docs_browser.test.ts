// /docs in a real browser: headless Chromium (Debian's package, driven by
// playwright-core) loads Swagger UI from the server alone, sees the operations,
// executes GET /v1/models, and sends a real completion with "Try it out" (the
// request body the document gives). Skips where Chromium is absent.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeWeights, TINY, writeHfModel } from "./helpers/random_llama.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

// Model loads, servers and browsers take seconds on two cores; `bun test` alone defaults to 5 s.
setDefaultTimeout(60_000);

const CHROMIUM = process.env.INFERNEO_CHROMIUM ?? "/usr/bin/chromium";
const hasChromium = existsSync(CHROMIUM);
if (!hasChromium)
  console.warn(`skipped: no Chromium at ${CHROMIUM} for the /docs browser test (apt-get install chromium)`);

const dir = mkdtempSync(join(tmpdir(), "inferneo-docs-"));
let s: TestServer;
beforeAll(async () => {
  if (!hasChromium) return;
  s = await startTestServer(writeHfModel(dir, TINY, "f32", makeWeights(TINY, "f32")), [
    "--served-model-name",
    "tiny-docs",
  ]);
});
afterAll(async () => {
  await s?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test.skipIf(!hasChromium)(
  "Swagger UI at /docs works offline, runs GET /v1/models and a POST /v1/completions",
  async () => {
    const { chromium } = await import("playwright-core");
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    try {
      const page = await browser.newPage();
      const external: string[] = [];
      page.on("request", (r) => {
        if (!r.url().startsWith(s.url)) external.push(r.url());
      });
      await page.goto(`${s.url}/docs`);
      await page.waitForSelector(".opblock", { timeout: 20_000 });
      const summaries = await page.$$eval(".opblock-summary-path", (els) =>
        els.map((e) => e.textContent?.replace(/\u200b/g, "").trim()),
      );
      for (const path of ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize"])
        expect(summaries).toContain(path);

      const op = page
        .locator(".opblock-get", { has: page.locator(".opblock-summary-path", { hasText: /^\/v1\/models$/ }) })
        .first();
      await op.locator(".opblock-summary").click();
      await op.locator("button.try-out__btn").click();
      await op.locator("button.execute").click();
      const body = op.locator(".responses-wrapper .live-responses-table .response-col_description pre").first();
      await body.waitFor({ timeout: 20_000 });
      expect(await body.textContent()).toContain("tiny-docs");
      expect(await op.locator(".live-responses-table tbody .response-col_status").first().textContent()).toContain(
        "200",
      );

      // POST /v1/completions: the body editor holds the document's example; Execute sends it.
      const post = page
        .locator(".opblock-post", { has: page.locator(".opblock-summary-path", { hasText: /^\/v1\/completions$/ }) })
        .first();
      await post.locator(".opblock-summary").click();
      await post.locator("button.try-out__btn").click();
      const editor = post.locator("textarea.body-param__text");
      expect(await editor.inputValue()).toContain('"prompt"');
      await post.locator("button.execute").click();
      const answer = post.locator(".responses-wrapper .live-responses-table .response-col_description pre").first();
      await answer.waitFor({ timeout: 30_000 });
      expect(await post.locator(".live-responses-table tbody .response-col_status").first().textContent()).toContain(
        "200",
      );
      const completion = JSON.parse((await answer.textContent()) ?? "{}") as {
        object?: string;
        choices?: { text: string }[];
        usage?: { completion_tokens: number };
      };
      expect(completion.object).toBe("text_completion");
      expect(completion.usage?.completion_tokens).toBeGreaterThan(0);
      expect(external).toEqual([]);
    } finally {
      await browser.close();
    }
  },
);
