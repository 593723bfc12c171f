// edgeplex.js: the browser client of an edgeplex edge. One dependency-free ES module, served by
// the edge at GET /edgeplex.js. It picks a transport (WebTransport, WebSocket, SSE, in the order
// given), keeps the one that opened, reconnects on it with full-jitter backoff and resumes every
// subscription from its last offset. The rules it follows are in README.md next to this file.

const ALL = ["webtransport", "websocket", "sse"];
const BASE_MS = 250; // first backoff ceiling
const CAP_MS = 10000; // last backoff ceiling
const TRY_LATER_MS = 1000; // least wait after close 1013 ("try again later")
const RECENT = 64; // offsets remembered per subscription to drop a redelivered message
const OPEN_TIMEOUT_MS = 5000; // a transport that has not welcomed us by then cannot open (UDP blocked)
const REQUEST_TIMEOUT_MS = 10000;
const MAX_TIMER_MS = 2 ** 31 - 1;
const MIN_TOKEN_LIFE_MS = 5000; // a token closer than this to exp is not used to connect
const CLOSED = { code: "closed", message: "the client was closed" };

/** Full jitter: uniform in [0, min(cap, base * 2^attempt)]. */
export function backoff(attempt, random = Math.random) {
  return Math.floor(random() * Math.min(CAP_MS, BASE_MS * 2 ** Math.min(attempt, 16)));
}

