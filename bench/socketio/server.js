'use strict';
// The Socket.IO side of `tether bench fanout --steady --vs socketio`: one process of a
// Socket.IO 4 cluster whose processes share rooms through `@socket.io/redis-adapter`.
//
//   node server.js PORT REDIS_URL      (or PORT=… REDIS_URL=… node server.js)
//
// WebSocket transport only. Events: `join` (a room name) → socket.join(room), answered with
// `joined` (the room name) once done; `message` ({room, text}) → io.to(room).emit('message',
// the same object) — to every socket in the room on every process, the sender included (it is a
// member of its room, as a Tether publisher is). Prints `socketio-bench ready listen=IP:PORT`
// on stdout once it accepts connections; exits when stdin closes (its parent went away).

const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

function fail(msg) {
  process.stderr.write(`socketio-bench: ${msg}\n`);
  process.exit(2);
}

const port = Number(process.argv[2] ?? process.env.PORT ?? '');
const redisUrl = process.argv[3] ?? process.env.REDIS_URL;
if (!Number.isInteger(port) || port < 0 || port > 65535) fail('usage: node server.js PORT REDIS_URL (PORT 0 = any free port)');
if (!redisUrl) fail('no Redis URL given (second argument or REDIS_URL)');

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  pub.on('error', (e) => process.stderr.write(`socketio-bench: redis (pub): ${e}\n`));
  sub.on('error', (e) => process.stderr.write(`socketio-bench: redis (sub): ${e}\n`));
  await Promise.all([pub.connect(), sub.connect()]);

  const server = http.createServer();
  const io = new Server(server, {
    transports: ['websocket'],
    serveClient: false,
    perMessageDeflate: false,
    adapter: createAdapter(pub, sub),
  });
  io.on('connection', (socket) => {
    socket.on('join', (room) => {
      if (typeof room !== 'string') return;
      socket.join(room);
      socket.emit('joined', room);
    });
    socket.on('message', (msg) => {
      if (!msg || typeof msg.room !== 'string') return;
      io.to(msg.room).emit('message', msg);
    });
  });
  server.listen(port, '127.0.0.1', () => {
    const a = server.address();
    process.stdout.write(`socketio-bench ready listen=${a.address}:${a.port}\n`);
  });
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}

main().catch((e) => fail(`${e && e.stack ? e.stack : e}`));
