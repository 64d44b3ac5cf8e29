// The demo chat's server: serves the page (demo/) and the client (src/) as static files, tells
// the page where the relay's WebSocket listener is (/config.json), and stands in for the app
// server on two calls the page makes (/api/...): subscribing a user to the demo channel and
// broadcasting into it, both through the relay's control API.
//
// Usage: node demo/server.mjs --ws ws://127.0.0.1:7702 --control http://127.0.0.1:7701 [--port 8080]
// (a relay with `[websocket] listen = "127.0.0.1:7702"`; `relay` alone has its control API on
// 127.0.0.1:7701). Then open http://127.0.0.1:8080/demo/?user=ann and ?user=bob.

import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { extname, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css' };
/** Only these folders are served. */
const SERVED = ['demo/', 'src/'];
export const CHANNEL = 'coffee-news';
const MAX_BODY = 16 * 1024;

/**
 * Starts the demo server; resolves with its address once it listens.
 * @param {{ ws: string, control: string, port?: number }} options
 */
export function startDemoServer({ ws, control, port = 0 }) {
  const server = createServer(async (req, res) => {
    try {
      const url = new URL(req.url ?? '/', 'http://demo');
      if (req.method === 'GET' && url.pathname === '/config.json') {
        return send(res, 200, 'application/json', JSON.stringify({ ws, channel: CHANNEL }));
      }
      if (req.method === 'POST' && url.pathname.startsWith('/api/')) {
        const body = JSON.parse(await readBody(req));
        const user = String(body.user ?? '');
        if (!user) return send(res, 400, 'text/plain', 'user missing');
        const call =
          url.pathname === '/api/subscribe'
            ? ['subscribers', { users: [user] }]
            : url.pathname === '/api/announce'
              ? ['messages', { sender: user, text: String(body.text ?? '') }]
              : null;
        if (!call) return send(res, 404, 'text/plain', 'no such call');
        const answer = await fetch(`${control}/v1/channels/${CHANNEL}/${call[0]}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(call[1]),
        });
        return send(res, answer.status, 'application/json', await answer.text());
      }
      if (req.method !== 'GET') return send(res, 405, 'text/plain', 'GET only');
      if (url.pathname === '/') {
        res.writeHead(302, { location: `/demo/${url.search}` });
        return res.end();
      }
      const path = normalize(url.pathname === '/demo/' ? 'demo/index.html' : url.pathname.slice(1));
      if (!SERVED.some((dir) => path.startsWith(dir))) return send(res, 404, 'text/plain', 'not found');
      const file = await readFile(`${ROOT}${path}`).catch(() => null);
      if (!file) return send(res, 404, 'text/plain', 'not found');
      return send(res, 200, TYPES[/** @type {keyof TYPES} */ (extname(path))] ?? 'application/octet-stream', file);
    } catch (e) {
      return send(res, 500, 'text/plain', String(e));
    }
  });
  return new Promise((resolve) =>
    server.listen(port, '127.0.0.1', () => {
      const addr = /** @type {import('node:net').AddressInfo} */ (server.address());
      resolve({ url: `http://127.0.0.1:${addr.port}`, close: () => new Promise((r) => server.close(r)) });
    }),
  );
}

/**
 * @param {import('node:http').ServerResponse} res
 * @param {number} status
 * @param {string} type
 * @param {string | Buffer} body
 */
function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

/** @param {import('node:http').IncomingMessage} req */
async function readBody(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > MAX_BODY) throw new Error('body too large');
  }
  return body;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const arg = (/** @type {string} */ name, /** @type {string} */ fallback) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : fallback;
  };
  const { url } = await startDemoServer({
    ws: arg('ws', 'ws://127.0.0.1:7702'),
    control: arg('control', 'http://127.0.0.1:7701'),
    port: Number(arg('port', '8080')),
  });
  console.log(`demo chat on ${url}/demo/?user=ann and ${url}/demo/?user=bob`);
}
