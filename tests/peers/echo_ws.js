// Node's `ws` package against `connserver serve ws-echo`: fragmented and 1 MiB messages,
// ping/pong, an oversized message (1009), and the close handshake.
//
// usage: node echo_ws.js URL OVERSIZE_BYTES
// Prints one JSON line of results; exits non-zero on an error or an unexpected echo.
"use strict";
const crypto = require("crypto");
const WebSocket = require("ws");

const [url, oversize] = process.argv.slice(2);
const STEP_MS = 10000;   // a safety net around what should happen at once

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

function within(promise, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), STEP_MS);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

function next(ws, event) {
  return within(new Promise((resolve) => ws.once(event, (...args) => resolve(args))), event);
}

// Send `parts` as one message in fragments (the first frame carries the opcode,
// the others are continuation frames); resolve with the echo.
async function echoFragmented(ws, parts, binary) {
  const reply = next(ws, "message");
  parts.forEach((part, i) => ws.send(part, { binary, fin: i === parts.length - 1 }));
  const [data, isBinary] = await reply;
  return { data, isBinary };
}

const digest = (buffer) => crypto.createHash("sha256").update(buffer).digest("hex");

async function main() {
  const results = {};
  const ws = await open();

  let echo = await echoFragmented(ws, ["frag", "mented ", "téxt"], false);
  results.fragmentedText = { text: echo.data.toString("utf8"), binary: echo.isBinary };

  const pieces = [0, 1, 2].map(() => crypto.randomBytes(100000));
  echo = await echoFragmented(ws, pieces, true);
  results.fragmentedBinary = { same: digest(echo.data) === digest(Buffer.concat(pieces)),
                               length: echo.data.length, binary: echo.isBinary };

  const mib = crypto.randomBytes(1024 * 1024);
  echo = await echoFragmented(ws, [mib], true);
  results.largeBinary = { same: digest(echo.data) === digest(mib), length: echo.data.length,
                          binary: echo.isBinary };

  const text = "ü".repeat(512 * 1024);   // 1 MiB of UTF-8, in 16 fragments
  const textParts = [];
  for (let i = 0; i < text.length; i += text.length / 16) textParts.push(text.slice(i, i + text.length / 16));
  echo = await echoFragmented(ws, textParts, false);
  results.largeText = { same: echo.data.toString("utf8") === text, length: echo.data.length,
                        binary: echo.isBinary };

  const pong = next(ws, "pong");
  ws.ping(Buffer.from("are you there"));
  results.pong = (await pong)[0].toString();

  const closed = next(ws, "close");
  ws.close(4000, "done");
  const [code, reason] = await closed;
  results.close = { code, reason: reason.toString() };

  const big = await open();
  const refused = next(big, "close");
  big.send(Buffer.alloc(Number(oversize)));
  results.oversize = { code: (await refused)[0] };

  console.log(JSON.stringify(results));
}

main().catch((error) => {
  console.error(error && error.stack || String(error));
  process.exit(1);
});
