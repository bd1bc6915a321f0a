// Two headless Chromium pages chat through `connserver serve ws-chat`, using its own page.
//
// usage: node chat_browser.js URL SCREENSHOT.png
// Prints one JSON line: what each page shows, and the page's response headers.
// CHROMIUM names the browser (default /usr/bin/chromium, Debian's): playwright-core
// drives it and never downloads one of its own.
"use strict";
const { chromium } = require("playwright-core");

const [url, screenshotPath] = process.argv.slice(2);
const STEP_MS = 10000;   // a safety net around what should happen at once

async function join(context, nick) {
  const page = await context.newPage();
  const response = await page.goto(url);
  const log = page.locator("#log");
  await log.getByText("Choose a nickname").waitFor({ timeout: STEP_MS });
  await say(page, nick);
  await log.getByText(`* You are ${nick};`).waitFor({ timeout: STEP_MS });
  return { page, headers: response.headers(), status: response.status() };
}

async function say(page, text) {
  await page.locator("#input").fill(text);
  await page.locator("#input").press("Enter");
}

async function waitFor(page, text) {
  await page.locator("#log li", { hasText: text }).first().waitFor({ timeout: STEP_MS });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    chromiumSandbox: false,   // root in CI: --no-sandbox
    timeout: 30000,
    args: ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 800, height: 600 } });
    const alice = await join(context, "alice");
    const bob = await join(context, "bob");
    await waitFor(alice.page, "* bob joined");
    await say(alice.page, "hello from alice");
    await waitFor(bob.page, "<alice> hello from alice");
    await say(bob.page, "hi alice, bob here");
    await waitFor(alice.page, "<bob> hi alice, bob here");
    await say(bob.page, "/who");
    await waitFor(bob.page, "* Online: alice, bob");
    await bob.page.screenshot({ path: screenshotPath });
    const bobText = await bob.page.locator("#log").innerText();
    await bob.page.close();   // the tab goes: its WebSocket closes
    await waitFor(alice.page, "* bob left");
    const aliceText = await alice.page.locator("#log").innerText();
    console.log(JSON.stringify({
      status: alice.status, headers: alice.headers, title: await alice.page.title(),
      alice: aliceText, bob: bobText,
    }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error && error.stack || String(error));
  process.exit(1);
});
