// Node ws echo with permessage-deflate for benches/ws_deflate.sh: node server.js PORT
// (zlib level 1, threshold 64 B, context takeover: the settings Luna's server runs with).
const { WebSocketServer } = require("ws");
const wss = new WebSocketServer({
  host: "127.0.0.1", port: Number(process.argv[2]), maxPayload: 64 << 20,
  perMessageDeflate: { zlibDeflateOptions: { level: 1 }, threshold: 64, concurrencyLimit: 10 },
});
wss.on("connection", (ws) => ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary })));
wss.on("listening", () => console.log("ready"));
