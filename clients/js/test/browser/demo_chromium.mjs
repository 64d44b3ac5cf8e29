// The demo page in headless Chromium (Debian's `chromium`, driven by playwright-core): two
// pages, ann and bob, chat in the room and get a channel broadcast; bob's page reloads while
// ann keeps writing, and resumes without losing or repeating a message.
//
// Run: node --test test/browser/demo_chromium.mjs (CHROMIUM_PATH overrides /usr/bin/chromium;
// the relay binary as for the other tests, see test/support/relay.mjs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';

import { startRelay } from '../support/relay.mjs';
import { startDemoServer } from '../../demo/server.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const WAIT_MS = 30_000;

test('two pages chat; a reloaded page resumes without loss', async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`);
  const { chromium } = await import('playwright-core');
  const relay = await startRelay(t);
  const demo = await startDemoServer({ ws: relay.wsUrl, control: relay.controlUrl });
  t.after(demo.close);
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  t.after(() => browser.close());

  // Separate contexts: each page its own localStorage, as on two devices.
  const open = async (/** @type {string} */ user) => {
    const page = await (await browser.newContext()).newPage();
    page.on('pageerror', (e) => console.error(`${user}: ${e}`));
    await page.goto(`${demo.url}/demo/?user=${user}`);
    await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
    return page;
  };
  const ann = await open('ann');
  const bob = await open('bob');

  const say = async (/** @type {import('playwright-core').Page} */ page, /** @type {string} */ text) => {
    await page.fill('#room-input', text);
    await page.press('#room-input', 'Enter');
  };
  const roomLog = async (/** @type {import('playwright-core').Page} */ page) =>
    page.$$eval('#room-log li', (items) =>
      items.map((li) => ({ seq: Number(li.dataset.seq), sender: li.dataset.sender, text: li.childNodes[1].textContent })),
    );
  const waitFor = (/** @type {import('playwright-core').Page} */ page, /** @type {string} */ selector, /** @type {number} */ n) =>
    page.waitForFunction(([s, count]) => document.querySelectorAll(s).length >= count, [selector, n], { timeout: WAIT_MS });

  await say(ann, 'hi bob');
  await waitFor(bob, '#room-log li', 1);
  await say(bob, 'hi ann');
  await waitFor(ann, '#room-log li', 2);

  // The channel: ann broadcasts through the app server, both pages get it.
  await ann.fill('#channel-input', 'coffee at 3');
  await ann.press('#channel-input', 'Enter');
  for (const page of [ann, bob]) await waitFor(page, '#channel-log li', 1);
  assert.equal(await bob.textContent('#channel-log li'), 'anncoffee at 3#1');

  // bob reloads while ann keeps writing: what ann sent while the page was away arrives on
  // the resume, exactly once.
  const reloaded = bob.reload();
  for (let i = 1; i <= 10; i++) await say(ann, `while away ${i}`);
  await reloaded;
  await bob.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  for (let i = 11; i <= 15; i++) await say(ann, `after ${i}`);
  for (const page of [ann, bob]) await waitFor(page, '#room-log li', 17);

  const expected = await roomLog(ann);
  assert.equal(expected.length, 17);
  assert.deepEqual(await roomLog(bob), expected);
  assert.deepEqual(expected.map((m) => m.seq), Array.from({ length: 17 }, (_, i) => i + 1));
  // The reloaded page got only what it missed: a resume, not a replay of the room's history.
  const received = await bob.evaluate(() => /** @type {any} */ (window).pabal.received);
  assert.ok(received.length >= 5 && received.length <= 15, `received ${received}`);
  assert.deepEqual(received, expected.slice(17 - received.length).map((m) => m.text));
});
