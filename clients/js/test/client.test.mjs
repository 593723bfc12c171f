// Unit tests of edgeplex.js under Node (`node --test clients/js/test/`): fake transports and a
// manual clock, no network.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync } from "node:fs";
import { connect, backoff, tokenExpiry } from "../edgeplex.js";
import { fakeEnv, flush, jwt } from "./fake.mjs";

const URL_ = "https://edge.test:8443";
const MODULE = new URL("../edgeplex.js", import.meta.url);

async function openWs(opts = {}, envOpts = {}) {
  const env = fakeEnv(envOpts);
  const client = connect(URL_, { transports: ["websocket"], _env: env, ...opts });
  await flush();
  env.sockets[0].welcome();
  await flush();
  return { env, client, ws: env.sockets[0] };
}

test("the module stays under 20 KB unminified and has no imports", () => {
  assert.ok(statSync(MODULE).size <= 20480, `edgeplex.js is ${statSync(MODULE).size} bytes`);
  assert.doesNotMatch(readFileSync(MODULE, "utf8"), /^\s*import\s/m);
});

test("backoff is full jitter from 250 ms up to 10 s", () => {
  for (let n = 0; n < 40; n++) {
    const ceiling = Math.min(10000, 250 * 2 ** n);
    assert.equal(backoff(n, () => 0), 0);
    assert.ok(backoff(n, () => 0.999999) <= ceiling);
    assert.ok(backoff(n, () => 0.999999) >= ceiling - 1);
  }
  assert.equal(backoff(0, () => 0.5), 125);
  assert.equal(backoff(100, () => 0.5), 5000);
});

test("transports are tried in order and a failed one moves on at once", async () => {
  // No WebTransport in this "browser": straight to WebSocket, which is refused (a 403 ends
  // the handshake with 1006), then SSE, with no wait in between.
  const env = fakeEnv();
  const client = connect(URL_, { _env: env });
  const states = [];
  client.on("state", (s) => states.push(s));
  client.subscribe("a", () => {});
  await flush();
  assert.equal(env.sockets.length, 1);
  assert.equal(env.sockets[0].url, "wss://edge.test:8443/ws");
  env.sockets[0].drop(1006);
  await flush();
  assert.equal(env.sources.length, 1, "SSE tried at once");
  assert.equal(env.sources[0].url.pathname, "/sse");
  env.sources[0].event({ op: "welcome", session: "x" }, "-");
  await flush();
  assert.equal(client.transport, "sse");
  assert.deepEqual(states, ["open"]);
});

test("a refused WebTransport (certificate, 403/429) falls back to WebSocket at once", async () => {
  const env = fakeEnv({ webtransport: true });
  const hash = "ab".repeat(32);
  const client = connect(URL_, {
    _env: env,
    serverCertificateHashes: [{ algorithm: "sha-256", value: hash }],
  });
  await flush();
  assert.equal(env.wts.length, 1);
  assert.equal(env.wts[0].url, "https://edge.test:8443/wt");
  const passed = env.wts[0].opts.serverCertificateHashes[0];
  assert.equal(passed.algorithm, "sha-256");
  assert.deepEqual([...passed.value], Array(32).fill(0xab), "hex turned into bytes");
  env.wts[0].refuse();
  await flush();
  assert.equal(env.sockets.length, 1, "WebSocket tried at once");
  env.sockets[0].welcome();
  await flush();
  assert.equal(client.transport, "websocket");
});

test("a transport that never answers (UDP blocked) is given up after openTimeout", async () => {
  const env = fakeEnv({ webtransport: true });
  connect(URL_, { _env: env, openTimeout: 3000 });
  await flush();
  await env.advance(2999);
  assert.equal(env.sockets.length, 0);
  await env.advance(1);
  assert.equal(env.sockets.length, 1);
});

test("once open, a dropped connection reconnects on the same transport with backoff", async () => {
  const env = fakeEnv({ webtransport: true, random: () => 0.999 });
  const client = connect(URL_, { _env: env, transports: ["websocket", "webtransport"] });
  const states = [];
  client.on("state", (s) => states.push(s));
  await flush();
  env.sockets[0].welcome();
  await flush();
  env.sockets[0].drop(1006);
  await flush();
  assert.equal(env.sockets.length, 1, "no reconnect before the backoff");
  await env.advance(250);
  assert.equal(env.sockets.length, 2, "within the first ceiling, 250 ms");
  assert.equal(env.wts.length, 0, "never moves to another transport");
  env.sockets[1].drop(1006);
  await env.advance(498);
  assert.equal(env.sockets.length, 2);
  await env.advance(1);
  assert.equal(env.sockets.length, 3, "ceiling doubled while it cannot open");
  env.sockets[2].welcome();
  await flush();
  env.sockets[2].drop();
  await env.advance(250);
  assert.equal(env.sockets.length, 4, "an open connection resets the backoff");
  assert.deepEqual(states, ["open", "reconnecting", "open", "reconnecting"]);
});

