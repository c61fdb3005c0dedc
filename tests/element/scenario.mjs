// Element Web against the real `convo` binary, in headless Chromium driven by Playwright:
// two users (two browser contexts) register through Element's form with a registration
// token, share an unencrypted group room and Element's default encrypted DM, and Element
// sets up cross-signing for both. Every step is checked as a person would see it, in
// Element's UI; where the UI is not enough to tell why, the step also reads the state of
// Element's own client (window.mxMatrixClientPeg) for the report.
//
// Run through run.sh, which builds Element, finds Chromium and builds Convo. It passes:
//   ELEMENT_WEBAPP   the built webapp/ folder      CHROMIUM  the browser binary
//   CONVO_BIN        the server binary             ELEMENT_RESULTS  where to write results
// Results (ELEMENT_RESULTS, emptied first): summary.json (each step: ok, failed or skipped,
// with the error), a screenshot of both users' pages for each failed step, convo.log (the
// server at RUST_LOG=convo=debug,tower_http=debug), network-<user>.jsonl (every request
// Element made to Convo with its status, request and response bodies; passwords and
// tokens redacted), console-<user>.log (Element's errors and warnings).
// Exit status: 0 when every step passed, 1 otherwise.

import { spawn } from "node:child_process";
import { createReadStream, closeSync, mkdirSync, openSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as createNetServer } from "node:net";
import path from "node:path";
import { deflateSync } from "node:zlib";

import { chromium } from "playwright-core";

const WEBAPP = mustEnv("ELEMENT_WEBAPP");
const CHROMIUM = mustEnv("CHROMIUM");
const CONVO_BIN = mustEnv("CONVO_BIN");
const RESULTS = mustEnv("ELEMENT_RESULTS");
const STEP_TIMEOUT_MS = Number(process.env.ELEMENT_STEP_TIMEOUT_MS || 60_000);
const HEADED = process.env.ELEMENT_HEADED === "1";

const SERVER_NAME = "localhost";
const REGISTRATION_TOKEN = "element-scenario-token";
// Element refuses weak passwords (zxcvbn score < 3) before the server sees them.
const PASSWORD = "Convo-Element-7-Zebra!";
const GROUP_ROOM = "Convo group";

function mustEnv(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`scenario.mjs: ${name} is not set (run it through tests/element/run.sh)`);
    process.exit(2);
  }
  return value;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const T0 = Date.now();
const elapsed = () => ((Date.now() - T0) / 1000).toFixed(1);

// ---------------------------------------------------------------------------------------
// Convo: a fresh data dir, registration by token, no rate limits (Element is chatty).

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createNetServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function startConvo() {
  const workdir = path.join(RESULTS, "convo-data");
  mkdirSync(workdir, { recursive: true });
  const port = await freePort();
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    // Every CONVO_* variable is a config key for the server (unknown ones are fatal).
    if (!k.startsWith("CONVO_")) env[k] = v;
  }
  Object.assign(env, {
    RUST_LOG: process.env.RUST_LOG || "convo=debug,tower_http=debug",
    CONVO_SERVER_NAME: SERVER_NAME,
    CONVO_LISTENERS__CLIENT: `127.0.0.1:${port}`,
    CONVO_DATA_DIR: path.join(workdir, "data"),
    CONVO_REGISTRATION__MODE: "token",
    CONVO_REGISTRATION__TOKENS: JSON.stringify([REGISTRATION_TOKEN]),
    CONVO_RATE_LIMITS__ENABLED: "false",
    CONVO_FEDERATION__RESOLVE_NAMES: "false",
    CONVO_PASSWORD_HASHING__MEMORY_KIB: "1024",
    CONVO_PASSWORD_HASHING__ITERATIONS: "1",
  });
  const logFd = openSync(path.join(RESULTS, "convo.log"), "w");
  const proc = spawn(CONVO_BIN, [], { cwd: workdir, env, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  let exited = null;
  const exitPromise = new Promise((resolve) => {
    proc.on("exit", (code, signal) => resolve((exited = { code, signal })));
    proc.on("error", (error) => resolve((exited = { error: String(error) })));
  });
  // However this process ends (a crash included), the server goes with it.
  process.on("exit", () => {
    if (!exited) proc.kill("SIGKILL");
  });
  const url = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (exited) return;
    proc.kill("SIGTERM");
    await Promise.race([exitPromise, sleep(10_000)]);
    if (!exited) {
      proc.kill("SIGKILL");
      await Promise.race([exitPromise, sleep(5_000)]);
    }
  };
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline && !exited) {
    try {
      const r = await fetch(`${url}/_matrix/client/versions`, { signal: AbortSignal.timeout(1000) });
      if (r.status === 200) return { url, stop, versions: await r.json() };
    } catch {
      // not listening yet
    }
    await sleep(100);
  }
  await stop();
  throw new Error(`convo did not answer /versions (${JSON.stringify(exited)}); see ${RESULTS}/convo.log`);
}

// ---------------------------------------------------------------------------------------
// Element: the built webapp/ served as static files, with our config.json.

const CONTENT_TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".webmanifest": "application/manifest+json",
  ".wasm": "application/wasm",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".gif": "image/gif",
  ".ico": "image/x-icon",
  ".webp": "image/webp",
  ".woff": "font/woff",
  ".woff2": "font/woff2",
  ".ttf": "font/ttf",
  ".mp3": "audio/mpeg",
  ".ogg": "audio/ogg",
  ".txt": "text/plain; charset=utf-8",
};

function elementConfig(convoUrl) {
  return {
    default_server_config: {
      "m.homeserver": { base_url: convoUrl, server_name: SERVER_NAME },
    },
    disable_custom_urls: true,
    disable_guests: true,
    disable_3pid_login: true,
    brand: "Element",
    default_theme: "light",
    show_labs_settings: false,
    room_directory: { servers: [SERVER_NAME] },
    setting_defaults: { "UIFeature.feedback": false, "UIFeature.registration": true },
    element_call: { use_exclusively: false },
  };
}