/** The `exp` claim of a JWT in ms since the epoch, read without verifying; null when absent. */
export function tokenExpiry(jwt) {
  try {
    const p = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(p + "=".repeat((4 - (p.length % 4)) % 4))).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** What a publish or a subscription rejects with: the protocol's error object as an Error. */
export class EdgeplexError extends Error {
  constructor(e) {
    super(e.message || e.code);
    this.name = "EdgeplexError";
    this.code = e.code;
    if (e.retry_after_ms != null) this.retry_after_ms = e.retry_after_ms;
  }
}

class Emitter {
  constructor() {
    this._on = {};
  }
  on(event, fn) {
    (this._on[event] ||= []).push(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._on[event] = (this._on[event] || []).filter((f) => f !== fn);
  }
  _emit(event, ...args) {
    for (const fn of this._on[event] || []) {
      // One app handler throwing must not stop delivery to the others or break the client.
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

class Subscription extends Emitter {
  constructor(client, channel, handler, opts) {
    super();
    this.channel = channel;
    this._client = client;
    this._handler = handler;
    this._datagram = opts.delivery === "datagram";
    this.offset = null; // last offset delivered; "-" (SSE): the channel had no history
    this._recent = [];
    this._live = false; // confirmed on some connection: a later one must resume it
  }
  unsubscribe() {
    this._client._unsubscribe(this);
  }
  _deliver(f) {
    if (f.offset != null) {
      // A resume starts after the last offset, so this only drops what a server or proxy
      // delivers twice; offsets are opaque, so equality is all that is compared.
      if (this._recent.includes(f.offset)) return;
      this._recent.push(f.offset);
      if (this._recent.length > RECENT) this._recent.shift();
      this.offset = f.offset;
    }
    try {
      this._handler(f.data, { channel: f.channel, offset: f.offset });
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  }
}

/** Opens a client on the edge at `url` ("https://edge.example.com"). */
export function connect(url, opts = {}) {
  return new Client(url, opts);
}

class Client extends Emitter {
  constructor(url, opts) {
    super();
    const env = opts._env || globalThis; // tests inject fake constructors and timers here
    this._env = {
      WebSocket: env.WebSocket,
      EventSource: env.EventSource,
      WebTransport: env.WebTransport,
      fetch: env.fetch && env.fetch.bind(env),
      setTimeout: (env.setTimeout || setTimeout).bind(env),
      clearTimeout: (env.clearTimeout || clearTimeout).bind(env),
      random: env.random || Math.random,
      now: env.now || Date.now,
    };
    const u = new URL(url);
    const base = u.origin;
    this._url = {
      ws: base.replace(/^http/, "ws") + "/ws",
      wt: base + "/wt",
      sse: base + "/sse",
      publish: base + "/publish",
    };
    this._opts = opts;
    this._transports = (opts.transports || ALL).filter((t) => ALL.includes(t));
    if (!this._transports.length) throw new Error("edgeplex: no known transport in `transports`");
    this._openTimeout = opts.openTimeout ?? OPEN_TIMEOUT_MS;
    this._requestTimeout = opts.requestTimeout ?? REQUEST_TIMEOUT_MS;
    this.transport = null; // set for good once one has opened
    this.state = "connecting";
    this._subs = new Map();
    this._pending = new Map(); // id → request sent, awaiting its reply
    this._waiting = []; // requests made while no connection is open
    this._id = 0;
    this._attempt = 0;
    this._conn = null;
    this._token = null;
    this._timers = {};
    this._open(0);
  }

  subscribe(channel, handler, opts = {}) {
    if (this._subs.has(channel)) throw new Error(`edgeplex: already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, handler, opts);
    this._subs.set(channel, sub);
    if (this.state === "open") this._join(sub);
    return sub;
  }

  publish(channel, data) {
    if (this.transport === "sse") return this._post(channel, data);
    if (this.transport) return this._request({ op: "publish", channel, data });
    return this._whenOpen().then(() => this.publish(channel, data));
  }

  _whenOpen() {
    return new Promise((send, reject) => {
      const w = { send, fail: (e) => reject(new EdgeplexError(e)) };
      if (this.state === "closed") w.fail(CLOSED);
      else this._waiting.push(w);
    });
  }

  close() {
    this._setState("closed");
    for (const t of Object.values(this._timers)) this._env.clearTimeout(t);
    this._drop();
    for (const r of this._waiting) r.fail(CLOSED);
    this._waiting = [];
  }

  _setState(s) {
    if (this.state === s || this.state === "closed") return;
    this.state = s;
    this._emit("state", s);
  }

  _timer(name, ms, fn) {
    this._env.clearTimeout(this._timers[name]);
    this._timers[name] = this._env.setTimeout(() => {
      delete this._timers[name];
      fn();
    }, ms);
  }

  // --- connecting

  /** Tries transport `i` of the list (or the kept one) with a fresh token. */
  async _open(i) {
    if (this.state === "closed") return;
    const name = this.transport || this._transports[i];
    let token;
    try {
      token = await this._freshToken();
    } catch {
      return this._failed(i, 0);
    }
    if (this.state === "closed") return;
    const conn = { name, opened: false, dead: false };
    this._conn = conn;
    const h = {
      use: (driver) => (conn.driver = driver),
      frame: (f) => !conn.dead && this._frame(conn, f),
      closed: (code) => {
        if (conn.dead) return;
        conn.dead = true;
        if (conn.opened) this._dropped(code);
        else this._failed(i, code);
      },
    };
    this._timer("open", this._openTimeout, () => {
      if (!conn.opened && !conn.dead) {
        conn.driver?.close();
        h.closed(0);
      }
    });
    try {
      await OPEN[name](this, token, h);
      if (conn.dead) conn.driver?.close();
    } catch {
      h.closed(0);
    }
  }

  /** A transport did not open: the next one at once, or (after a whole round) a backoff. */
  _failed(i, code) {
    this._env.clearTimeout(this._timers.open);
    if (!this.transport && i + 1 < this._transports.length) return this._open(i + 1);
    if (this.transport) this._setState("reconnecting"); // an SSE reopen that failed
    this._retry(code);
  }

  _retry(code) {
    if (this.state === "closed") return;
    let ms = backoff(this._attempt++, this._env.random);
    if (code === 1013) ms = Math.max(ms, TRY_LATER_MS);
    if (code === 4001) {
      ms = 0; // token expired: a new one fixes it at once
      this._token = null;
    }
    this._timer("retry", ms, () => this._open(0));
  }

  /** The open connection went away: fail what waits on it, then reconnect on the same transport. */
  _dropped(code) {
    this._drop();
    this._setState("reconnecting");
    this._retry(code);
  }

  _drop() {
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      conn.dead = true;
      conn.driver?.close();
    }
    this._env.clearTimeout(this._timers.refresh);
    for (const [, r] of this._pending) {
      r.fail({
        code: "disconnected",
        message: "the connection dropped before the reply; the request may have been applied",
      });
    }
    this._pending.clear();
  }

  _welcomed(conn) {
    conn.opened = true;
    this._env.clearTimeout(this._timers.open);
    this.transport = conn.name;
    this._attempt = 0;
    this.session = conn.session;
    this._setState("open");
    if (conn.name !== "sse") for (const sub of this._subs.values()) this._join(sub);
    else for (const sub of this._subs.values()) this._confirm(sub);
    const waiting = this._waiting;
    this._waiting = [];
    for (const r of waiting) r.send();
    this._scheduleRefresh();
  }

  // --- frames

  _frame(conn, f) {
    if (f.op === "welcome") {
      conn.session = f.session;
      return this._welcomed(conn);
    }
    if (f.op === "message") return this._subs.get(f.channel)?._deliver(f);
    if (f.op === "gap") return this._subs.get(f.channel)?._emit("gap");
    if (f.op === "error") {
      // A channel the edge took away (rules reloaded, narrower token).
      const sub = f.channel != null && this._subs.get(f.channel);
      if (sub) {
        this._subs.delete(f.channel);
        return sub._emit("error", f.error);
      }
      // SSE's last event when the token expired: reconnect with a new one.
      if (f.channel == null) return this._conn === conn && this._dropped(4001);
      return;
    }
    if (f.id != null) {
      const r = this._pending.get(f.id);
      if (!r) return;
      this._pending.delete(f.id);
      this._env.clearTimeout(r.timer);
      if (f.error) r.fail(f.error);
      else r.resolve(f);
    }
  }

  /** Sends `msg` with a fresh id once a connection is open; settles on its reply. */
  _request(msg) {
    return new Promise((resolve, reject) => {
      const r = {
        resolve,
        fail: (e) => {
          this._env.clearTimeout(r.timer);
          this._waiting = this._waiting.filter((w) => w !== r);
          reject(new EdgeplexError(e));
        },
        send: () => {
          const id = ++this._id;
          this._pending.set(id, r);
          this._conn.driver.send({ id, ...msg });
        },
      };
      if (this.state === "closed") return r.fail(CLOSED);
      r.timer = this._env.setTimeout(() => {
        for (const [id, p] of this._pending) if (p === r) this._pending.delete(id);
        r.fail({ code: "timeout", message: `no reply within ${this._requestTimeout} ms` });
      }, this._requestTimeout);
      if (this.state === "open" && this._conn?.driver) r.send();
      else this._waiting.push(r);
    });
  }

  // --- subscriptions

  /** (Re)subscribes on the open WebSocket or WebTransport connection, from the last offset. */
  _join(sub) {
    if (this.transport === "sse") return this._sseChanged();
    const msg = { op: "subscribe", channel: sub.channel };
    // Datagrams are latest-value feeds: lossy by design, so they restart live.
    if (sub._datagram && this.transport === "webtransport") msg.delivery = "datagram";
    else if (sub.offset != null && sub.offset !== "-") msg.since = sub.offset;
    // Confirmed before but nothing delivered yet: there is no position to resume from.
    const blind = sub._live && msg.since == null;
    this._request(msg).then(
      () => {
        this._confirm(sub);
        if (blind) sub._emit("gap");
      },
      (e) => {
        if (this._subs.get(sub.channel) !== sub || e.code === "disconnected") return;
        if (e.retry_after_ms != null || e.code === "timeout") {
          return this._timer("join:" + sub.channel, e.retry_after_ms ?? 0, () => {
            if (this.state === "open" && this._subs.get(sub.channel) === sub) this._join(sub);
          });
        }
        this._subs.delete(sub.channel);
        sub._emit("error", e);
      },
    );
  }

  _confirm(sub) {
    sub._live = true;
    sub._emit("subscribed");
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return;
    this._subs.delete(sub.channel);
    if (this.transport === "sse") return this._sseChanged();
    if (this.state === "open") this._request({ op: "unsubscribe", channel: sub.channel }).catch(() => {});
  }

  // --- SSE

  /** One EventSource carries every channel: a change of the set reopens it with the position. */
  _sseChanged() {
    if (this._sseQueued || this.state !== "open") return;
    this._sseQueued = true;
    queueMicrotask(() => {
      this._sseQueued = false;
      if (this.state !== "open") return;
      const conn = this._conn;
      if (conn) conn.dead = true;
      conn?.driver?.close();
      this._conn = null;
      this._open(0);
    });
  }

  /** `?since=` for the channels in `order`: each one's offset, `-` for no history, empty: new. */
  _ssePosition(order) {
    const p = order.map((c) => this._subs.get(c)?.offset ?? "");
    return p.some((x) => x !== "") ? p.join(",") : null;
  }

  async _post(channel, data) {
    if (this.state !== "open") await this._whenOpen();
    // A header, not ?token=: proxies log URLs.
    const token = await this._freshToken().catch(() => null);
    const headers = { "content-type": "application/json" };
    if (token) headers.authorization = "Bearer " + token;
    let res;
    try {
      res = await this._env.fetch(this._url.publish, {
        method: "POST",
        headers,
        body: JSON.stringify({ channel, data }),
      });
    } catch (e) {
      throw new EdgeplexError({ code: "disconnected", message: String(e) });
    }
    let body;
    try {
      body = await res.json();
    } catch {
      body = { error: { code: "internal", message: `HTTP ${res.status}` } };
    }
    if (body.error) throw new EdgeplexError(body.error);
    return body;
  }

  // --- tokens

  /** The token to connect with: the held one while it has time left, else a new one. */
  async _freshToken() {
    if (!this._opts.token) return null;
    const exp = this._token && tokenExpiry(this._token);
    if (!this._token || (exp != null && exp - this._env.now() < MIN_TOKEN_LIFE_MS)) {
      this._token = await this._opts.token();
    }
    return this._token;
  }

  _scheduleRefresh() {
    const exp = this._token && tokenExpiry(this._token);
    if (exp == null) return;
    // Replaced with a quarter of its life left (at most 30 s), so a slow token() still lands.
    const left = exp - this._env.now();
    const due = Math.max(0, left - Math.min(30000, left / 4));
    // setTimeout fires at once past 2^31-1 ms: wait in steps.
    if (due > MAX_TIMER_MS) return this._timer("refresh", MAX_TIMER_MS, () => this._scheduleRefresh());
    this._timer("refresh", due, async () => {
      const conn = this._conn;
      let token;
      try {
        token = await this._opts.token();
      } catch {
        return; // the edge closes the session at expiry; the reconnect asks again
      }
      this._token = token;
      if (this._conn !== conn || this.state !== "open") return;
      if (this.transport === "sse") return this._sseChanged(); // reopen with ?token= and position
      this._request({ op: "auth", token }).then(
        () => this._scheduleRefresh(),
        (e) => {
          // An edge without identity answers unknown_op: nothing to replace there.
          if (e.code === "unauthorized" && this._conn === conn) this._dropped(4001);
        },
      );
    });
  }
}

// --- transports
// Each opens one connection, hands `h.use` its {send, close}, reports frames and its end to `h`,
// and throws when it cannot start. A connection counts as open at the welcome.

const tokenQuery = (token, sep = "?") => (token ? sep + "token=" + encodeURIComponent(token) : "");

const OPEN = {
  websocket(c, token, h) {
    const ws = new c._env.WebSocket(c._url.ws + tokenQuery(token));
    ws.onmessage = (e) => {
      let f;
      try {
        f = JSON.parse(e.data);
      } catch {
        return;
      }
      h.frame(f);
    };
    ws.onclose = (e) => h.closed(e.code);
    return h.use({
      send: (m) => ws.readyState === 1 && ws.send(JSON.stringify(m)),
      close: () => {
        ws.onclose = ws.onmessage = null;
        try {
          ws.close(1000);
        } catch {}
      },
    });
  },

  async webtransport(c, token, h) {
    const WT = c._env.WebTransport;
    if (!WT) throw new Error("no WebTransport in this browser");
    const o = {};
    const hashes = c._opts.serverCertificateHashes;
    if (hashes) o.serverCertificateHashes = hashes.map(certHash);
    const wt = new WT(c._url.wt + tokenQuery(token), o);
    let closing = false;
    wt.closed.then(
      (i) => closing || h.closed(i?.closeCode ?? 1006),
      () => closing || h.closed(1006),
    );
    const close = () => {
      closing = true;
      try {
        wt.close({ closeCode: 1000, reason: "" });
      } catch {}
    };
    try {
      await wt.ready;
      const stream = await wt.createBidirectionalStream();
      const w = stream.writable.getWriter();
      const enc = new TextEncoder();
      h.use({ send: (m) => w.write(enc.encode(JSON.stringify(m) + "\n")).catch(() => {}), close });
      readLines(stream.readable, h);
      readDatagrams(wt.datagrams.readable, h);
    } catch (e) {
      close();
      throw e;
    }
  },

  sse(c, token, h) {
    const order = [...c._subs.keys()];
    // SSE needs a channel to open a stream; with none, publishing (POST) is all there is.
    if (!order.length) {
      h.use({ send() {}, close() {} });
      return queueMicrotask(() => h.frame({ op: "welcome" }));
    }
    let q = order.map((ch) => "channel=" + encodeURIComponent(ch)).join("&");
    const since = c._ssePosition(order);
    if (since != null) q += "&since=" + encodeURIComponent(since);
    const es = new c._env.EventSource(c._url.sse + "?" + q + tokenQuery(token, "&"));
    es.onmessage = (e) => {
      let f;
      try {
        f = JSON.parse(e.data);
      } catch {
        return;
      }
      // The welcome's id is the stream's starting position, one entry per channel in URL
      // order: it lets a channel that gets nothing before a cut still resume exactly.
      if (f.op === "welcome" && e.lastEventId) {
        e.lastEventId.split(",").forEach((p, i) => {
          const sub = c._subs.get(order[i]);
          if (sub && sub.offset == null) sub.offset = p;
        });
      }
      h.frame(f);
    };
    // EventSource would retry by itself without our backoff or a fresh token: take over.
    es.onerror = () => {
      es.close();
      h.closed(0);
    };
    h.use({ send() {}, close: () => es.close() });
  },
};

function certHash(x) {
  if (typeof x.value !== "string") return x;
  const hex = x.value.replace(/[^0-9a-f]/gi, "");
  return { algorithm: x.algorithm || "sha-256", value: Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16)) };
}

async function readLines(readable, h) {
  const reader = readable.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        try {
          h.frame(JSON.parse(line));
        } catch {}
      }
    }
  } catch {}
  // The session's close code (1013, 4001…) comes with `closed`; this is the fallback.
  setTimeout(() => h.closed(1006), 1000);
}

async function readDatagrams(readable, h) {
  const reader = readable.getReader();
  const dec = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      try {
        h.frame(JSON.parse(dec.decode(value)));
      } catch {}
    }
  } catch {}
}