test("close 1013 waits at least a second before reconnecting", async () => {
  const { env, ws } = await openWs({}, { random: () => 0 });
  ws.drop(1013);
  await env.advance(999);
  assert.equal(env.sockets.length, 1);
  await env.advance(1);
  assert.equal(env.sockets.length, 2);
});

test("replies are matched by id; errors reject with code, message and retry_after_ms", async () => {
  const { ws, client } = await openWs();
  const p1 = client.publish("a", 1);
  const p2 = client.publish("a", 2);
  await flush();
  const [m1, m2] = ws.sent;
  assert.deepEqual(m1, { id: m1.id, op: "publish", channel: "a", data: 1 });
  assert.notEqual(m1.id, m2.id);
  ws.recv({ id: m2.id, error: { code: "rate_limited", message: "slow down", retry_after_ms: 250 } });
  ws.recv({ id: m1.id, ok: true });
  assert.equal((await p1).ok, true);
  await assert.rejects(p2, (e) => {
    assert.equal(e.code, "rate_limited");
    assert.equal(e.message, "slow down");
    assert.equal(e.retry_after_ms, 250);
    return true;
  });
});

test("requests in flight on a dropped connection reject with `disconnected`", async () => {
  const { env, ws, client } = await openWs();
  const p = assert.rejects(client.publish("a", 1), { code: "disconnected" });
  await flush();
  ws.drop();
  await p;
  // Made while reconnecting: sent on the next connection.
  const q = client.publish("a", 2);
  await env.advance(250);
  env.sockets[1].welcome();
  await flush();
  const m = env.sockets[1].last("publish");
  assert.equal(m.data, 2);
  env.sockets[1].recv({ id: m.id, ok: true });
  await q;
});

test("a request without a reply times out with `timeout`", async () => {
  const { env, client } = await openWs({ requestTimeout: 2000 });
  const p = assert.rejects(client.publish("a", 1), { code: "timeout" });
  await env.advance(2000);
  await p;
});

test("subscribe and publish made before the connection opens wait for it", async () => {
  const env = fakeEnv();
  const client = connect(URL_, { transports: ["websocket"], _env: env });
  client.subscribe("a", () => {});
  const p = client.publish("a", "early");
  await flush();
  const ws = env.sockets[0];
  assert.equal(ws.sent.length, 0);
  ws.welcome();
  await flush();
  assert.deepEqual(
    ws.sent.map((m) => m.op),
    ["subscribe", "publish"],
  );
  ws.recv({ id: ws.last("publish").id, ok: true });
  await p;
});

test("a resume subscribes from the last offset delivered and drops a redelivered one", async () => {
  const { env, ws, client } = await openWs();
  const got = [];
  client.subscribe("a", (data, meta) => got.push([data, meta.offset]));
  await flush();
  ws.recv({ id: ws.last("subscribe").id, ok: true });
  ws.recv({ op: "message", channel: "a", offset: "1-1", data: 1 });
  ws.recv({ op: "message", channel: "a", offset: "1-2", data: 2 });
  ws.drop();
  await env.advance(250);
  const ws2 = env.sockets[1];
  ws2.welcome();
  await flush();
  assert.deepEqual(ws2.last("subscribe"), { id: ws2.last("subscribe").id, op: "subscribe", channel: "a", since: "1-2" });
  ws2.recv({ id: ws2.last("subscribe").id, ok: true });
  ws2.recv({ op: "message", channel: "a", offset: "1-2", data: 2 });
  ws2.recv({ op: "message", channel: "a", offset: "1-3", data: 3 });
  assert.deepEqual(got, [
    [1, "1-1"],
    [2, "1-2"],
    [3, "1-3"],
  ]);
});

test("gap is surfaced, and a resume with no position to resume from says gap too", async () => {
  const { env, ws, client } = await openWs();
  const sub = client.subscribe("a", () => {});
  let gaps = 0;
  sub.on("gap", () => gaps++);
  await flush();
  ws.recv({ id: ws.last("subscribe").id, ok: true });
  ws.recv({ op: "gap", channel: "a" });
  assert.equal(gaps, 1);
  ws.drop();
  await env.advance(250);
  const ws2 = env.sockets[1];
  ws2.welcome();
  await flush();
  assert.equal(ws2.last("subscribe").since, undefined);
  ws2.recv({ id: ws2.last("subscribe").id, ok: true });
  await flush();
  assert.equal(gaps, 2, "nothing delivered before the cut: the edge had no position for it");
});