async function startElementServer(convoUrl) {
  const root = path.resolve(WEBAPP);
  const config = JSON.stringify(elementConfig(convoUrl));
  const server = createServer((req, res) => {
    const urlPath = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (urlPath === "/config.json") {
      res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
      res.end(config);
      return;
    }
    const file = path.resolve(root, "." + (urlPath === "/" ? "/index.html" : urlPath));
    let size = -1;
    try {
      if (file.startsWith(root + path.sep)) {
        const st = statSync(file);
        if (st.isFile()) size = st.size;
      }
    } catch {
      // not found
    }
    if (size < 0) {
      res.writeHead(404, { "content-type": "text/plain" });
      res.end("not found");
      return;
    }
    res.writeHead(200, {
      "content-type": CONTENT_TYPES[path.extname(file)] || "application/octet-stream",
      "content-length": size,
    });
    createReadStream(file).pipe(res);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

// ---------------------------------------------------------------------------------------
// Browser: one context per user; every request Element makes to Convo is recorded, and
// anything not on loopback is refused (and recorded).

/** Bodies longer than this are cut in network-<user>.jsonl. */
const BODY_LIMIT = 20_000;

function redact(text) {
  if (!text) return text;
  return text.replace(/("(?:password|new_password|access_token|refresh_token)"\s*:\s*)"[^"]*"/g, '$1"<redacted>"');
}

/** A browser context for `name`; `label` names its files and screenshots (a second login). */
async function newUser(browser, name, elementUrl, convoUrl, label = name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const user = {
    name: label,
    userId: `@${name}:${SERVER_NAME}`,
    context,
    page: null,
    network: [],
    console: [],
    refused: [],
  };
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === "127.0.0.1" || url.protocol === "data:" || url.protocol === "blob:") {
      return route.continue();
    }
    user.refused.push(route.request().url());
    return route.abort();
  });
  const page = await context.newPage();
  user.page = page;
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") {
      user.console.push(`${elapsed()} [${msg.type()}] ${msg.text()}`);
    }
  });
  page.on("pageerror", (err) => user.console.push(`${elapsed()} [pageerror] ${err.stack || err}`));
  page.on("response", async (response) => {
    const request = response.request();
    if (!request.url().startsWith(convoUrl) || request.method() === "OPTIONS") return;
    const url = new URL(request.url());
    url.searchParams.delete("access_token");
    const entry = {
      t: Number(elapsed()),
      method: request.method(),
      path: url.pathname + url.search,
      status: response.status(),
    };
    if (request.method() !== "GET") {
      const type = request.headers()["content-type"] || "";
      if (type && !/json|text/.test(type)) {
        entry.request = `<${type}, ${request.postDataBuffer()?.length ?? 0} bytes>`;
      } else {
        const body = request.postData();
        if (body) entry.request = redact(body.slice(0, BODY_LIMIT));
      }
    }
    const type = response.headers()["content-type"] || "";
    if (type && !/json|text/.test(type)) {
      entry.response = `<${type}>`;
    } else {
      try {
        entry.response = redact((await response.text()).slice(0, BODY_LIMIT));
      } catch {
        // the page went away, or a body that is not text
      }
    }
    // Listed once complete: the steps read the errcode of error answers.
    user.network.push(entry);
  });
  page.on("requestfailed", (request) => {
    if (request.url().startsWith(convoUrl)) {
      user.network.push({
        t: Number(elapsed()),
        method: request.method(),
        path: new URL(request.url()).pathname,
        failed: request.failure()?.errorText,
      });
    }
  });
  return user;
}

// ---------------------------------------------------------------------------------------
// Optional steps: each checks a feature of issue 12 that lands on main on its own. A step
// whose feature is off (not in ELEMENT_STEPS) is reported as "off", and does not fail the
// run, only while the server does not have the feature: every feature has a probe, an
// endpoint that Convo answers with 404 M_UNRECOGNIZED until the feature is there. Once the
// server has it, an "off" step fails, so that nothing passes silently: turn it on in
// ON_BY_DEFAULT.

const FEATURES = {
  media: { probe: ["GET", "/_matrix/client/v1/media/config"] },
  avatar: { probe: ["POST", "/_matrix/media/v3/upload"] },
  threads: { probe: ["GET", "/_matrix/client/v1/rooms/!probe:localhost/threads"] },
  search: { probe: ["POST", "/_matrix/client/v3/search"] },
  backup: { probe: ["GET", "/_matrix/client/v3/room_keys/version"] },
};

/** The features whose steps run when ELEMENT_STEPS is not set: those on main. */
const ON_BY_DEFAULT = ["media", "avatar", "threads", "search", "backup"];

/** ELEMENT_STEPS: a comma-separated list of FEATURES, "all" or "none". */
function enabledFeatures() {
  const value = process.env.ELEMENT_STEPS;
  if (value === undefined || value === "") return new Set(ON_BY_DEFAULT);
  if (value === "all") return new Set(Object.keys(FEATURES));
  if (value === "none") return new Set();
  const names = value.split(",").map((n) => n.trim()).filter(Boolean);
  const unknown = names.filter((n) => !(n in FEATURES));
  if (unknown.length) {
    console.error(`scenario.mjs: ELEMENT_STEPS names ${unknown.join(", ")}; known: ${Object.keys(FEATURES).join(", ")}, all, none`);
    process.exit(2);
  }
  return new Set(names);
}
const ENABLED = enabledFeatures();

/** Whether the server has `feature` (its probe answers anything but M_UNRECOGNIZED), once per feature. */
const probed = new Map();
function serverHas(convoUrl, feature) {
  if (!probed.has(feature)) {
    const [method, endpoint] = FEATURES[feature].probe;
    probed.set(
      feature,
      (async () => {
        const r = await fetch(convoUrl + endpoint, {
          method,
          headers: method === "GET" ? {} : { "content-type": "application/json" },
          body: method === "GET" ? undefined : "{}",
          signal: AbortSignal.timeout(10_000),
        });
        const body = await r.json().catch(() => ({}));
        return { has: body.errcode !== "M_UNRECOGNIZED", answer: `${method} ${endpoint}: ${r.status} ${body.errcode ?? ""}`.trim() };
      })(),
    );
  }
  return probed.get(feature);
}

// ---------------------------------------------------------------------------------------
// Steps: each one has a name and a time limit; a failed critical step skips every later
// step (they build on it), a failed check does not. A step with a `feature` runs only when
// that feature is on (see FEATURES).

const steps = [];
let blockedBy = null;
/** The server's URL, for the feature probes; set by main(). */
let probeUrl = null;
/** When the running step times out: `until` gives up then, so that a timed-out step's
 * polling does not go on into the next step. */
let stepDeadline = Infinity;

