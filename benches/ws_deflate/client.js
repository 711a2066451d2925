// Load generator for benches/ws_deflate.sh: CONNS connections offering permessage-deflate, one
// text message of SIZE bytes (game-state JSON, one of 64) in flight on each; after
// WARMUP s counts echoes for DURATION s and prints "RESULT msgs_per_s=N ratio=R", R = bytes on
// the wire / message bytes (what compression saved), or exits 1 when an echo differs or
// deflate was not negotiated.
//   node client.js PORT SIZE CONNS WARMUP DURATION
const WebSocket = require("ws");
const [port, size, conns, warmup, duration] = process.argv.slice(2).map(Number);
// 64 different messages, made before the run (the generator must not be what is measured).
const messages = [];
for (let n = 0; n < 64; n++) {
  let s = "[";
  for (let i = 0; s.length < size; i++) {
    s += JSON.stringify({ id: i, name: "player" + ((n + i) % 50), pos: [n % 97, i * 1.5, 3], hp: (n * 7 + i) % 100 }) + ",";
  }
  messages.push(s.slice(0, size));
}
const message = (n) => messages[n % messages.length];
let counting = false, count = 0, wireBytes = 0, messageBytes = 0;
const sockets = [];
for (let c = 0; c < conns; c++) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`, {
    perMessageDeflate: { zlibDeflateOptions: { level: 1 }, threshold: 64 }, maxPayload: 64 << 20,
  });
  let n = c * 1000, sent;
  const next = () => { sent = message(n++); ws.send(sent); };
  ws.on("open", () => {
    if (!ws.extensions.includes("permessage-deflate")) { console.error("deflate not negotiated"); process.exit(1); }
    next();
  });
  ws.on("message", (data) => {
    if (data.toString() !== sent) { console.error("echo differs"); process.exit(1); }
    if (counting) { count++; messageBytes += sent.length; }
    next();
  });
  ws.on("error", (e) => { console.error(e.message); process.exit(1); });
  sockets.push(ws);
}
const received = () => sockets.reduce((t, ws) => t + (ws._socket ? ws._socket.bytesRead : 0), 0);
setTimeout(() => {
  counting = true;
  wireBytes = -received();
  setTimeout(() => {
    counting = false;
    wireBytes += received();
    console.log(`RESULT msgs_per_s=${Math.round(count / duration)} ratio=${(wireBytes / messageBytes).toFixed(3)}`);
    process.exit(0);
  }, duration * 1000);
}, warmup * 1000);
