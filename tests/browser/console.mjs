// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) against the
// gateway's /console page:
//  - an open gateway over ws:// and wss:// (self-signed certificate): receives a message
//    published by a TCP client (mosquitto_pub) and publishes one back that a TCP subscriber
//    (mosquitto_sub) receives;
//  - the shipped gateway.yaml (environment below): the console and /metrics answer without a
//    token, the page signs in with the demo key (its computed password must equal openssl's)
//    and shows a message mosquitto_pub published with an openssl-computed signature, a wrong
//    secret is refused, and on a non-secure origin the page explains why it cannot sign.
// Usage: node console.mjs <ws-port> <wss-port> <tcp-port> <artifacts-dir>, with SHIPPED_TCP,
// SHIPPED_WS, SHIPPED_ADMIN, DEMO_SECRET, DEMO_PUB_ID, DEMO_PUB_PW, PAGE_ID, PAGE_PW set
// (scripts/browser-e2e.sh). Prints "ok"/"FAIL" lines, then "browser-e2e: N passed, N failed";
// exits non-zero on failure.
import { chromium } from "playwright-core";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const [wsPort, wssPort, tcpPort, artifacts] = process.argv.slice(2);
const env = process.env;
const run = promisify(execFile);
let passed = 0, failed = 0;
const check = (name, ok, detail = "") => {
  if (ok) { passed++; console.log(`ok   ${name}`); } else { failed++; console.log(`FAIL ${name} ${detail}`); }
};
const statusIs = (text) => document.getElementById("status").textContent === text;

// Resolves with the first message mosquitto_sub prints for `topic`.
function subscribeOnce(topic) {
  const sub = spawn("mosquitto_sub", ["-h", "127.0.0.1", "-p", tcpPort, "-i", `browser-e2e-sub-${topic.split("/")[1]}`, "-q", "1", "-t", topic, "-C", "1", "-W", "15"]);
  let out = "";
  sub.stdout.on("data", (d) => (out += d));
  const done = new Promise((resolve) => sub.on("close", () => resolve(out.trim())));
  return done;
}

// A name that resolves to 127.0.0.1 but is not "localhost": plain http:// to it is not a
// secure context, like a gateway reached over the network.
const NON_SECURE_HOST = "console.lmq.test";

mkdirSync(artifacts, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "lmq-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  ignoreHTTPSErrors: true, // the wss listener's certificate is self-signed, made by the gateway at start
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
    `--host-resolver-rules=MAP ${NON_SECURE_HOST} 127.0.0.1`],
  viewport: { width: 1000, height: 760 },
});

// Runs `body(page, errors)` on a new page; a thrown error fails `name`.
async function onPage(name, shot, body) {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  try {
    await body(page, errors);
  } catch (e) {
    check(`${name}: flow`, false, String(e));
    await page.screenshot({ path: join(artifacts, `${shot}-failure.png`) }).catch(() => {});
  }
  await page.close();
}