async function step(name, fn, { critical = true, users = [], feature = null, timeout = STEP_TIMEOUT_MS } = {}) {
  const entry = { step: steps.length + 1, name, result: "skipped" };
  if (feature) entry.feature = feature;
  steps.push(entry);
  const label = `${String(entry.step).padStart(2)}. ${name}`;
  if (blockedBy) {
    entry.error = `skipped: step ${blockedBy} failed`;
    console.log(`SKIP ${label}`);
    return;
  }
  if (feature && !ENABLED.has(feature)) {
    let probe;
    try {
      probe = await serverHas(probeUrl, feature);
    } catch (err) {
      probe = { has: true, answer: `the probe failed: ${err.message}` };
    }
    if (probe.has) {
      entry.result = "failed";
      entry.error =
        `the "${feature}" step is off (ELEMENT_STEPS=${process.env.ELEMENT_STEPS || "<unset>"}), ` +
        `but the server has the feature (${probe.answer}): turn it on in ON_BY_DEFAULT (scenario.mjs)`;
      console.log(`FAIL ${label}\n     ${entry.error}`);
    } else {
      entry.result = "off";
      entry.error = `off: the server does not have "${feature}" yet (${probe.answer})`;
      console.log(`OFF  ${label} [${feature}: not on the server yet]`);
      // The later steps of an off feature are off too; the others do not depend on it.
      return;
    }
    if (critical) blockedBy = entry.step;
    return;
  }
  const started = Date.now();
  stepDeadline = started + timeout;
  let timer;
  try {
    const run = Promise.resolve().then(fn);
    // A step that timed out may still fail later on: that is no longer news.
    run.catch(() => {});
    entry.details = await Promise.race([
      run,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${timeout} ms`)), timeout);
      }),
    ]);
    entry.result = "ok";
    console.log(`ok   ${label} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  } catch (err) {
    entry.result = "failed";
    entry.error = String(err?.stack || err);
    if (err?.details) entry.details = err.details;
    console.log(`FAIL ${label}\n     ${String(err?.message || err).split("\n").join("\n     ")}`);
    if (err?.details) console.log(`     details: ${JSON.stringify(err.details)}`);
    for (const u of users) {
      const file = path.join(RESULTS, `step${String(entry.step).padStart(2, "0")}-${u.name}.png`);
      try {
        await u.page.screenshot({ path: file, timeout: 10_000 });
        console.log(`     screenshot: ${file}`);
      } catch (e) {
        console.log(`     (no screenshot of ${u.name}: ${e.message})`);
      }
    }
    if (critical) blockedBy = entry.step;
    else for (const u of users) await settle(u.page);
  } finally {
    clearTimeout(timer);
  }
}

/** After a failed step that later steps do not depend on: closes what it left open (an
 * error dialog, a menu), so that the next step starts from the page as a person would.
 * `keep` dialogs stay open (the settings, under an error). */
async function settle(page, keep = 0) {
  for (let i = 0; i < 5; i++) {
    const open = await page.locator(".mx_Dialog, [role=menu]").count().catch(() => 0);
    if (open <= keep) return;
    await page.keyboard.press("Escape").catch(() => {});
    await sleep(300);
  }
  console.log(`     (${await page.locator(".mx_Dialog").count().catch(() => "?")} dialogs still open)`);
}

/** An error that carries evidence for the report; `until` gives up at once on one. */
function failure(message, details) {
  const err = new Error(message);
  err.details = details;
  return err;
}

/** Polls `check` (which returns a truthy value when done) until it holds or the step times out. */
async function until(what, check, { timeout = STEP_TIMEOUT_MS - 5_000, interval = 250 } = {}) {
  const deadline = Math.min(Date.now() + timeout, stepDeadline);
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      if (err.details) throw err;
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`waited ${timeout} ms for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await sleep(interval);
  }
}

// ---------------------------------------------------------------------------------------
// Element's UI, as the scenario uses it.

const WAIT = { timeout: STEP_TIMEOUT_MS - 5_000 };
/** Clicks inside a polling loop: a button that goes away must not hold the loop for long. */
const CLICK = { timeout: 5_000 };

async function registerThroughForm(user, elementUrl) {
  const page = user.page;
  await page.goto(`${elementUrl}/#/register`);
  await page.locator("#mx_RegistrationForm_username").waitFor(WAIT);
  await page.locator("#mx_RegistrationForm_username").fill(user.name);
  await page.locator("#mx_RegistrationForm_password").fill(PASSWORD);
  await page.locator("#mx_RegistrationForm_passwordConfirm").fill(PASSWORD);
  await page.locator("input.mx_Login_submit").click();
  // The server's only flow is m.login.registration_token.
  const tokenBox = page.getByLabel("Registration token");
  await tokenBox.waitFor(WAIT);
  await tokenBox.fill(REGISTRATION_TOKEN);
  await page.getByRole("button", { name: "Continue" }).click();
  // Then Element logs in, sets up cross-signing ("Setting up keys", with the password
  // just typed), asks what the account is for (skipped) and shows the home page.
  const seen = new Set();
  await until("the home page after registration", async () => {
    if (await page.getByText("Setting up keys").isVisible()) seen.add("Setting up keys");
    if (await page.getByText("Unable to set up keys").isVisible()) {
      throw failure("Element: Unable to set up keys", { seen: [...seen] });
    }
    const skip = page.locator(".mx_UseCaseSelection").getByRole("button", { name: "Skip" });
    // Once only: the choice stays on screen for 1.5 s after the click, and a second click
    // would wait for a button that is gone (30 s, the cause of slow registrations).
    if (!seen.has("use case selection") && (await skip.isVisible())) {
      seen.add("use case selection");
      await skip.click({ timeout: 5_000 });
    }
    const home = page.locator(".mx_HomePage, .mx_UserOnboardingPage").first();
    return (await home.isVisible()) && (await page.locator(".mx_RoomList").isVisible());
  }).catch((err) => {
    if (err.details) throw err;
    throw failure(err.message, { seen: [...seen] });
  });
  return { screens: [...seen] };
}

async function toastTitles(page) {
  return page.locator(".mx_Toast_title h2, .mx_Toast_title").allInnerTexts();
}

/** Dismisses the notification and secure-backup toasts, which sit over the room list. */
async function dismissToasts(page) {
  for (let i = 0; i < 5; i++) {
    const button = page.locator(".mx_Toast_buttons").getByRole("button", { name: /^(Dismiss|Later)$/ }).first();
    if (!(await button.isVisible())) return;
    // A toast may go by itself (another replaces it): then there is nothing to click.
    await button.click(CLICK).catch(() => {});
    await sleep(200);
  }
}

/** What Element's own client says about this user's cross-signing (for the report). */
async function crossSigningState(page) {
  return page.evaluate(async () => {
    const cli = window.mxMatrixClientPeg.get();
    const crypto = cli.getCrypto();
    const status = await crypto.getCrossSigningStatus();
    const device = await crypto.getDeviceVerificationStatus(cli.getUserId(), cli.getDeviceId());
    return {
      ready: await crypto.isCrossSigningReady(),
      status,
      ownDeviceCrossSigned: device?.signedByOwner ?? null,
      ownDeviceVerified: device?.crossSigningVerified ?? null,
    };
  });
}

function roomTile(page, name) {
  return page.locator(".mx_RoomList .mx_RoomTile", { has: page.locator(`.mx_RoomTile_title[title="${name}"]`) });
}

async function openRoom(page, name) {
  await roomTile(page, name).first().click();
  await page.locator(".mx_RoomHeader").getByText(name, { exact: true }).first().waitFor(WAIT);
}

function composer(page) {
  return page.locator(".mx_MessageComposer .mx_BasicMessageComposer_input");
}

async function send(page, text) {
  const box = composer(page);
  await box.waitFor(WAIT);
  await box.click();
  await box.pressSequentially(text, { delay: 5 });
  await box.press("Enter");
  await messageTile(page, text).waitFor(WAIT);
}

function messageTile(page, text) {
  return page
    .locator(".mx_RoomView_MessageList .mx_EventTile", {
      has: page.locator(".mx_EventTile_body", { hasText: text }),
    })
    .last();
}

async function expectMessage(page, text) {
  try {
    await messageTile(page, text).waitFor(WAIT);
  } catch {
    const bodies = await page.locator(".mx_RoomView_MessageList .mx_EventTile_body").allInnerTexts();
    throw failure(`message "${text}" not shown`, { shown: bodies.slice(-10) });
  }
}

/** Invites `userId` through Element's invite dialog (already open). */
async function inviteInDialog(page, userId, buttonName) {
  const dialog = page.locator(".mx_Dialog").filter({ has: page.locator(".mx_InviteDialog_editor") });
  await dialog.waitFor(WAIT);
  await dialog.locator(".mx_InviteDialog_editor input").fill(userId);
  await dialog.locator(".mx_InviteDialog_tile", { hasText: userId }).first().click();
  await dialog.getByRole("button", { name: buttonName, exact: true }).click();
  // "The following users may not exist" appears only when the profile lookup fails.
  const anyway = page.getByRole("button", { name: /Invite anyway|Start DM anyway/ });
  await until("the invite dialog to close", async () => {
    if (await anyway.isVisible()) {
      throw failure("Element says the invitee may not exist", {
        text: await page.locator(".mx_Dialog").last().innerText(),
      });
    }
    return !(await dialog.isVisible());
  });
}

async function acceptInvite(page, inviterName, roomName) {
  const invites = page.getByRole("group", { name: "Invites" });
  const tile = invites.locator(".mx_RoomTile", { hasText: roomName });
  await tile.first().waitFor(WAIT);
  await tile.first().click();
  const bar = page.locator(".mx_RoomPreviewBar");
  await bar.waitFor(WAIT);
  const text = await bar.innerText();
  if (!text.includes(inviterName)) {
    throw failure(`the invite does not name the inviter ${inviterName}`, { previewBar: text });
  }
  await bar.getByRole("button", { name: /^(Accept|Start chatting)$/ }).click();
  await composer(page).waitFor(WAIT);
  return { previewBar: text.replace(/\s+/g, " ").trim() };
}

/** Which sublists ("People", "Rooms", "Invites", ...) list a room of this name. */
async function sublistsWith(page, name) {
  return page.evaluate((name) => {
    const found = [];
    for (const group of document.querySelectorAll(".mx_RoomList .mx_RoomSublist")) {
      const labelId = group.getAttribute("aria-labelledby");
      const label = (labelId && document.getElementById(labelId)?.textContent?.trim()) || labelId;
      for (const title of group.querySelectorAll(".mx_RoomTile_title")) {
        if (title.getAttribute("title") === name) found.push(label);
      }
    }
    return found;
  }, name);
}

/** Element's tooltip on a message's shield, by matrix-js-sdk's EventShieldReason. */
const SHIELD_TOOLTIPS = [
  "Unknown error", // UNKNOWN
  "Encrypted by an unverified user.", // UNVERIFIED_IDENTITY
  "Encrypted by a device not verified by its owner.", // UNSIGNED_DEVICE
  "Encrypted by an unknown or deleted device.", // UNKNOWN_DEVICE
  "The authenticity of this encrypted message can't be guaranteed on this device.", // AUTHENTICITY_NOT_GUARANTEED
  "Encrypted by an unverified session", // MISMATCHED_SENDER_KEY
  "Not encrypted", // SENT_IN_CLEAR
  "Sender's verified identity has changed", // VERIFICATION_VIOLATION
];

/** The e2e icons on the tiles of these messages, and what Element's crypto says of each. */
async function shieldsOn(page, texts) {
  const result = [];
  for (const text of texts) {
    const tile = messageTile(page, text);
    const icons = tile.locator(".mx_EventTile_e2eIcon");
    const iconClasses = [];
    for (const icon of await icons.all()) iconClasses.push(await icon.getAttribute("class"));
    const eventId = await tile.getAttribute("data-event-id");
    const info = await page.evaluate(async (eventId) => {
      const cli = window.mxMatrixClientPeg.get();
      for (const room of cli.getRooms()) {
        const ev = room.findEventById(eventId);
        if (!ev) continue;
        const i = await cli.getCrypto().getEncryptionInfoForEvent(ev);
        return {
          encrypted: ev.isEncrypted(),
          decryptionFailure: ev.isDecryptionFailure(),
          shieldColour: i?.shieldColour ?? null, // 0 none, 1 grey, 2 red
          shieldReason: i?.shieldReason ?? null,
        };
      }
      return null;
    }, eventId);
    result.push({ text, eventId, iconClasses, ...info, shieldTooltip: SHIELD_TOOLTIPS[info?.shieldReason] });
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// The optional steps' helpers: images, the right panel, Secure Backup.

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** An RGB PNG of `width` × `height`, each pixel `pixel(x, y)` = [r, g, b]. */
function png(width, height, pixel) {
  const raw = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0, o = 0; y < height; y++) {
    raw[o++] = 0; // filter: none
    for (let x = 0; x < width; x++) for (const v of pixel(x, y)) raw[o++] = v;
  }
  const chunk = (type, data) => {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(data.length, 0);
    head.write(type, 4, "latin1");
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])));
    return Buffer.concat([head, data, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8 bits, RGB, deflate, no filter choice, no interlace
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

/** Waits until `img` has loaded; its natural size and source. */
async function loadedImage(img, what) {
  return until(what, () =>
    img.evaluate((i) => (i.complete && i.naturalWidth > 0 ? { width: i.naturalWidth, height: i.naturalHeight, src: i.currentSrc } : null)),
  );
}

/** Chooses `file` through the composer's "Attachment" button (in "More options" when narrow). */
async function attach(page, file) {
  const composerBar = page.locator(".mx_RoomView_body .mx_MessageComposer");
  const button = composerBar.getByRole("button", { name: "Attachment" });
  let opener = button;
  if (!(await button.isVisible())) {
    await composerBar.getByRole("button", { name: "More options" }).click();
    opener = page.getByRole("menuitem", { name: "Attachment" });
  }
  await chooseFile(page, opener, file);
}

/** Clicks `opener`, which opens a file chooser, and chooses `file`. */
async function chooseFile(page, opener, file) {
  const [chooser] = await Promise.all([page.waitForEvent("filechooser", WAIT), opener.click()]);
  await chooser.setFiles(file);
}

/** Element's error dialogs after an upload ("Upload Failed", "Upload Error"), as text. */
async function uploadError(page) {
  const dialog = page.locator(".mx_Dialog").filter({ hasText: /Upload Failed|Upload Error|failed to upload/ });
  return (await dialog.count()) ? (await dialog.first().innerText()).replace(/\s+/g, " ").trim() : null;
}

/** Throws at once when `user`'s Element got an error answer (4xx, 5xx, no answer) since
 * `since` (seconds, as `elapsed()`) to a request whose path matches `pattern`, unless
 * `expected(entry)` says the answer is one Element expects. */
function noErrorAnswer(user, pattern, since, what, expected = () => false) {
  const bad = user.network.filter(
    (e) => e.t >= since && pattern.test(e.path) && (e.status >= 400 || e.failed) && !expected(e),
  );
  if (bad.length) {
    const last = bad.at(-1);
    throw failure(`${what}: ${last.method} ${last.path.split("?")[0]} answered ${last.status ?? last.failed}`, {
      requests: bad.slice(-3),
    });
  }
}

/** Waits for `locator`, failing at once when the server answers `user`'s requests matching
 * `pattern` with an error (so that a missing endpoint says so, not a time-out). */
async function waitForUnlessError(locator, user, pattern, since, what) {
  await until(what, async () => {
    noErrorAnswer(user, pattern, since, what);
    return locator.isVisible();
  });
}

/** Closes the right panel (room info, threads) when it is open. */
async function closeRightPanel(page) {
  const panel = page.locator(".mx_RightPanel");
  if (!(await panel.isVisible())) return;
  await panel.getByRole("button", { name: "Close" }).first().click();
  await panel.waitFor({ state: "hidden", ...WAIT });
}

/** Opens the room header's button `name` ("Room info", "Threads") unless its card shows. */
async function openRightPanel(page, name, card) {
  if (await page.locator(card).isVisible()) return;
  // "Room info" is both the room's name and an icon: the icon is the last.
  await page.locator(".mx_RoomHeader").getByRole("button", { name, exact: true }).last().click();
  await page.locator(card).waitFor(WAIT);
}

/** Opens the user menu's "All settings" on `tab`; returns the dialog. */
async function openSettings(page, tab) {
  await page.getByRole("button", { name: "User menu" }).click();
  await page.getByRole("menuitem", { name: "All settings" }).click();
  const dialog = page.locator(".mx_UserSettingsDialog");
  await dialog.waitFor(WAIT);
  await dialog.getByRole("tab", { name: tab }).click();
  return dialog;
}

/** A step's clean-up, whose own failure is logged and does not hide the step's. */
async function tidy(page, fn) {
  try {
    await fn();
  } catch (err) {
    console.log(`     (clean-up: ${String(err?.message || err).split("\n")[0]})`);
  }
}

async function closeDialog(page, dialog) {
  await page.keyboard.press("Escape");
  await dialog.waitFor({ state: "hidden", timeout: 5_000 });
}

/** The server's key backup as this user's Element sees it: the version and each room's session count. */
async function serverBackup(page) {
  return page.evaluate(async () => {
    const cli = window.mxMatrixClientPeg.get();
    const base = `${cli.getHomeserverUrl()}/_matrix/client/v3/room_keys`;
    const headers = { authorization: `Bearer ${cli.getAccessToken()}` };
    const v = await fetch(`${base}/version`, { headers });
    if (v.status !== 200) return { version: null, status: v.status };
    const { version } = await v.json();
    const keys = await (await fetch(`${base}/keys?version=${encodeURIComponent(version)}`, { headers })).json();
    const rooms = Object.fromEntries(
      Object.entries(keys.rooms ?? {}).map(([roomId, r]) => [roomId, Object.keys(r.sessions ?? {}).length]),
    );
    return { version, rooms, activeVersion: await cli.getCrypto().getActiveSessionBackupVersion() };
  });
}

/** The id of the room Element lists as `name`. */
async function roomIdByName(page, name) {
  return page.evaluate((name) => {
    const room = window.mxMatrixClientPeg.get().getRooms().find((r) => r.name === name);
    return room?.roomId ?? null;
  }, name);
}

// ---------------------------------------------------------------------------------------
// The scenario.

async function main() {
  rmSync(RESULTS, { recursive: true, force: true });
  mkdirSync(RESULTS, { recursive: true });

  const convo = await startConvo();
  probeUrl = convo.url;
  const element = await startElementServer(convo.url);
  console.log(`convo ${convo.url}, Element ${element.url}, results in ${RESULTS}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: !HEADED,
    args: [
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const alice = await newUser(browser, "alice", element.url, convo.url);
  const bob = await newUser(browser, "bob", element.url, convo.url);
  const both = [alice, bob];
  resultUsers.push(alice, bob);
  const dm = { aliceText: "secret from alice", bobText: "secret from bob" };

  try {
    await step(
      "Element loads with Convo as its homeserver (both users)",
      async () => {
        for (const u of both) {
          await u.page.goto(`${element.url}/#/login`);
          await u.page.locator("#mx_LoginForm_username").waitFor(WAIT);
          await u.page.getByText(SERVER_NAME, { exact: true }).first().waitFor(WAIT);
        }
        return { unstable_features: convo.versions.unstable_features ?? null };
      },
      { users: both },
    );

    for (const u of both) {
      await step(`${u.name} registers through Element's form with a registration token`, async () => {
        return registerThroughForm(u, element.url);
      }, { users: [u] });

      await step(
        `${u.name}'s cross-signing is set up: Element's settings say "Cross-signing is ready", no "Verify this session" toast`,
        async () => {
          const page = u.page;
          const toasts = await toastTitles(page);
          const state = await until("cross-signing to be ready", async () => {
            const s = await crossSigningState(page);
            return s.ready && s.ownDeviceCrossSigned ? s : null;
          }, { timeout: 20_000 }).catch(async (err) => {
            throw failure(err.message, { state: await crossSigningState(page), toasts });
          });
          if (toasts.some((t) => t.includes("Verify this session"))) {
            throw failure('Element asks to "Verify this session"', { toasts, state });
          }
          await dismissToasts(page);
          // The settings panel, as a person would look.
          await page.getByRole("button", { name: "User menu" }).click();
          await page.getByRole("menuitem", { name: "Security & Privacy" }).click();
          const dialog = page.locator(".mx_UserSettingsDialog");
          try {
            // Without key backup (not implemented yet) Element says "Cross-signing is ready
            // but keys are not backed up."; with it, "Cross-signing is ready for use.".
            const panel = dialog.getByText(/Cross-signing is ready/);
            await panel.waitFor(WAIT);
            return { settings: await panel.innerText(), toasts, state };
          } finally {
            await page.keyboard.press("Escape");
            await dialog.waitFor({ state: "hidden", timeout: 5_000 });
          }
        },
        { critical: false, users: [u] },
      );
    }

    // --- an unencrypted group room -----------------------------------------------------

    await step(
      `alice creates an unencrypted private room "${GROUP_ROOM}"`,
      async () => {
        const page = alice.page;
        await page.getByRole("button", { name: "Add room" }).click();
        await page.getByRole("menuitem", { name: "New room" }).click();
        const dialog = page.locator(".mx_CreateRoomDialog");
        await dialog.waitFor(WAIT);
        await dialog.getByLabel("Name").fill(GROUP_ROOM);
        const e2e = dialog.locator(".mx_CreateRoomDialog_e2eSwitch [role=switch]");
        if ((await e2e.getAttribute("aria-checked")) === "true") await e2e.click();
        if ((await e2e.getAttribute("aria-checked")) !== "false") throw new Error("could not turn encryption off");
        await dialog.getByRole("button", { name: "Create room" }).click();
        await page.locator(".mx_RoomHeader").getByText(GROUP_ROOM, { exact: true }).first().waitFor(WAIT);
        await composer(page).waitFor(WAIT);
      },
      { users: [alice] },
    );

    await step(
      "alice invites bob with Element's invite dialog",
      async () => {
        const page = alice.page;
        await page.locator(".mx_NewRoomIntro").getByRole("button", { name: "Invite to this room" }).click();
        await inviteInDialog(page, bob.userId, "Invite");
        await page
          .locator(".mx_RoomView_MessageList")
          .getByText(/alice invited bob/)
          .first()
          .waitFor(WAIT);
      },
      { users: [alice] },
    );

    await step(
      "bob sees the invite, naming alice, and accepts it",
      async () => acceptInvite(bob.page, "alice", GROUP_ROOM),
      { users: [bob] },
    );

    await step(
      "alice's message reaches bob",
      async () => {
        await openRoom(alice.page, GROUP_ROOM);
        await send(alice.page, "hello from alice");
        await expectMessage(bob.page, "hello from alice");
      },
      { users: both },
    );

    await step(
      "bob's message reaches alice",
      async () => {
        await send(bob.page, "hello from bob");
        await expectMessage(alice.page, "hello from bob");
      },
      { users: both },
    );

    await step(
      "alice sees bob typing, and the indicator goes when bob clears the composer",
      async () => {
        const box = composer(bob.page);
        await box.click();
        await box.pressSequentially("bob is typing", { delay: 20 });
        const typing = alice.page.locator(".mx_WhoIsTypingTile");
        await typing.getByText(/bob is typing/).waitFor(WAIT);
        await box.press("Control+A");
        await box.press("Backspace");
        await typing.waitFor({ state: "hidden", ...WAIT });
      },
      { critical: false, users: both },
    );

    await step(
      "alice sees bob's read receipt on her message",
      async () => {
        await send(alice.page, "please read this");
        await expectMessage(bob.page, "please read this");
        // Element sends receipts only while its user is active.
        await bob.page.mouse.move(600, 400);
        await bob.page.mouse.move(640, 420);
        const receipts = messageTile(alice.page, "please read this").locator(".mx_ReadReceiptGroup_button");
        await until("bob's read receipt on alice's message", async () => {
          await bob.page.mouse.move(600 + Math.random() * 40, 400);
          const label = (await receipts.count()) ? await receipts.first().getAttribute("aria-label") : "";
          return label && label.includes("bob") ? label : null;
        });
      },
      { critical: false, users: both },
    );

    await step(
      "bob reloads Element: still logged in, the room's history is shown",
      async () => {
        await bob.page.reload();
        await bob.page.locator(".mx_RoomList").waitFor(WAIT);
        await openRoom(bob.page, GROUP_ROOM);
        for (const text of ["hello from alice", "hello from bob", "please read this"]) {
          await expectMessage(bob.page, text);
        }
      },
      { users: [bob] },
    );

    // --- the group room: media, avatars, threads, search (optional steps, see FEATURES) ---

    await step(
      "alice sends an image (a 1200×900 PNG); bob sees it as a thumbnail the server made (at most 800×600)",
      async () => {
        const since = Number(elapsed());
        const name = "convo-test-image.png";
        const image = png(1200, 900, (x, y) => [(x * 255) / 1199, (y * 255) / 899, 96]);
        await openRoom(alice.page, GROUP_ROOM);
        await attach(alice.page, { name, mimeType: "image/png", buffer: image });
        const dialog = alice.page.locator(".mx_UploadConfirmDialog");
        await dialog.waitFor(WAIT);
        await dialog.getByRole("button", { name: "Upload", exact: true }).click();
        const shown = {};
        for (const u of both) {
          const img = u.page.locator(`.mx_RoomView_MessageList .mx_MImageBody img.mx_MImageBody_thumbnail[alt="${name}"]`);
          await until(`the image in ${u.name}'s timeline`, async () => {
            noErrorAnswer(alice, /\/upload|\/create/, since, "alice's upload");
            const error = await uploadError(alice.page);
            if (error) throw failure("Element could not upload the image", { dialog: error });
            noErrorAnswer(u, /\/thumbnail|\/download/, since, `${u.name}'s Element fetching the image`);
            return (await img.count()) > 0;
          });
          shown[u.name] = await loadedImage(img.first(), `the image to load for ${u.name}`);
        }
        const { width, height, src } = shown.bob;
        // With a device pixel ratio of 1, Element asks the server for an 800×600 thumbnail.
        if (!/\/thumbnail\//.test(src) || width > 800 || height > 600) {
          throw failure("bob's Element does not show a server thumbnail", { shown });
        }
        return { shown, bytes: image.length };
      },
      { critical: false, users: both, feature: "media" },
    );

    await step(
      "alice sets an avatar in Settings; bob sees it beside her next message",
      async () => {
        const page = alice.page;
        const since = Number(elapsed());
        const dialog = await openSettings(page, "Account");
        try {
          await dialog.locator(".mx_UserProfileSettings .mx_AvatarSetting_avatar").click();
          const avatar = png(256, 256, (x, y) => ((x >> 5) + (y >> 5)) % 2 ? [200, 40, 90] : [250, 220, 60]);
          await chooseFile(page, page.getByRole("menuitem", { name: "Upload file" }), {
            name: "avatar.png",
            mimeType: "image/png",
            buffer: avatar,
          });
          // The settings show the new avatar once Element has uploaded it and set avatar_url.
          await until("the new avatar in alice's settings", async () => {
            noErrorAnswer(alice, /\/upload|\/create|\/avatar_url/, since, "alice's new avatar");
            const error = await uploadError(page);
            if (error) throw failure("Element could not upload the avatar", { dialog: error });
            const img = dialog.locator("img.mx_AvatarSetting_avatarDisplay");
            return (await img.count()) && (await img.evaluate((i) => i.complete && i.naturalWidth > 0));
          });
        } finally {
          await tidy(page, async () => {
            await settle(page, 1);
            await closeDialog(page, dialog);
          });
        }
        const mxc = await until("alice's avatar_url", () =>
          page.evaluate(() => {
            const cli = window.mxMatrixClientPeg.get();
            return cli.getUser(cli.getUserId())?.avatarUrl || null;
          }),
        );
        const mediaId = mxc.split("/").pop();
        const text = "alice has an avatar now";
        await openRoom(page, GROUP_ROOM);
        await send(page, text);
        await expectMessage(bob.page, text);
        const img = messageTile(bob.page, text).locator(".mx_EventTile_avatar img");
        const shown = await until("alice's avatar beside her message, for bob", async () => {
          if (!(await img.count())) return null;
          noErrorAnswer(bob, /\/thumbnail|\/download/, since, "bob's Element fetching alice's avatar");
          const i = await img.first().evaluate((i) => ({ loaded: i.complete && i.naturalWidth > 0, src: i.currentSrc }));
          return i.loaded && i.src.includes(mediaId) ? i : null;
        }).catch(async (err) => {
          throw failure(err.message, { mxc, avatar: await messageTile(bob.page, text).locator(".mx_EventTile_avatar").innerHTML() });
        });
        return { mxc, shown };
      },
      { critical: false, users: both, feature: "avatar" },
    );

    await step(
      'alice replies in a thread to "hello from bob"; bob sees the reply in the Threads panel',
      async () => {
        const since = Number(elapsed());
        const root = "hello from bob";
        const reply = "a reply in a thread";
        await openRoom(alice.page, GROUP_ROOM);
        const tile = messageTile(alice.page, root);
        await tile.hover();
        await tile.getByRole("button", { name: "Reply in thread" }).click();
        const thread = alice.page.locator(".mx_ThreadView");
        await thread.waitFor(WAIT);
        const box = thread.locator(".mx_BasicMessageComposer_input");
        await box.click();
        await box.pressSequentially(reply, { delay: 5 });
        await box.press("Enter");
        await thread.locator(".mx_EventTile_body", { hasText: reply }).first().waitFor(WAIT);
        await closeRightPanel(alice.page);

        const page = bob.page;
        await openRoom(page, GROUP_ROOM);
        // The root's tile in the timeline says "1 reply".
        const summary = messageTile(page, root).locator(".mx_ThreadSummary");
        await summary.getByText(/1 reply/).waitFor(WAIT);
        // Read now: with the thread open, the last tile of the root is the thread view's.
        const summaryText = (await summary.innerText()).replace(/\s+/g, " ").trim();
        await openRightPanel(page, "Threads", ".mx_ThreadPanel");
        try {
          const listed = page.locator(".mx_ThreadPanel .mx_EventTile", { hasText: root }).first();
          await waitForUnlessError(listed, bob, /\/threads|\/relations\//, since, "the thread in bob's Threads panel").catch(
            async (err) => {
              if (err.details) throw err;
              throw failure("the Threads panel does not list the thread", {
                panel: (await page.locator(".mx_ThreadPanel").innerText()).replace(/\s+/g, " ").trim(),
                requests: bob.network.filter((e) => e.path.includes("/threads")).slice(-3),
              });
            },
          );
          await listed.click();
          await page.locator(".mx_ThreadView .mx_EventTile_body", { hasText: reply }).first().waitFor(WAIT);
          return { summary: summaryText };
        } finally {
          await tidy(page, () => closeRightPanel(page));
        }
      },
      { critical: false, users: both, feature: "threads" },
    );

    await step(
      'bob searches the room for "please" and finds alice\'s earlier message "please read this"',
      async () => {
        const page = bob.page;
        const since = Number(elapsed());
        await openRoom(page, GROUP_ROOM);
        await openRightPanel(page, "Room info", ".mx_RoomSummaryCard");
        const input = page.locator(".mx_RoomSummaryCard_search input");
        try {
          await input.fill("please");
          const results = page.locator(".mx_RoomView_searchResultsPanel");
          const hit = results.locator(".mx_EventTile", { hasText: "please read this" }).first();
          try {
            await waitForUnlessError(hit, bob, /\/search/, since, 'the search result "please read this"');
          } catch (err) {
            if (err.details) throw err;
            throw failure('no search result "please read this"', {
              results: (await results.count()) ? await results.innerText() : null,
              requests: bob.network.filter((e) => e.path.includes("/search")).slice(-3),
            });
          }
          const highlighted = await hit.locator(".mx_EventTile_searchHighlight").allInnerTexts();
          if (!highlighted.some((h) => /please/i.test(h))) {
            throw failure('"please" is not highlighted in the result', { highlighted });
          }
          const header = page.locator(".mx_RoomSearchAuxPanel");
          return {
            results: await results.locator(".mx_EventTile").count(),
            summary: (await header.count()) ? (await header.innerText()).replace(/\s+/g, " ").trim() : null,
          };
        } finally {
          // Back to the timeline: the search bar's Cancel, then the room info closed.
          await tidy(page, async () => {
            await settle(page); // "Search failed", when it failed
            await page.locator(".mx_RoomSearchAuxPanel").getByRole("button", { name: "Cancel" }).click({ timeout: 10_000 });
            await page.locator(".mx_RoomView_searchResultsPanel").waitFor({ state: "hidden", timeout: 5_000 });
            await closeRightPanel(page);
          });
        }
      },
      { critical: false, users: [bob], feature: "search" },
    );

    // --- Element's default DM: encrypted ----------------------------------------------

    await step(
      'alice starts a DM with bob ("Start chat"), encrypted by default, and sends the first message',
      async () => {
        const page = alice.page;
        await page.getByRole("button", { name: "Start chat" }).click();
        await inviteInDialog(page, bob.userId, "Go");
        // Until the first message, the DM is a "local room" in Element only (no request yet);
        // Element 1.11.88 shows "Encryption not enabled" there (its crypto does not know
        // local rooms), then creates the room, encrypted, with the first message.
        await send(page, dm.aliceText);
        await until("the DM to be created and the message sent", async () => {
          const id = await messageTile(page, dm.aliceText).getAttribute("data-event-id");
          return id?.startsWith("$");
        });
        await page.locator(".mx_RoomHeader").getByText("bob", { exact: true }).first().waitFor(WAIT);
        const box = composer(page);
        let placeholder;
        await until("the composer to say the DM is encrypted", async () => {
          placeholder = await box.getAttribute("aria-label");
          return /encrypted/i.test(placeholder || "");
        }).catch(() => {
          throw failure("the DM's composer is not for encrypted messages", { placeholder });
        });
        const [info] = await shieldsOn(page, [dm.aliceText]);
        if (!info?.encrypted) throw failure("alice's first DM message was not sent encrypted", info);
        return { composer: placeholder };
      },
      { users: [alice] },
    );

    await step(
      "bob sees the DM invite, naming alice, and accepts it",
      async () => acceptInvite(bob.page, "alice", "alice"),
      { users: [bob] },
    );

    await step(
      "bob reads alice's DM message, decrypted",
      async () => {
        await expectMessage(bob.page, dm.aliceText);
        const [info] = await shieldsOn(bob.page, [dm.aliceText]);
        if (!info?.encrypted || info.decryptionFailure) throw failure("not an encrypted, decrypted event", info);
        return info;
      },
      { users: [bob] },
    );

    await step(
      "bob's DM reply reaches alice, decrypted",
      async () => {
        await send(bob.page, dm.bobText);
        await expectMessage(alice.page, dm.bobText);
        const [info] = await shieldsOn(alice.page, [dm.bobText]);
        if (!info?.encrypted || info.decryptionFailure) throw failure("not an encrypted, decrypted event", info);
        return info;
      },
      { users: both },
    );

    for (const u of both) {
      await step(
        `${u.name} sees no shield (no unverified-device warning) on the DM's messages`,
        async () => {
          const texts = [dm.aliceText, dm.bobText];
          // Element computes each tile's shield once the sender's keys are known: wait
          // until its crypto has an answer for every message, then check the tiles.
          let infos;
          try {
            infos = await until("Element's verdict on every DM message", async () => {
              const i = await shieldsOn(u.page, texts);
              return i.every((x) => x.shieldColour === 0 && x.iconClasses.length === 0) ? i : null;
            }, { timeout: 15_000 });
          } catch {
            infos = await shieldsOn(u.page, texts);
            throw failure("Element shows a shield on DM messages", { infos });
          }
          return infos;
        },
        { critical: false, users: [u] },
      );
    }

    for (const [u, other] of [
      [alice, bob],
      [bob, alice],
    ]) {
      await step(
        `the DM is listed under "People" for ${u.name}${u === bob ? " (the invitee)" : ""}`,
        async () => {
          let lists;
          try {
            lists = await until(`"${other.name}" under People`, async () => {
              const l = await sublistsWith(u.page, other.name);
              return l.length === 1 && l[0] === "People" ? l : null;
            }, { timeout: 15_000 });
          } catch {
            throw failure(`the DM "${other.name}" is under ${JSON.stringify(await sublistsWith(u.page, other.name))}`, {
              ...(await dmEvidence(u.page, other.userId)),
            });
          }
          return { sublists: lists };
        },
        { critical: false, users: [u] },
      );
    }

    await step(
      "alice reloads Element: the DM's history is still decrypted",
      async () => {
        await alice.page.reload();
        await alice.page.locator(".mx_RoomList").waitFor(WAIT);
        await roomTile(alice.page, "bob").first().click();
        for (const text of [dm.aliceText, dm.bobText]) await expectMessage(alice.page, text);
        const infos = await shieldsOn(alice.page, [dm.aliceText, dm.bobText]);
        if (infos.some((i) => i.decryptionFailure || !i.encrypted)) throw failure("not decrypted after reload", infos);
        return infos;
      },
      { critical: false, users: [alice] },
    );

    // --- Secure Backup, restored on a second login (optional steps, see FEATURES) -------

    const backup = {};
    await step(
      'alice sets up Secure Backup (Settings, Security & Privacy, "Set up", a generated Security Key); her DM\'s room keys reach the server',
      async () => {
        const page = alice.page;
        const since = Number(elapsed());
        let dialog = await openSettings(page, "Security & Privacy");
        await dialog.getByRole("button", { name: "Set up", exact: true }).first().click();
        const seen = [];
        const saw = (what) => seen.at(-1) !== what && seen.push(what);
        // Element chains its dialogs (Secure Backup, the Security Key, maybe the password,
        // "Success!"); each is answered as it shows.
        await until("Secure Backup to be set up", async () => {
          const open = [];
          for (const d of await page.locator(".mx_Dialog").filter({ hasNot: page.locator(".mx_UserSettingsDialog") }).all()) {
            if (await d.isVisible()) open.push(d);
          }
          // "No backup yet" (404 M_NOT_FOUND on the version) is what Element asks first.
          noErrorAnswer(alice, /\/room_keys\//, since, "alice's key backup", (e) => e.status === 404 && /M_NOT_FOUND/.test(e.response ?? ""));
          // Done when the last of Element's dialogs has closed.
          if (!open.length) return seen.includes("Secure Backup successful");
          for (const top of open) {
            const text = await top.innerText();
            if (/Unable to set up|Unable to create key backup|Unable to query/.test(text)) {
              throw failure("Element could not set up Secure Backup", { seen, dialog: text });
            }
            if (text.includes("Generate a Security Key")) {
              saw("choose a Security Key");
              await top.getByRole("button", { name: "Continue" }).click(CLICK);
            } else if (text.includes("Save your Security Key")) {
              saw("Save your Security Key");
              backup.securityKey = (await top.locator(".mx_CreateSecretStorageDialog_recoveryKey code").innerText()).trim();
              await Promise.all([page.waitForEvent("download", WAIT), top.getByRole("button", { name: "Download" }).click(CLICK)]);
              await top.getByRole("button", { name: "Continue" }).click(CLICK);
            } else if (await top.locator("input[type=password]").isVisible()) {
              saw("password");
              await top.locator("input[type=password]").fill(PASSWORD);
              await top.getByRole("button", { name: "Continue" }).click(CLICK);
            } else if (text.includes("Secure Backup successful")) {
              saw("Secure Backup successful");
              await top.getByRole("button", { name: "Done" }).click(CLICK);
            } else if (text.includes("Success!")) {
              saw("Success!");
              await top.getByRole("button", { name: "OK" }).click(CLICK);
            }
          }
          return false;
        }).catch((err) => {
          if (err.details) throw err;
          throw failure(err.message, { seen });
        });
        if (!backup.securityKey) throw failure("Element showed no Security Key", { seen });
        // Element closes its settings with the last of its dialogs: open them again to see
        // what they say now.
        if (!(await dialog.isVisible())) dialog = await openSettings(page, "Security & Privacy");
        try {
          await dialog.getByText("This session is backing up your keys.").waitFor(WAIT);
        } catch {
          throw failure('Settings do not say "This session is backing up your keys."', {
            seen,
            settings: (await dialog.innerText()).replace(/\s+/g, " ").slice(0, 2000),
          });
        } finally {
          await tidy(page, () => closeDialog(page, dialog));
        }
        // Element backs up keys in the background: wait until the server holds both DM
        // sessions (alice's and bob's) in the backup.
        const dmRoomId = await roomIdByName(page, "bob");
        const state = await until("the DM's two sessions in the server's backup", async () => {
          const b = await serverBackup(page);
          return b.version && b.rooms[dmRoomId] >= 2 ? b : null;
        }).catch(async (err) => {
          throw failure(err.message, { seen, backup: await serverBackup(page) });
        });
        return { seen, dmRoomId, backup: state };
      },
      { users: [alice], feature: "backup", timeout: 2 * STEP_TIMEOUT_MS },
    );

    // A second browser context: a new login, a new device.
    const second = ENABLED.has("backup") ? await newUser(browser, "alice", element.url, convo.url, "alice-2") : null;
    if (second) resultUsers.push(second);
    await step(
      "alice logs in a second time, verifies the new login with her Security Key and reads the DM's history, restored from the backup",
      async () => {
        const page = second.page;
        await page.goto(`${element.url}/#/login`);
        await page.locator("#mx_LoginForm_username").waitFor(WAIT);
        await page.locator("#mx_LoginForm_username").fill("alice");
        await page.locator("#mx_LoginForm_password").fill(PASSWORD);
        await page.locator("input.mx_Login_submit").click();
        // Element asks to confirm the new login: with another device or the Security Key.
        await page.getByRole("button", { name: /^Verify with Security Key/ }).click(WAIT);
        const keyDialog = page.locator(".mx_AccessSecretStorageDialog");
        await keyDialog.locator("#mx_securityKey").fill(backup.securityKey);
        await keyDialog.getByText("Looks good!").waitFor(WAIT);
        await keyDialog.getByRole("button", { name: "Continue" }).click();
        // "Your new device is now verified", then Done.
        const seen = [];
        await until("the verified login's home page", async () => {
          const done = page.getByRole("button", { name: "Done", exact: true });
          if (await done.isVisible()) {
            seen.push((await page.locator(".mx_AuthPage").innerText()).replace(/\s+/g, " ").trim());
            await done.click(CLICK);
          }
          return page.locator(".mx_RoomList").isVisible();
        });
        await dismissToasts(page);
        await roomTile(page, "bob").first().click();
        const texts = [dm.aliceText, dm.bobText];
        let infos;
        try {
          infos = await until("the DM's history, decrypted", async () => {
            for (const text of texts) if (!(await messageTile(page, text).isVisible())) return null;
            const i = await shieldsOn(page, texts);
            return i.every((x) => x.encrypted && !x.decryptionFailure) ? i : null;
          });
        } catch {
          throw failure("the second login does not read the DM's history", {
            shown: await page.locator(".mx_RoomView_MessageList .mx_EventTile_body").allInnerTexts(),
            crossSigning: await crossSigningState(page),
          });
        }
        return { completeSecurity: seen, infos, crossSigning: await crossSigningState(page) };
      },
      { users: second ? [second] : [], feature: "backup", timeout: 2 * STEP_TIMEOUT_MS },
    );
  } finally {
    writeResults(resultUsers);
    await browser.close().catch(() => {});
    element.close();
    await convo.stop();
  }
}

/** What decides whether Element lists a room as a DM: m.direct and the own member event. */
async function dmEvidence(page, otherUserId) {
  return page.evaluate(async (otherUserId) => {
    const cli = window.mxMatrixClientPeg.get();
    const me = cli.getUserId();
    const direct = cli.getAccountData("m.direct")?.getContent() ?? null;
    const rooms = cli
      .getRooms()
      .filter((r) => r.getMember(otherUserId) && r.getJoinedMemberCount() <= 2 && r.name !== "Convo group");
    const described = [];
    for (const r of rooms) {
      const mine = r.currentState.getStateEvents("m.room.member", me);
      // The same event as the server serves it on GET /rooms/{roomId}/event/{eventId}.
      let fromEventEndpoint = null;
      if (mine) {
        const url = `${cli.getHomeserverUrl()}/_matrix/client/v3/rooms/${encodeURIComponent(r.roomId)}/event/${encodeURIComponent(mine.getId())}`;
        const res = await fetch(url, { headers: { authorization: `Bearer ${cli.getAccessToken()}` } });
        fromEventEndpoint = { status: res.status, body: await res.json() };
      }
      described.push({
        roomId: r.roomId,
        name: r.name,
        dmInviter: r.getDMInviter() ?? null,
        myMemberEventFromSync: mine ? mine.event : null,
        fromEventEndpoint,
      });
    }
    return { mDirect: direct, rooms: described };
  }, otherUserId);
}

/** The users whose network and console go to the results (a second login joins them). */
const resultUsers = [];

function writeResults(users) {
  for (const u of users) {
    writeFileSync(path.join(RESULTS, `network-${u.name}.jsonl`), u.network.map((e) => JSON.stringify(e)).join("\n") + "\n");
    writeFileSync(path.join(RESULTS, `console-${u.name}.log`), u.console.join("\n") + "\n");
  }
  const refused = users.flatMap((u) => u.refused.map((url) => `${u.name}: ${url}`));
  const summary = {
    passed: steps.filter((s) => s.result === "ok").length,
    failed: steps.filter((s) => s.result === "failed").length,
    skipped: steps.filter((s) => s.result === "skipped").length,
    off: steps.filter((s) => s.result === "off").length,
    steps,
    refusedRequests: refused,
    errorResponses: users.flatMap((u) =>
      u.network.filter((e) => e.status >= 400 || e.failed).map((e) => ({ user: u.name, ...e })),
    ),
  };
  writeFileSync(path.join(RESULTS, "summary.json"), JSON.stringify(summary, null, 2) + "\n");
}

// A promise of a step that already failed or timed out: reported, not fatal.
process.on("unhandledRejection", (err) => console.log(`     (after its step: ${String(err?.message || err).split("\n")[0]})`));

// run.sh's time limit (ELEMENT_SCENARIO_TIMEOUT) ends the run with SIGTERM: keep what was seen.
process.on("SIGTERM", () => {
  console.log("FAIL the scenario was stopped (SIGTERM: run.sh's ELEMENT_SCENARIO_TIMEOUT)");
  steps.push({ step: steps.length + 1, name: "scenario time limit", result: "failed", error: "SIGTERM" });
  writeResults(resultUsers);
  process.exit(1);
});

try {
  await main();
} catch (err) {
  console.log(`FAIL the scenario could not run: ${err?.stack || err}`);
  steps.push({ step: steps.length + 1, name: "scenario setup", result: "failed", error: String(err) });
}
const passed = steps.filter((s) => s.result === "ok").length;
const failed = steps.filter((s) => s.result === "failed").length;
const skipped = steps.filter((s) => s.result === "skipped").length;
const off = steps.filter((s) => s.result === "off");
console.log(`\nelement: ${passed} passed, ${failed} failed, ${skipped} skipped, ${off.length} off (results in ${RESULTS})`);
if (off.length) {
  const features = [...new Set(off.map((s) => s.feature))].join(", ");
  console.log(`element: off because the server does not have them yet: ${features} (ELEMENT_STEPS, FEATURES in scenario.mjs)`);
}
process.exit(failed || skipped ? 1 : 0);
