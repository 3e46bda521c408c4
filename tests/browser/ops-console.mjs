// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) against the
// operator console, GET /ui on the gateway's admin port, with traffic from mosquitto_sub and
// mosquitto_pub on the gateway's TCP listener (the gateway traces every message):
//  - the page loads without a token, with a Content-Security-Policy allowing only itself; the
//    API without a token answers 401; a wrong token shows the API's 401 in the page;
//  - signed in (the token only in sessionStorage): a connected mosquitto_sub is listed, kicked,
//    and gone from the list;
//  - a stored session (mosquitto_sub -c, then gone) with three messages published after it
//    left: the page shows backlog 3 (session view; backlog view, from the API and from the
//    gateway's backlog metrics, computed every second here), 0 after "reset to latest",
//    3 after "reset to earliest", 0 after a reset to a point in time after the messages, and
//    "not found" once deleted;
//  - messages published to a topic are listed by the query form two per page with "next page",
//    none in a time range before them; one is looked up by msgId (an unknown one shows the
//    API's 404), and clicking a msgId shows its trace as a time-ordered timeline;
//  - no script errors and no Content-Security-Policy violations on any page.
// Usage: node ops-console.mjs <artifacts-dir>, with ADMIN_PORT, TCP_PORT and ADMIN_TOKEN set
// (scripts/ops-console-e2e.sh). Prints "ok"/"FAIL" lines, then
// "ops-console-e2e: N passed, N failed"; exits non-zero on failure.
import { chromium } from "playwright-core";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const [artifacts] = process.argv.slice(2);
const { ADMIN_PORT, TCP_PORT, ADMIN_TOKEN } = process.env;
const base = `http://127.0.0.1:${ADMIN_PORT}`;
const run = promisify(execFile);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let passed = 0, failed = 0;
const check = (name, ok, detail = "") => {
  if (ok) { passed++; console.log(`ok   ${name}`); } else { failed++; console.log(`FAIL ${name} ${detail}`); }
};

const mqtt = ["-h", "127.0.0.1", "-p", TCP_PORT];
async function publish(clientId, topic, ...payloads) {
  for (const m of payloads) await run("mosquitto_pub", [...mqtt, "-i", clientId, "-q", "1", "-t", topic, "-m", m]);
}

mkdirSync(artifacts, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "lmq-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1280, height: 860 },
});
const children = [];

// Runs `body(page)` on a new page; a thrown error fails `name`. Kick and delete ask for
// confirmation: accepted, as an operator would.
async function onPage(name, body) {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error" && !/Failed to load resource/.test(m.text())) errors.push(m.text()); });
  page.on("dialog", (d) => d.accept());
  try {
    await body(page);
  } catch (e) {
    check(`${name}: flow`, false, String(e));
    await page.screenshot({ path: join(artifacts, `ops-${name}-failure.png`), fullPage: true }).catch(() => {});
  }
  check(`${name}: no script errors or Content-Security-Policy violations`, errors.length === 0, errors.join("; "));
  await page.close();
}

const shot = (page, file) => page.screenshot({ path: join(artifacts, file), fullPage: true });
const text = (page, sel) => page.textContent(sel);
const visibleError = async (page, box) => {
  await page.waitForSelector(`#${box}:not([hidden])`, { timeout: 10000 });
  return { text: await text(page, `#${box}`), code: await page.getAttribute(`#${box}`, "data-code") };
};
// A datetime-local input's value (the browser's local time, to the second) `offset` ms from now.
const localTime = (page, offset) => page.evaluate((offset) => {
  const d = new Date(Date.now() + offset);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}, offset);
async function signIn(page, token) {
  await page.goto(`${base}/ui`);
  await page.fill("#token", token);
  await page.click("#signIn");
  await page.waitForFunction(() => ["ok", "err"].includes(document.getElementById("authStatus").className), null, { timeout: 10000 });
}