try {
  // ---- the open gateway: ws and wss ----
  for (const [scheme, base] of [["ws", `http://127.0.0.1:${wsPort}`], ["wss", `https://127.0.0.1:${wssPort}`]]) {
    await onPage(scheme, `console-${scheme}`, async (page, errors) => {
      await page.goto(`${base}/console?clientId=GID_browser@@@${scheme}&autoconnect=1`);
      await page.waitForFunction(statusIs, "connected", { timeout: 10000 });
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
    });
  }

  // ---- the shipped gateway.yaml: what a newcomer sees after `serve` ----
  const shipped = `http://127.0.0.1:${env.SHIPPED_WS}`;
  await onPage("shipped", "console-shipped", async (page) => {
    const r = await page.goto(`${shipped}/console`);
    check("shipped gateway.yaml: /console answers", r.status() === 200 && (await page.title()) === "lmq-gateway console",
      `${r.status()} ${await page.title()}`);
    check("shipped gateway.yaml: the page waits for the user (no connect on load)",
      (await page.textContent("#status")) === "disconnected", await page.textContent("#status"));
  });
  const metrics = await fetch(`http://127.0.0.1:${env.SHIPPED_ADMIN}/metrics`);
  const body = await metrics.text();
  check("shipped gateway.yaml: /metrics answers without a token", metrics.status === 200 && body.includes("lmq_connections{"),
    `${metrics.status} ${body.slice(0, 200)}`);
  const api = await fetch(`http://127.0.0.1:${env.SHIPPED_ADMIN}/api/v1/clients`);
  check("shipped gateway.yaml: the management API is off without LMQ_ADMIN_TOKEN", api.status === 401, String(api.status));

  // Sign in the page with the demo key; a message signed by openssl for mosquitto_pub shows up.
  await onPage("signed", "console-signed", async (page, errors) => {
    await page.goto(`${shipped}/console?clientId=${encodeURIComponent(env.PAGE_ID)}&sign=1&accessKeyId=demo-key&instanceId=lmq-demo`);
    check("signed: signing fields shown, no secure-context warning on 127.0.0.1",
      await page.isVisible("#accessKeySecret") && !(await page.isVisible("#signNote")));
    await page.fill("#accessKeySecret", env.DEMO_SECRET);
    await page.click("#connect");
    await page.waitForFunction(statusIs, "connected", { timeout: 10000 });
    check("signed: page connects with the demo key's signature", true);
    const [user, pw] = [await page.inputValue("#username"), await page.inputValue("#password")];
    check("signed: user name Signature|demo-key|lmq-demo", user === "Signature|demo-key|lmq-demo", user);
    check("signed: the page's password equals openssl's HMAC-SHA1", pw === env.PAGE_PW, `${pw} vs ${env.PAGE_PW}`);

    await page.fill("#filter", "demo/browser/#");
    await page.click("#subscribe");
    await page.waitForFunction(() => document.getElementById("subscribed").textContent.includes("granted QoS 1"), null, { timeout: 10000 });
    const text = "signed hello from mosquitto_pub";
    await run("mosquitto_pub", ["-h", "127.0.0.1", "-p", env.SHIPPED_TCP, "-i", env.DEMO_PUB_ID,
      "-u", "Signature|demo-key|lmq-demo", "-P", env.DEMO_PUB_PW, "-q", "1", "-t", "demo/browser/in", "-m", text]);
    await page.waitForFunction((t) => document.getElementById("messages").textContent.includes(t), text, { timeout: 10000 });
    const row = await page.textContent("#messages tr");
    check("signed: mosquitto_pub's message shown in the page", row.includes("demo/browser/in") && row.includes(text), row);
    await page.screenshot({ path: join(artifacts, "console-signed.png"), fullPage: true });

    // The same page with a wrong secret: the gateway refuses, the page says so.
    await page.fill("#accessKeySecret", "not-the-secret");
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").className === "err", null, { timeout: 10000 });
    const status = await page.textContent("#status");
    check("signed: a wrong secret is refused", /not authori[sz]ed|bad user ?name or password/i.test(status), status);
    check("signed: no script errors", errors.length === 0, errors.join("; "));
  });

  // Plain http:// from another host name: no Web Crypto, and the page says what to do instead.
  await onPage("non-secure", "console-non-secure", async (page) => {
    await page.goto(`http://${NON_SECURE_HOST}:${env.SHIPPED_WS}/console?sign=1&accessKeyId=demo-key&instanceId=lmq-demo`);
    const secure = await page.evaluate(() => window.isSecureContext);
    const note = (await page.isVisible("#signNote")) ? await page.textContent("#signNote") : "";
    check("non-secure origin: the page explains that signing needs a secure context",
      !secure && note.includes("secure context") && note.includes("localhost"), `secure=${secure} note=[${note}]`);
    await page.fill("#accessKeySecret", env.DEMO_SECRET);
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").className === "err", null, { timeout: 10000 });
    const status = await page.textContent("#status");
    check("non-secure origin: Connect does not try without a signature", status.includes("not a secure context"), status);
    await page.screenshot({ path: join(artifacts, "console-non-secure.png"), fullPage: true });
  });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`browser-e2e: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