test("a subscribe refused with retry_after_ms is retried after it; forbidden ends it", async () => {
  const { env, ws, client } = await openWs();
  client.subscribe("a", () => {});
  const b = client.subscribe("b", () => {});
  let err;
  b.on("error", (e) => (err = e));
  await flush();
  const [sa, sb] = ws.sent;
  ws.recv({ id: sa.id, error: { code: "rate_limited", message: "later", retry_after_ms: 700 } });
  ws.recv({ id: sb.id, error: { code: "forbidden", message: "no" } });
  await env.advance(699);
  assert.equal(ws.sent.length, 2);
  await env.advance(1);
  assert.equal(ws.sent.length, 3);
  assert.equal(ws.sent[2].channel, "a");
  assert.equal(err.code, "forbidden");
  assert.throws(() => client.subscribe("a", () => {}), /already subscribed/);
  client.subscribe("b", () => {}); // the refused one is gone
});

test("a channel the edge takes away ends that subscription only, without reconnecting", async () => {
  const { ws, client } = await openWs();
  const got = [];
  client.subscribe("keep", (d) => got.push(d));
  const lost = client.subscribe("lose", (d) => got.push(d));
  let err;
  lost.on("error", (e) => (err = e));
  await flush();
  ws.recv({ op: "error", channel: "lose", error: { code: "forbidden", message: "rules reloaded" } });
  assert.equal(err.code, "forbidden");
  assert.equal(client.state, "open", "a channel notice is not a dropped connection");
  ws.recv({ op: "message", channel: "lose", offset: "1-1", data: "late" });
  ws.recv({ op: "message", channel: "keep", offset: "1-1", data: "kept" });
  assert.deepEqual(got, ["kept"]);
  client.subscribe("lose", () => {}); // gone, so it may be asked for again
});

test("unsubscribe sends unsubscribe and stops delivery", async () => {
  const { ws, client } = await openWs();
  const got = [];
  const sub = client.subscribe("a", (d) => got.push(d));
  await flush();
  sub.unsubscribe();
  await flush();
  assert.equal(ws.last("unsubscribe").channel, "a");
  ws.recv({ op: "message", channel: "a", offset: "1-1", data: 1 });
  assert.deepEqual(got, []);
});

test("SSE: one EventSource for every channel, reopened with the position when the set changes", async () => {
  const env = fakeEnv();
  const client = connect(URL_, { transports: ["sse"], _env: env });
  const got = [];
  client.subscribe("a", (d) => got.push(d));
  await flush();
  const es1 = env.sources[0];
  assert.deepEqual(es1.url.searchParams.getAll("channel"), ["a"]);
  assert.equal(es1.url.searchParams.get("since"), null);
  es1.event({ op: "welcome", session: "x" }, "3-7");
  es1.event({ op: "message", channel: "a", offset: "3-8", data: 8 }, "3-8");
  await flush();
  client.subscribe("b", () => {});
  client.subscribe("c", () => {});
  await flush();
  assert.ok(es1.closed);
  assert.equal(env.sources.length, 2, "one reopen for both changes");
  const es2 = env.sources[1];
  assert.deepEqual(es2.url.searchParams.getAll("channel"), ["a", "b", "c"]);
  assert.equal(es2.url.searchParams.get("since"), "3-8,,", "new channels start from now");
  es2.event({ op: "welcome", session: "y" }, "3-8,-,9-1");
  es2.event({ op: "message", channel: "a", offset: "3-8", data: 8 }, "3-8,-,9-1");
  await flush();
  assert.deepEqual(got, [8], "the redelivered offset is dropped");
  // A dropped stream reconnects with the whole position; an unsubscribe leaves its entry out.
  es2.fail();
  await env.advance(250);
  const es3 = env.sources[2];
  assert.equal(es3.url.searchParams.get("since"), "3-8,-,9-1");
  es3.event({ op: "welcome", session: "z" }, "3-8,-,9-1");
  await flush();
  client._subs.get("b").unsubscribe();
  await flush();
  const es4 = env.sources[3];
  assert.deepEqual(es4.url.searchParams.getAll("channel"), ["a", "c"]);
  assert.equal(es4.url.searchParams.get("since"), "3-8,9-1");
});

test("SSE: publish is POST /publish; an error reply rejects with its code", async () => {
  const env = fakeEnv();
  const client = connect(URL_, { transports: ["sse"], _env: env });
  await flush();
  assert.equal(client.transport, "sse", "no channel yet: open without a stream");
  assert.deepEqual(await client.publish("a", { x: 1 }), { ok: true });
  assert.equal(env.posts[0].url, "https://edge.test:8443/publish");
  assert.deepEqual(env.posts[0].body, { channel: "a", data: { x: 1 } });
  env.reply = { error: { code: "too_large", message: "body over 65536 bytes" } };
  await assert.rejects(client.publish("a", "x"), { code: "too_large" });
});

