// An encrypted direct chat between a user of one server and a user of another, both
// with matrix-js-sdk's real (Rust) crypto: the inviter's server and the invitee's are
// named by FEDTEST_FROM and FEDTEST_TO, labels of the servers in FEDTEST_SERVERS (the
// harness's servers.json). Each side must decrypt what the other sends; the servers
// only ever hold ciphertext. Run by test_e2ee.py with node's test runner; the SDK is
// the one tests/clients/js installs (npm ci there first).

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SDK = path.resolve(HERE, "../../tests/clients/js/node_modules/matrix-js-sdk/lib/index.js");
const { ClientEvent, Preset, createClient } = await import(pathToFileURL(SDK).href);

const PASSWORD = "Correct-Horse-42";
const WAIT_MS = 30_000;
const servers = JSON.parse(readFileSync(process.env.FEDTEST_SERVERS, "utf8")).servers;
const FROM = process.env.FEDTEST_FROM;
const TO = process.env.FEDTEST_TO;

// The SDK logs a lot: keep it, show it only when a test fails.
const sdkLog = [];
for (const name of ["log", "debug", "info", "warn", "error", "trace"]) {
  console[name] = (...args) => {
    sdkLog.push(`[${name}] ` + args.map((a) => (a instanceof Error ? a.stack : String(a))).join(" "));
    if (sdkLog.length > 3000) sdkLog.shift();
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitUntil(cond, label, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await cond();
    if (v) return v;
    await sleep(50);
  }
  throw new Error(`timed out after ${ms} ms waiting for: ${label}`);
}

/** Registers a user with open registration (m.login.dummy) on the server `label`. */
async function register(label, username) {
  const baseUrl = servers[label].client_url;
  const anon = createClient({ baseUrl });
  const body = { username, password: PASSWORD, initial_device_display_name: `js-sdk ${username}` };
  let session;
  try {
    return await anon.registerRequest(body);
  } catch (err) {
    assert.equal(err.httpStatus, 401, `register on ${label}: ${err}`);
    session = err.data.session;
  }
  const res = await anon.registerRequest({ ...body, auth: { type: "m.login.dummy", session } });
  return { ...res, baseUrl };
}

/** A started client with crypto, past its first sync. */
async function start(creds) {
  const client = createClient({
    baseUrl: creds.baseUrl,
    userId: creds.user_id,
    accessToken: creds.access_token,
    deviceId: creds.device_id,
  });
  await client.initRustCrypto({ useIndexedDB: false });
  const prepared = new Promise((resolve) => {
    const onSync = (state) => {
      if (state === "PREPARED") {
        client.off(ClientEvent.Sync, onSync);
        resolve();
      }
    };
    client.on(ClientEvent.Sync, onSync);
  });
  await client.startClient({ initialSyncLimit: 20 });
  await Promise.race([prepared, sleep(WAIT_MS).then(() => Promise.reject(new Error("first sync")))]);
  return client;
}

test(`matrix-js-sdk: an encrypted DM from ${FROM} to ${TO}`, { timeout: 180_000 }, async () => {
  const suffix = Math.random().toString(36).slice(2, 8);
  const alice = await start(await register(FROM, `ealice${suffix}`));
  const bob = await start(await register(TO, `ebob${suffix}`));
  try {
    const { room_id: roomId } = await alice.createRoom({
      is_direct: true,
      invite: [bob.getUserId()],
      preset: Preset.TrustedPrivateChat,
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
    });
    await waitUntil(() => bob.getRoom(roomId)?.getMyMembership() === "invite", "bob sees the invite");
    await bob.joinRoom(roomId);
    await waitUntil(
      () => alice.getRoom(roomId)?.getMember(bob.getUserId())?.membership === "join",
      "alice sees bob join",
    );
    for (const c of [alice, bob]) {
      await waitUntil(() => c.getRoom(roomId)?.hasEncryptionStateEvent(), `${c.getUserId()} sees the room encrypted`);
    }
    // Each side sees the other's device through its own server's /keys/query.
    for (const [c, other] of [
      [alice, bob],
      [bob, alice],
    ]) {
      await waitUntil(
        async () => (await c.getCrypto().getUserDeviceInfo([other.getUserId()], true)).get(other.getUserId())?.size === 1,
        `${c.getUserId()} sees ${other.getUserId()}'s device`,
      );
    }

    const decrypted = (client, body) => () =>
      client
        .getRoom(roomId)
        ?.getLiveTimeline()
        .getEvents()
        .find((e) => e.isEncrypted() && !e.isDecryptionFailure() && e.getContent().body === body);
    for (const [sender, receiver, body] of [
      [alice, bob, `secret from ${FROM}`],
      [bob, alice, `secret from ${TO}`],
      [alice, bob, "another secret"],
    ]) {
      const { event_id: eventId } = await sender.sendTextMessage(roomId, body);
      const ev = await waitUntil(decrypted(receiver, body), `${receiver.getUserId()} decrypts "${body}"`);
      assert.equal(ev.getId(), eventId);
      assert.equal(ev.getWireType(), "m.room.encrypted");
      assert.equal(ev.getSender(), sender.getUserId());
      const raw = await receiver.http.authedRequest(
        "GET",
        `/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(eventId)}`,
      );
      assert.equal(raw.type, "m.room.encrypted");
      assert.ok(!JSON.stringify(raw).includes(body), "no plaintext on the receiver's server");
    }
  } catch (err) {
    err.message += "\n--- SDK log (last 80 lines):\n" + sdkLog.slice(-80).join("\n");
    throw err;
  } finally {
    alice.stopClient();
    bob.stopClient();
  }
});
