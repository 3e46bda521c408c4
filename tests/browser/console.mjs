// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) opens the gateway's
// /console page over ws:// and wss://, receives a message published by a TCP client
// (mosquitto_pub) and publishes one back that a TCP subscriber (mosquitto_sub) receives.
// Usage: node console.mjs <ws-port> <wss-port> <tcp-port> <artifacts-dir>
// Prints "ok"/"FAIL" lines, then "browser-e2e: N passed, N failed"; exits non-zero on failure.
import { chromium } from "playwright-core";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const [wsPort, wssPort, tcpPort, artifacts] = process.argv.slice(2);
const run = promisify(execFile);
let passed = 0, failed = 0;
const check = (name, ok, detail = "") => {
  if (ok) { passed++; console.log(`ok   ${name}`); } else { failed++; console.log(`FAIL ${name} ${detail}`); }
};

// Resolves with the first message mosquitto_sub prints for `topic`.
function subscribeOnce(topic) {
  const sub = spawn("mosquitto_sub", ["-h", "127.0.0.1", "-p", tcpPort, "-i", `browser-e2e-sub-${topic.split("/")[1]}`, "-q", "1", "-t", topic, "-C", "1", "-W", "15"]);
  let out = "";
  sub.stdout.on("data", (d) => (out += d));
  const done = new Promise((resolve) => sub.on("close", () => resolve(out.trim())));
  return done;
}

mkdirSync(artifacts, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "lmq-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  ignoreHTTPSErrors: true, // the gateway's certificate is signed by the test's own CA
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1000, height: 700 },
});
try {
  for (const [scheme, base] of [["ws", `http://127.0.0.1:${wsPort}`], ["wss", `https://127.0.0.1:${wssPort}`]]) {
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    try {
      await page.goto(`${base}/console?clientId=GID_browser@@@${scheme}`);
      await page.waitForFunction(() => document.getElementById("status").textContent === "connected", null, { timeout: 10000 });
      check(`${scheme}: page connects over ${scheme}://`, true);

      await page.fill("#filter", `browser/${scheme}/#`);
      await page.click("#subscribe");
      await page.waitForFunction(() => document.getElementById("subscribed").textContent.includes("granted QoS 1"), null, { timeout: 10000 });
      const text = `hello ${scheme} browser from mosquitto_pub`;
      await run("mosquitto_pub", ["-h", "127.0.0.1", "-p", tcpPort, "-i", `browser-e2e-pub-${scheme}`, "-q", "1", "-t", `browser/${scheme}/in`, "-m", text]);
      await page.waitForFunction((t) => document.getElementById("messages").textContent.includes(t), text, { timeout: 10000 });
      const row = await page.textContent("#messages tr");
      check(`${scheme}: TCP client's message shown in the page`, row.includes(`browser/${scheme}/in`) && row.includes(text), row);

      const back = `reply from chromium over ${scheme}`;
      const received = subscribeOnce(`browser/${scheme}/out`);
      await new Promise((r) => setTimeout(r, 500)); // let mosquitto_sub subscribe
      await page.fill("#topic", `browser/${scheme}/out`);
      await page.fill("#payload", back);
      await page.click("#publish");
      check(`${scheme}: page's message reaches a TCP subscriber`, (await received) === back, `got [${await received}]`);
      await page.waitForFunction(() => document.getElementById("published").textContent.startsWith("published"), null, { timeout: 10000 });
      await page.screenshot({ path: join(artifacts, scheme === "ws" ? "console.png" : "console-wss.png"), fullPage: true });
      check(`${scheme}: no script errors`, errors.length === 0, errors.join("; "));
    } catch (e) {
      check(`${scheme}: console flow`, false, String(e));
      await page.screenshot({ path: join(artifacts, `console-${scheme}-failure.png`) }).catch(() => {});
    }
    await page.close();
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`browser-e2e: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