test("tokens: asked at connect, passed as ?token=, replaced with op auth before exp", async () => {
  const env = fakeEnv();
  let n = 0;
  const token = async () => jwt({ sub: "u", exp: (env.now() + 120000) / 1000, n: ++n });
  const client = connect(URL_, { transports: ["websocket"], _env: env, token });
  await flush();
  const ws = env.sockets[0];
  const first = new URL(ws.url).searchParams.get("token");
  assert.equal(tokenExpiry(first), 120000);
  ws.welcome();
  await flush();
  await env.advance(89999);
  assert.equal(n, 1);
  await env.advance(1);
  assert.equal(n, 2, "refreshed 30 s before exp");
  const auth = ws.last("auth");
  assert.equal(JSON.parse(atob(auth.token.split(".")[1])).n, 2);
  ws.recv({ id: auth.id, ok: true });
  // An edge without identity answers unknown_op: the session goes on.
  await env.advance(90000);
  ws.recv({ id: ws.last("auth").id, error: { code: "unknown_op", message: "unknown op" } });
  await flush();
  assert.equal(client.state, "open");
  // Token expired (4001): reconnect at once, with a new token.
  ws.drop(4001);
  await env.advance(0);
  assert.equal(env.sockets.length, 2);
  assert.equal(n, 4);
});

test("a POST publish carries the token in Authorization, never in the URL", async () => {
  const env = fakeEnv();
  const token = async () => jwt({ sub: "u", exp: (env.now() + 600000) / 1000 });
  const client = connect(URL_, { transports: ["sse"], _env: env, token });
  await flush();
  await client.publish("a", 1);
  assert.equal(env.posts[0].url, "https://edge.test:8443/publish");
  assert.match(env.posts[0].init.headers.authorization, /^Bearer [\w-]+\.[\w-]+\./);
});

test("a token valid for months is refreshed before exp, not in a loop", async () => {
  const env = fakeEnv();
  let n = 0;
  const days = 60;
  const token = async () => jwt({ sub: "u", exp: (env.now() + days * 86400000) / 1000, n: ++n });
  connect(URL_, { transports: ["websocket"], _env: env, token });
  await flush();
  env.sockets[0].welcome();
  await flush();
  await env.advance(30 * 86400000);
  assert.equal(n, 1, "no refresh while the token has weeks left");
  await env.advance(days * 86400000 - 30 * 86400000 - 30000);
  assert.equal(n, 2, "refreshed 30 s before exp");
});

test("tokens on SSE go in the URL, and a refresh reopens the stream with the position", async () => {
  const env = fakeEnv();
  let n = 0;
  const token = async () => jwt({ exp: (env.now() + 60000) / 1000, n: ++n });
  const client = connect(URL_, { transports: ["sse"], _env: env, token });
  client.subscribe("a", () => {});
  await flush();
  assert.ok(env.sources[0].url.searchParams.get("token"));
  env.sources[0].event({ op: "welcome" }, "1-1");
  await flush();
  await env.advance(45000);
  assert.equal(env.sources.length, 2);
  assert.equal(env.sources[1].url.searchParams.get("since"), "1-1");
  assert.equal(JSON.parse(atob(env.sources[1].url.searchParams.get("token").split(".")[1])).n, 2);
  assert.equal(tokenExpiry("not a jwt"), null);
});

test("WebTransport: newline-delimited JSON on one stream, datagram delivery per subscription", async () => {
  const env = fakeEnv({ webtransport: true });
  const client = connect(URL_, { _env: env });
  const got = [];
  client.subscribe("px", (d) => got.push(d), { delivery: "datagram" });
  client.subscribe("chat", (d) => got.push(d));
  await flush();
  const wt = env.wts[0];
  wt._ready();
  await flush();
  wt.push({ op: "welcome", session: "w" });
  await flush(10);
  assert.equal(client.transport, "webtransport");
  const [px, chat] = wt.sent;
  assert.equal(px.delivery, "datagram");
  assert.equal(chat.delivery, undefined);
  wt.datagram({ op: "message", channel: "px", offset: "1-1", data: 7 });
  wt.push({ op: "message", channel: "chat", offset: "2-1", data: "hi" });
  await flush(10);
  assert.deepEqual(got.sort(), [7, "hi"].sort());
  client.close();
  assert.equal(client.state, "closed");
  assert.ok(wt.closedByClient);
});