try {
  // ---- the page itself, over plain HTTP ----
  const ui = await fetch(`${base}/ui`);
  const html = await ui.text();
  const csp = ui.headers.get("content-security-policy") || "";
  check("GET /ui answers the page without a token", ui.status === 200 && /text\/html/.test(ui.headers.get("content-type"))
    && html.includes("<title>lmq-gateway operator console</title>"), `${ui.status} ${ui.headers.get("content-type")}`);
  check("the page's Content-Security-Policy allows only its own origin and inline code by hash",
    csp.includes("default-src 'self'") && csp.includes("connect-src 'self'") && /script-src 'sha256-[^']+'/.test(csp)
      && !csp.includes("unsafe") && !/https?:/.test(csp), csp);
  check("the page loads nothing from elsewhere", !/(src|href)=["']?(https?:)?\/\//i.test(html));
  const noToken = await fetch(`${base}/api/v1/clients`);
  check("the API still needs the token", noToken.status === 401, String(noToken.status));

  // ---- a wrong token ----
  await onPage("wrong-token", async (page) => {
    await signIn(page, "not-the-admin-token");
    const status = await text(page, "#authStatus");
    check("wrong token: the page shows the API's 401 invalid_token",
      status.includes("401") && status.includes("invalid_token") && (await page.getAttribute("#authStatus", "class")) === "err", status);
    check("wrong token: no view is offered and nothing is kept",
      !(await page.isVisible("#tabs")) && (await page.evaluate(() => sessionStorage.length + localStorage.length)) === 0);
    await shot(page, "ops-wrong-token.png");
  });

  await onPage("console", async (page) => {
    await signIn(page, ADMIN_TOKEN);
    check("sign in: the page accepts the admin token", (await text(page, "#authStatus")) === "signed in", await text(page, "#authStatus"));
    const stored = await page.evaluate(() => [sessionStorage.getItem("lmq-admin-token"), localStorage.length, document.cookie]);
    check("sign in: the token is in sessionStorage only", stored[0] === ADMIN_TOKEN && stored[1] === 0 && stored[2] === "", JSON.stringify(stored));

    // ---- clients: list, kick ----
    const live = "ops-e2e-live";
    const sub = spawn("mosquitto_sub", [...mqtt, "-V", "5", "-i", live, "-q", "1", "-t", "ops/e2e/live"]);
    children.push(sub);
    const subExit = new Promise((r) => sub.on("exit", (code) => r(code)));
    const row = `#clientsTable tr[data-client-id="${live}"]`;
    for (let i = 0; i < 50 && !(await page.$(row)); i++) {
      await page.click("#clientsRefresh");
      await sleep(200);
    }
    const cells = await page.$$eval(`${row} td`, (tds) => tds.map((t) => t.textContent));
    check("clients: a connected mosquitto_sub is listed", cells[0] === live && cells[3] === "5.0" && cells[2].includes("tcp"), JSON.stringify(cells));
    await shot(page, "ops-clients.png");
    await page.click(`${row} button.kick`);
    await page.waitForSelector(row, { state: "detached", timeout: 10000 });
    check("clients: kicked, gone from the list", (await text(page, "#clientsNotice")) === `kicked ${live}`, await text(page, "#clientsNotice"));
    const code = await Promise.race([subExit, sleep(5000).then(() => "running")]);
    check("clients: the kicked mosquitto_sub was disconnected", code !== "running", String(code));
    await sleep(500);
    await page.click("#clientsRefresh");
    await sleep(500);
    check("clients: still gone after a refresh", !(await page.$(row)));
    await shot(page, "ops-clients-kicked.png");

    // ---- a stored session with a backlog ----
    const stored_ = "ops-e2e-persist";
    await run("mosquitto_sub", [...mqtt, "-c", "-i", stored_, "-q", "1", "-t", "ops/e2e/backlog/#", "-E"]);
    await sleep(300);
    await publish("ops-e2e-pub", "ops/e2e/backlog/x", "b1", "b2", "b3");
    await page.click('#tabs button[data-view="session"]');
    await page.fill("#sessionId", stored_);
    const backlogIs = async (n, after) => {
      await page.waitForFunction((n) => !document.getElementById("sessionResult").hidden
        && document.getElementById("sessionBacklog").textContent === n, String(n), { timeout: 10000 })
        .catch(() => {});
      const shown = await text(page, "#sessionBacklog");
      check(`session: backlog ${n} ${after}`, shown === String(n) && (await page.isVisible("#sessionResult")), `shown [${shown}]`);
    };
    await page.click("#sessionLookup");
    await backlogIs(3, "after three messages published while it was away");
    const subs = await page.$$eval("#sessionSubs tbody td", (tds) => tds.map((t) => t.textContent));
    check("session: its subscription is shown", subs[0] === "ops/e2e/backlog/#" && subs[1] === "1", JSON.stringify(subs));
    const positions = await page.$$eval("#sessionPositions tbody tr", (trs) => trs.map((t) => t.lastChild.textContent));
    check("session: per-partition backlog adds up", positions.map(Number).reduce((a, b) => a + b, 0) === 3, JSON.stringify(positions));
    await shot(page, "ops-session.png");

    // The backlog view: metrics of this gateway and the session just looked up.
    await page.click('#tabs button[data-view="backlog"]');
    await page.waitForSelector("#backlogResult:not([hidden])", { timeout: 10000 });
    check("backlog: the session's backlog is shown", (await text(page, "#backlogTotal")) === "3"
      && (await text(page, "#backlogOf")) === stored_, await text(page, "#backlogTotal"));
    // The gateway computes its backlog metrics every second here (backlog.interval_secs).
    const series = () => page.$$eval("#metricsTable tbody tr", (trs) => trs.map((tr) => Array.from(tr.cells, (c) => c.textContent)));
    const has = (rows, name, label, value) => rows.some(([n, l, v]) => n === name && l.includes(label) && v === value);
    let metrics = [];
    for (let i = 0; i < 50; i++) {
      metrics = await series();
      if (has(metrics, "lmq_session_backlog_messages", `client_id="${stored_}"`, "3")) break;
      await sleep(200);
      await page.click("#backlogRefresh");
    }
    check("backlog: only /metrics series about backlog, delay or lag are listed",
      metrics.length > 0 && metrics.every(([m]) => m.startsWith("lmq_") && /backlog|delay|lag/.test(m)), JSON.stringify(metrics));
    check("backlog: the metrics show the stored session's backlog of 3 and its parent topic's",
      has(metrics, "lmq_session_backlog_messages", `client_id="${stored_}"`, "3")
        && has(metrics, "lmq_backlog_messages", 'parent_topic="ops"', "3"), JSON.stringify(metrics));
    await shot(page, "ops-backlog.png");

    await page.click('#tabs button[data-view="session"]');
    await page.click("#resetLatest");
    await backlogIs(0, "after reset to latest");
    check("session: the reset is confirmed", (await text(page, "#sessionNotice")) === `${stored_} reset to latest`, await text(page, "#sessionNotice"));
    await shot(page, "ops-session-reset.png");
    await page.click("#resetEarliest");
    await backlogIs(3, "after reset to earliest");

    // A point in time a minute from now.
    await page.fill("#resetTime", await localTime(page, 60000));
    await page.click("#resetToTime");
    await backlogIs(0, "after reset to a time after the messages");
    await page.click("#sessionDelete");
    await page.waitForFunction(() => document.getElementById("sessionNotice").textContent.startsWith("deleted"), null, { timeout: 10000 });
    await page.click("#sessionLookup");
    const gone = await visibleError(page, "sessionError");
    check("session: deleted, then not found (404 session_not_found shown)",
      gone.code === "session_not_found" && gone.text.startsWith("HTTP 404 session_not_found: "), gone.text);

    // ---- messages: query, next page, time range, lookup ----
    const topic = "opsq/e2e/a";
    await publish("ops-e2e-query-pub", topic, "query-1", "query-2", "query-3");
    await page.click('#tabs button[data-view="messages"]');
    await page.fill("#queryTopic", topic);
    await page.fill("#queryLimit", "2");
    await page.click("#queryRun");
    const rowsOf = async () => {
      await page.waitForSelector("#messagesResult:not([hidden])", { timeout: 10000 });
      return page.$$eval("#messagesTable tbody tr", (trs) => trs.map((tr) => Array.from(tr.cells, (c) => c.textContent)));
    };
    const one = await rowsOf();
    check("messages: the first page has two of them, with a next page", one.length === 2 && (await page.isVisible("#messagesNext")),
      JSON.stringify(one));
    await shot(page, "ops-messages.png");
    await page.click("#messagesNext");
    await page.waitForFunction(() => document.getElementById("messagesSummary").textContent.startsWith("page 2"), null, { timeout: 10000 });
    const two = await rowsOf();
    const all = [...one, ...two];
    check("messages: the second page has the third, oldest first",
      two.length === 1 && all.map((r) => r[6]).join() === "query-1,query-2,query-3", JSON.stringify(two));
    check("messages: msgId, topic, publisher, QoS and size are shown", all.every((r) => /^[0-9A-Fa-f]{32}$/.test(r[0])
      && r[1] === topic && r[2] === "ops-e2e-query-pub" && r[3] === "1" && r[5] === "7"), JSON.stringify(all));
    // Up to an hour ago: none of them.
    await page.fill("#queryTo", await localTime(page, -3600000));
    await page.click("#queryRun");
    await page.waitForFunction(() => document.getElementById("messagesSummary").textContent.startsWith("page 1"), null, { timeout: 10000 });
    const none = await rowsOf();
    check("messages: a time range before them finds none", none.length === 0 && !(await page.isVisible("#messagesNext")), JSON.stringify(none));
    await page.fill("#queryTo", "");

    const firstId = one[0][0];
    await page.fill("#messageId", firstId);
    await page.click("#messageLookup");
    await page.waitForSelector("#messageResult:not([hidden])", { timeout: 10000 });
    const detail = await text(page, "#messageDetail");
    check("message: looked up by msgId", detail.includes(firstId) && detail.includes(topic) && detail.includes("query-1"), detail);
    await shot(page, "ops-message.png");
    // The same time and process, another counter: no such message, and the page says so.
    const missing = firstId.slice(0, -4) + (firstId.endsWith("FFFF") ? "FFFE" : "FFFF");
    await page.fill("#messageId", missing);
    await page.click("#messageLookup");
    const notFound = await visibleError(page, "messageError");
    check("message: an unknown msgId shows 404 message_not_found",
      notFound.code === "message_not_found" && notFound.text.startsWith("HTTP 404 message_not_found: ") && !(await page.isVisible("#messageResult")),
      notFound.text);

    // ---- trace: clicking a msgId in the query table ----
    await page.click("#queryRun");
    await page.waitForSelector("#messagesTable tbody button.link", { timeout: 10000 });
    await page.click("#messagesTable tbody tr:first-child button.link");
    check("trace: clicking a msgId opens the trace view", (await page.isVisible("#view-trace")) && (await page.inputValue("#traceId")) === firstId);
    // Trace events are written beside the message, not before its PUBACK: ask again until
    // the publish and its store are both there.
    const eventsShown = () => page.$$eval("#timeline li", (lis) =>
      lis.map((li) => [li.dataset.type, li.querySelector(".ev-delta").textContent, li.querySelector(".ev-who").textContent]));
    let events = [];
    for (let i = 0; i < 25; i++) {
      await page.waitForSelector("#traceResult:not([hidden])", { timeout: 10000 });
      events = await eventsShown();
      if (["publish", "stored"].every((t) => events.some(([e]) => e === t))) break;
      await sleep(200);
      await page.click("#traceShow");
    }
    const types = ["publish", "stored", "delivered", "acked", "dropped", "delayed"];
    check("trace: a timeline of the message's events, in time order",
      events.length > 0 && events.every(([t]) => types.includes(t))
        && events.every(([, d], i) => i === 0 || parseInt(d.slice(1)) >= parseInt(events[i - 1][1].slice(1))), JSON.stringify(events));
    check("trace: its publish and store by mosquitto_pub are there",
      ["publish", "stored"].every((t) => events.some(([e, , who]) => e === t && who === "client ops-e2e-query-pub")), JSON.stringify(events));
    await shot(page, "ops-trace.png");
  });
} finally {
  for (const c of children) c.kill();
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`ops-console-e2e: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
