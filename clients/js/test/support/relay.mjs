// A real pabal relay for the JS tests: the relay binary (PABAL_RELAY_BIN, or the workspace's
// target/debug/relay) started on ephemeral ports with the WebSocket listener on, its
// addresses read from its log, stopped when the test ends; its control API; and a TCP proxy
// in front of its WebSocket port that can cut connections and inject bytes.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const WORKSPACE = fileURLToPath(new URL('../../../../', import.meta.url));

/** The relay binary: $PABAL_RELAY_BIN, else the workspace's debug build. */
export function relayBinary() {
  const bin = process.env.PABAL_RELAY_BIN ?? join(WORKSPACE, 'target', 'debug', 'relay');
  if (!existsSync(bin)) {
    throw new Error(`no relay binary at ${bin}: build it (cargo build -p pabal-relay --bin relay) or set PABAL_RELAY_BIN`);
  }
  return bin;
}

/** The I/O backend the relay runs on: $PABAL_IO_BACKEND (epoll, io_uring), epoll by default. */
export const BACKEND = process.env.PABAL_IO_BACKEND ?? 'epoll';

/**
 * Starts a relay; `toml` is appended to the configuration (sections of its own), `limits`
 * to its `[limits]` (where the publish rate is lifted, as pabal-testkit's test relay does).
 * @param {import('node:test').TestContext | null} t stops the relay when the test ends
 * @param {{ toml?: string, limits?: string }} [extra]
 */
export async function startRelay(t, { toml = '', limits = '' } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'pabal-js-'));
  const config = join(dir, 'relay.toml');
  writeFileSync(
    config,
    `listen = "127.0.0.1:0"\nworkers = 1\npin_workers = false\nio_backend = "${BACKEND}"\n` +
      `[control]\nlisten = "127.0.0.1:0"\n[log]\nlevel = "info"\nformat = "text"\n` +
      `[websocket]\nlisten = "127.0.0.1:0"\nallowed_origins = ["*"]\n` +
      `[limits]\npublish_rate = 1e9\npublish_burst = 1e9\n${limits}\n${toml}`,
  );
  const child = spawn(relayBinary(), ['--config', config], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: withoutLogOverrides(process.env),
  });
  /** @type {string[]} */
  const log = [];
  const waiting = [];
  createInterface({ input: child.stderr }).on('line', (line) => {
    log.push(line);
    for (const w of [...waiting]) if (line.includes(w.needle)) w.resolve(line);
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const waitLog = (/** @type {string} */ needle) =>
    new Promise((resolve, reject) => {
      const hit = log.find((l) => l.includes(needle));
      if (hit) return resolve(hit);
      const timer = setTimeout(() => reject(new Error(`no log line with ${needle}; log:\n${log.join('\n')}`)), 20_000);
      waiting.push({ needle, resolve: (/** @type {string} */ l) => (clearTimeout(timer), resolve(l)) });
      exited.then(() => setTimeout(() => reject(new Error(`relay exited; log:\n${log.join('\n')}`)), 100));
    });
  const field = (/** @type {string} */ line, /** @type {string} */ key) => {
    const word = line.split(/\s+/).find((w) => w.startsWith(`${key}=`));
    if (!word) throw new Error(`no ${key}= in ${line}`);
    return word.slice(key.length + 1);
  };
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  t?.after(stop);
  const ws = field(await waitLog('WebSocket listening'), 'ws');
  const control = field(await waitLog('control API listening'), 'addr');
  return {
    wsUrl: `ws://${ws}`,
    wsAddr: ws,
    controlUrl: `http://${control}`,
    log,
    waitLog,
    stop,
    /**
     * Calls the control API; returns the parsed JSON answer.
     * @param {string} method
     * @param {string} path
     * @param {unknown} [body]
     */
    async api(method, path, body) {
      const res = await fetch(`http://${control}${path}`, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
      return text ? JSON.parse(text) : null;
    },
  };
}

/**
 * A TCP proxy in front of `target` ("host:port"). It forwards the relay's WebSocket stream a
 * whole WebSocket frame at a time, so `inject` can slip a frame of its own between two of
 * the relay's; `cut` drops every connection (both sides) at once; `mute` stops the relay →
 * client direction of the open connections (what the relay sends is dropped) while the
 * client's frames still reach the relay.
 * @param {import('node:test').TestContext} t
 * @param {string} target
 */
export async function startProxy(t, target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  /** @type {Set<{ client: net.Socket, upstream: net.Socket, muted: boolean }>} */
  const pairs = new Set();
  /** Times (Date.now()) at which clients connected. */
  const connectTimes = [];
  const server = net.createServer((client) => {
    connectTimes.push(Date.now());
    const upstream = net.connect(port, host);
    const pair = { client, upstream, muted: false };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.on('data', (d) => upstream.write(d));
    let pending = Buffer.alloc(0);
    let upgraded = false;
    upstream.on('data', (d) => {
      if (pair.muted) return;
      pending = Buffer.concat([pending, d]);
      if (!upgraded) {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return;
        client.write(pending.subarray(0, end + 4));
        pending = pending.subarray(end + 4);
        upgraded = true;
      }
      for (;;) {
        const len = wsFrameLength(pending);
        if (len === null || pending.length < len) break;
        client.write(pending.subarray(0, len));
        pending = pending.subarray(len);
      }
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  const address = /** @type {net.AddressInfo} */ (server.address());
  const proxy = {
    url: `ws://127.0.0.1:${address.port}`,
    connectTimes,
    /** Open connections. */
    open: () => pairs.size,
    /** Drops every connection, as a dead radio link would. */
    cut() {
      for (const p of [...pairs]) {
        p.client.destroy();
        p.upstream.destroy();
      }
      pairs.clear();
    },
    /** From now on, drops what the relay sends on the open connections (new ones are not muted). */
    mute() {
      for (const p of pairs) p.muted = true;
    },
    /**
     * Sends `payload` to every client as one binary WebSocket message of the relay's.
     * @param {Uint8Array} payload
     */
    inject(payload) {
      if (payload.length > 125) throw new RangeError('inject short messages');
      const frame = Buffer.concat([Buffer.from([0x82, payload.length]), Buffer.from(payload)]);
      for (const p of pairs) p.client.write(frame);
    },
    close: () => new Promise((resolve) => (proxy.cut(), server.close(() => resolve(undefined)))),
  };
  t.after(proxy.close);
  return proxy;
}

/**
 * The length of the unmasked WebSocket frame at the start of `b` (header included), or null
 * while its header is incomplete.
 * @param {Buffer} b
 */
function wsFrameLength(b) {
  if (b.length < 2) return null;
  const short = b[1] & 0x7f;
  const mask = b[1] & 0x80 ? 4 : 0;
  if (short < 126) return 2 + mask + short;
  if (short === 126) return b.length < 4 ? null : 4 + mask + b.readUInt16BE(2);
  return b.length < 10 ? null : 10 + mask + Number(b.readBigUInt64BE(2));
}

/**
 * The environment without what would change the relay's logging (its addresses are read
 * from its log).
 * @param {NodeJS.ProcessEnv} env
 */
function withoutLogOverrides(env) {
  const out = { ...env };
  for (const k of ['RUST_LOG', 'JOURNAL_STREAM', 'NOTIFY_SOCKET', 'WATCHDOG_PID']) delete out[k];
  return out;
}
