// The relay that the usual real-time articles recommend: Node.js `ws` with a Redis pub/sub
// relay. It speaks the part of edgeplex's client protocol the benchmarks use (welcome,
// subscribe, publish, ping, message pushes), so the same load generator drives it.
//
// Usage: node server.js PORT REDIS_URL [CERT_PEM KEY_PEM]
// Kept short on purpose: this is the peer as people deploy it, not a tuned server.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const { WebSocketServer } = require('ws');
const { createClient } = require('redis');

const [port, redisUrl, cert, key] = process.argv.slice(2);

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const channels = new Map(); // channel -> Set of sockets

  const server = cert
    ? https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) })
    : http.createServer();
  const wss = new WebSocketServer({ server });
  wss.on('connection', (ws) => {
    const mine = new Set();
    ws.send('{"op":"welcome","server":"node-ws-redis"}');
    ws.on('message', async (raw) => {
      let m;
      try {
        m = JSON.parse(raw);
      } catch {
        ws.send('{"error":{"code":"bad_request"}}');
        return;
      }
      const reply = JSON.stringify(m.id === undefined ? { ok: true } : { id: m.id, ok: true });
      if (m.op === 'subscribe') {
        let set = channels.get(m.channel);
        if (!set) {
          set = new Set();
          channels.set(m.channel, set);
          await sub.subscribe(m.channel, (message) => {
            // Encode once, send to every local subscriber.
            const frame = `{"op":"message","channel":${JSON.stringify(m.channel)},"data":${message}}`;
            for (const s of channels.get(m.channel) || []) s.send(frame);
          });
        }
        set.add(ws);
        mine.add(m.channel);
        ws.send(reply);
      } else if (m.op === 'publish') {
        await pub.publish(m.channel, JSON.stringify(m.data));
        ws.send(reply);
      } else {
        ws.send(reply);
      }
    });
    ws.on('close', () => {
      for (const c of mine) {
        const set = channels.get(c);
        if (set) {
          set.delete(ws);
          if (set.size === 0) {
            channels.delete(c);
            sub.unsubscribe(c);
          }
        }
      }
    });
  });
  server.listen(Number(port), '127.0.0.1', () => console.log(`listening ${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
