// The demo chat page: one user (?user=NAME) in the room "hiking-club" and the channel the demo
// server names. Received messages and the client's cursors are kept in localStorage, so a
// reload resumes where the page left off: the relay sends exactly what was missed.

import { PabalClient } from '../src/index.js';

const ROOM = 'hiking-club';
const user = new URLSearchParams(location.search).get('user') || 'ann';
const storeKey = `pabal-demo:${user}`;
const config = await (await fetch('/config.json')).json();

/** @type {{ snapshot?: import('../index').SessionSnapshot, messages: { room: string, channel: boolean, seq: number, sender: string, text: string }[] }} */
const saved = JSON.parse(localStorage.getItem(storeKey) ?? '{"messages":[]}');
const messages = saved.messages;
const held = new Set(messages.map((m) => `${m.channel}:${m.room}:${m.seq}`));

const client = new PabalClient({ url: config.ws, token: user, snapshot: saved.snapshot });
const save = () => localStorage.setItem(storeKey, JSON.stringify({ snapshot: client.snapshot(), messages }));

document.getElementById('user').textContent = user;
document.getElementById('room-name').textContent = ROOM;
document.getElementById('channel-name').textContent = config.channel;

/** @param {{ room: string, channel: boolean, seq: number, sender: string, text: string }} m */
function show(m) {
  const li = document.createElement('li');
  li.dataset.seq = String(m.seq);
  li.dataset.sender = m.sender;
  const who = Object.assign(document.createElement('span'), { className: 'who', textContent: m.sender });
  const seq = Object.assign(document.createElement('span'), { className: 'seq', textContent: `#${m.seq}` });
  li.append(who, m.text, seq);
  const log = document.getElementById(m.channel ? 'channel-log' : 'room-log');
  log.append(li);
  log.scrollTop = log.scrollHeight;
}

/** Adds a message once (a resumed stream never repeats one; an own message may come back). */
function add(m) {
  const key = `${m.channel}:${m.room}:${m.seq}`;
  if (held.has(key)) return;
  held.add(key);
  messages.push(m);
  show(m);
}

for (const m of messages) show(m);

/** Texts received on this page load, for tests: a resume brings only what was missed. */
const received = [];
client.on('message', (e) => {
  if (e.seq !== null) {
    received.push(new TextDecoder().decode(e.payload));
    add({ room: e.room.name, channel: e.room.channel, seq: e.seq, sender: e.sender, text: new TextDecoder().decode(e.payload) });
  }
  save();
});
client.on('gap', save);
// Messages queued while offline take their msg_ids when sent: keep the counter on unload too.
addEventListener('pagehide', save);
client.on('room', (e) => {
  save();
  if (e.lost) setStatus(`${e.room.name} restarted: messages after #${e.lost.after} are gone`);
});
client.on('state', (s) => setStatus(s.state === 'open' ? 'connected' : s.state));

function setStatus(text) {
  document.getElementById('status').textContent = text;
}

/**
 * Calls `send(text)` with what is typed into a form's input.
 * @param {string} form @param {string} input @param {(text: string) => Promise<void>} send
 */
function onSubmit(form, input, send) {
  document.getElementById(form).addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const field = /** @type {HTMLInputElement} */ (document.getElementById(input));
    const text = field.value;
    field.value = '';
    if (text) await send(text);
  });
}

onSubmit('room-form', 'room-input', async (text) => {
  const sent = client.publish(ROOM, text);
  save(); // the device's msg_id counter moved (PROTOCOL.md §12): a reload must not reuse an id
  const seq = await sent;
  add({ room: ROOM, channel: false, seq: /** @type {number} */ (seq), sender: user, text });
  save();
});

// Channels are written by the app server: the demo server broadcasts for us.
onSubmit('channel-form', 'channel-input', async (text) => {
  await fetch('/api/announce', { method: 'POST', body: JSON.stringify({ user, text }) });
});

client.connect();
// Join the room (on a relay without auth, clients may) and have the app server subscribe us
// to the channel; both are no-ops when already done.
await client.join(ROOM);
await fetch('/api/subscribe', { method: 'POST', body: JSON.stringify({ user }) });
document.body.dataset.ready = 'true';

// For tests and the curious: the client and what the page holds.
Object.assign(window, { pabal: { client, messages, received } });
