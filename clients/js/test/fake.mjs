// Fake browser for the unit tests: WebSocket, EventSource, WebTransport, fetch and a manual
// clock, injected through the client's `_env` option so no test touches the network or waits.

export const flush = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

export function fakeEnv({ webtransport = false, random = () => 0.5 } = {}) {
  const env = { t: 0, timers: [], sockets: [], sources: [], wts: [], posts: [], random };
  env.now = () => env.t;
  env.setTimeout = (fn, ms) => {
    // As in browsers and Node: a delay past 2^31-1 ms fires at once.
    if (ms > 2 ** 31 - 1) ms = 1;
    const timer = { fn, at: env.t + (ms || 0) };
    env.timers.push(timer);
    return timer;
  };
  env.clearTimeout = (timer) => {
    env.timers = env.timers.filter((t) => t !== timer);
  };
  /** Moves the clock `ms` forward, running every timer due on the way, in order. */
  env.advance = async (ms) => {
    const end = env.t + ms;
    for (;;) {
      await flush();
      const due = env.timers.filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      env.clearTimeout(due);
      env.t = due.at;
      due.fn();
    }
    env.t = end;
    await flush();
  };

  env.WebSocket = class {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      env.sockets.push(this);
    }
    send(s) {
      this.sent.push(JSON.parse(s));
    }
    close() {
      this.closed = true;
    }
    recv(f) {
      this.onmessage?.({ data: JSON.stringify(f) });
    }
    welcome() {
      this.readyState = 1;
      this.recv({ op: "welcome", session: "s" + env.sockets.length, server: "edgeplex/test" });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
    /** The last request with this op, for replying to it. */
    last(op) {
      return this.sent.filter((m) => m.op === op).at(-1);
    }
  };

  env.EventSource = class {
    constructor(url) {
      this.url = new URL(url);
      env.sources.push(this);
    }
    close() {
      this.closed = true;
    }
    event(f, id = "") {
      this.onmessage?.({ data: JSON.stringify(f), lastEventId: id });
    }
    fail() {
      this.onerror?.({});
    }
  };

  env.fetch = async (url, init) => {
    const post = { url, init, body: JSON.parse(init.body) };
    env.posts.push(post);
    const reply = env.reply || { ok: true };
    return { status: reply.error ? 400 : 200, json: async () => reply };
  };

  if (webtransport) {
    env.WebTransport = class {
      constructor(url, opts) {
        this.url = url;
        this.opts = opts;
        this.sent = [];
        env.wts.push(this);
        this.ready = new Promise((ok, fail) => ((this._ready = ok), (this._refuse = fail)));
        this.closed = new Promise((ok) => (this._closed = ok));
        this.ready.catch(() => {});
        let push;
        this._stream = new ReadableStream({ start: (c) => (push = c) });
        this.push = (f) => push.enqueue(new TextEncoder().encode(JSON.stringify(f) + "\n"));
        let dgram;
        this.datagrams = { readable: new ReadableStream({ start: (c) => (dgram = c) }) };
        this.datagram = (f) => dgram.enqueue(new TextEncoder().encode(JSON.stringify(f)));
      }
      async createBidirectionalStream() {
        const dec = new TextDecoder();
        const writable = new WritableStream({
          write: (chunk) => this.sent.push(JSON.parse(dec.decode(chunk))),
        });
        return { readable: this._stream, writable };
      }
      close() {
        this.closedByClient = true;
        this._closed({ closeCode: 1000 });
      }
      refuse() {
        this._refuse(new Error("WebTransportError: opening handshake failed"));
        this._closed({ closeCode: 0 });
      }
    };
  }
  return env;
}

/** A JWT whose payload is `claims` (unsigned: the client never verifies). */
export function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}
