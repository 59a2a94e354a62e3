// Drives the vqclip page in Debian's headless Chromium against a real `vqclip serve`
// with the tiny fixture models. Started by scripts/browser-test.sh, which passes:
//   VQCLIP_BASE (http://127.0.0.1:PORT), VQCLIP_BIN, VQCLIP_DB (for `vqclip keys`),
//   ARTIFACTS (where screenshots go).
// Every scenario of issue 13; a failed expectation throws and the script exits 1.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const BASE = process.env.VQCLIP_BASE;
const BIN = process.env.VQCLIP_BIN;
const DB = process.env.VQCLIP_DB;
const ARTIFACTS = process.env.ARTIFACTS || 'tests/browser/artifacts';
const TIMEOUT = 60_000;
assert.ok(BASE && BIN && DB, 'VQCLIP_BASE, VQCLIP_BIN and VQCLIP_DB must be set');
mkdirSync(ARTIFACTS, { recursive: true });

let passed = 0;
let failed = 0;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(path, { method = 'GET', body, key } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = 'Bearer ' + key;
  const res = await fetch(BASE + path, { method, headers, body: body && JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

async function waitFor(what, check, timeout = TIMEOUT) {
  const until = Date.now() + timeout;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > until) throw new Error('timed out waiting for ' + what);
    await sleep(100);
  }
}

async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e.stack || e}`);
    await shot('FAILED-' + name.replace(/\W+/g, '-'));
  }
}

const userData = mkdtempSync(join(tmpdir(), 'vqclip-chromium-'));
const context = await chromium.launchPersistentContext(userData, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
  viewport: { width: 1200, height: 900 },
});
const page = context.pages()[0] || (await context.newPage());
page.setDefaultTimeout(TIMEOUT);
const external = [];
page.on('request', (r) => {
  const u = r.url();
  if (!u.startsWith(BASE) && !u.startsWith('blob:') && !u.startsWith('data:')) external.push(u);
});
const consoleErrors = [];
page.on('pageerror', (e) => consoleErrors.push(String(e)));

async function shot(name) {
  try { await page.screenshot({ path: join(ARTIFACTS, name + '.png'), fullPage: true }); } catch (_) { /* closed */ }
}

const tiny = { width: 64, height: 64, cutn: 2, prompts: 'a lighthouse at dusk' };
// Few steps: a CI machine is slow and a debug build slower; the frames still change live.
const FORM_JOB = { steps: 24, save_every: 4 };

async function openForm() {
  await page.goto(BASE + '/#/');
  await page.locator('#view-new').waitFor();
  await page.locator('#f-vqgan option').first().waitFor({ state: 'attached' });
}

async function fillForm({ prompts, width, height, steps, save_every, cutn }) {
  await page.fill('#f-prompts', prompts);
  await page.fill('#f-width', String(width));
  await page.fill('#f-height', String(height));
  await page.fill('#f-steps', String(steps));
  await page.fill('#f-save_every', String(save_every));
  await page.locator('details:has(#f-cutn)').evaluate((d) => { d.open = true; });
  await page.fill('#f-cutn', String(cutn));
}

async function submitForm() {
  await page.click('#submit');
  await page.waitForURL(/#\/jobs\/[0-9a-f-]{36}$/);
  return page.url().split('/').pop();
}

const state = () => page.textContent('#job-state');

// Records what the live view shows, as it changes, in the page itself.
async function watchLiveView() {
  await page.evaluate(() => {
    window.seen = [];
    const note = () => window.seen.push({
      state: document.getElementById('job-state').textContent,
      step: document.getElementById('job-step').textContent,
      src: document.getElementById('job-image').getAttribute('src') || '',
      eta: document.getElementById('job-eta').textContent,
      losses: document.querySelectorAll('#job-losses tr').length,
    });
    new MutationObserver(note).observe(document.getElementById('view-job'), {
      subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ['src'],
    });
  });
}

let firstJob;

await step('the page loads with the form and the catalogue models', async () => {
  await openForm();
  const vq = await page.locator('#f-vqgan option').allTextContents();
  assert.ok(vq.some((t) => t.includes('vqgan-tiny') && t.includes('default')), vq.join(','));
  assert.ok(vq.some((t) => t.includes('vqgan_imagenet_f16_16384')), 'catalogue VQGANs are offered');
  assert.ok((await page.locator('#f-clip option').count()) >= 2);
  assert.equal(await page.locator('#key-box').isHidden(), true, 'no key field while keys are off');
  await shot('01-form');
});

await step('an invalid size shows the API detail next to the width field', async () => {
  await openForm();
  await fillForm({ ...tiny, width: 100, steps: 10, save_every: 5 });
  await page.click('#submit');
  const err = page.locator('#err-width');
  await err.waitFor({ state: 'visible' });
  const text = await err.textContent();
  assert.match(text, /16/, 'the detail says what to fix: ' + text);
  assert.equal(await page.getAttribute('#f-width', 'aria-invalid'), 'true');
  assert.ok(page.url().endsWith('#/'), 'no job was created');
  await shot('02-invalid-size');
});

await step('a job from the form: queue position, live progress and frames, final image', async () => {
  // A long job holds the only worker, so the form's job waits in the queue.
  const blocker = await api('/v1/jobs', { method: 'POST', body: { ...tiny, steps: 2000, save_every: 0 } });
  assert.equal(blocker.status, 201, JSON.stringify(blocker.body));
  await waitFor('the blocker to run', async () => (await api('/v1/jobs/' + blocker.body.id)).body.state === 'running');

  await openForm();
  await fillForm({ ...tiny, ...FORM_JOB });
  firstJob = await submitForm();
  await page.locator('#job-queue').waitFor({ state: 'visible' });
  await waitFor('queue position 1', async () => (await page.textContent('#job-position')) === '1');
  assert.equal(await state(), 'queued');
  await shot('03-queued');

  await watchLiveView();
  assert.equal((await api('/v1/jobs/' + blocker.body.id + '/cancel', { method: 'POST' })).status, 200);
  await waitFor('the job to run', async () => (await state()) === 'running');
  await waitFor('a few steps', async () => Number(await page.textContent('#job-step')) >= 6, 180_000);
  await shot('04-running');
  await waitFor('the job to succeed', async () => (await state()) === 'succeeded', 300_000);
  const seen = await page.evaluate(() => window.seen);
  const running = seen.filter((s) => s.state === 'running');
  const steps = new Set(running.map((s) => s.step));
  const frames = new Set(running.map((s) => s.src).filter(Boolean));
  assert.ok(steps.size >= 3, 'steps moved live: ' + [...steps].join(','));
  assert.ok(frames.size >= 2, 'the frame changed live: ' + frames.size);
  assert.ok(running.some((s) => s.eta !== '–' && s.losses >= 1), 'ETA and loss per prompt shown');
  assert.equal(await page.textContent('#job-losses th'), tiny.prompts, 'the loss is named by its prompt');

  await page.locator('#job-results').waitFor({ state: 'visible' });
  await waitFor('the final image', async () => (await page.textContent('#job-caption')) === 'Final image');
  await page.locator('#job-video').waitFor({ state: 'visible' });
  await waitFor('metadata', async () => (await page.textContent('#job-metadata')).includes('"seed"'));
  const max = Number(await page.getAttribute('#job-scrub', 'max'));
  assert.ok(max >= 2, 'frames to scrub: ' + max);
  await page.locator('#job-scrub').fill('1');
  await waitFor('the scrubbed frame', async () => (await page.textContent('#job-caption')) === 'Frame at step ' + FORM_JOB.save_every);
  await page.locator('#job-scrub').fill(String(max));
  await waitFor('the last frame', async () => (await page.textContent('#job-caption')).startsWith('Frame at step'));
  await shot('05-done');
});

await step('render again fills the form with the job settings and seed', async () => {
  await page.goto(BASE + '/#/jobs/' + firstJob);
  await page.locator('#job-again').waitFor({ state: 'visible' });
  const seed = await page.textContent('#job-seed');
  await page.click('#job-again');
  await page.locator('#view-new').waitFor();
  await waitFor('the seed', async () => (await page.inputValue('#f-seed')) === seed);
  assert.equal(await page.inputValue('#f-steps'), String(FORM_JOB.steps));
  assert.equal(await page.inputValue('#f-prompts'), tiny.prompts);
});

await step('the gallery lists the job, newest first, with its thumbnail', async () => {
  await page.goto(BASE + '/#/jobs');
  const card = page.locator(`#gallery li[data-job="${firstJob}"]`);
  await card.waitFor();
  assert.equal(await card.getAttribute('data-state'), 'succeeded');
  await waitFor('the thumbnail', async () => (await card.locator('img').getAttribute('src'))?.startsWith('blob:'));
  await waitFor('the prompt', async () => (await card.locator('.prompt').textContent()) === tiny.prompts);
  const ids = await page.locator('#gallery li').evaluateAll((els) => els.map((e) => e.dataset.job));
  assert.equal(ids[0], firstJob, 'newest first');
  await shot('06-gallery');
});

await step('cancel a second job from its page', async () => {
  await openForm();
  await fillForm({ ...tiny, steps: 2000, save_every: 50 });
  const id = await submitForm();
  await waitFor('the job to start', async () => ['queued', 'running'].includes(await state()));
  await page.click('#job-cancel');
  await waitFor('canceled', async () => (await state()) === 'canceled');
  assert.equal(await page.locator('#job-cancel').isHidden(), true);
  assert.equal((await api('/v1/jobs/' + id)).body.state, 'canceled');
  await shot('07-canceled');
});

await step('at phone width nothing scrolls sideways', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  for (const hash of ['#/', '#/jobs/' + firstJob, '#/jobs']) {
    await page.goto(BASE + '/' + hash);
    await sleep(500);
    const over = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(over <= 0, `${hash} is ${over}px too wide`);
  }
  await page.goto(BASE + '/#/jobs/' + firstJob);
  await page.locator('#job-results').waitFor({ state: 'visible' });
  await shot('08-phone');
  await page.setViewportSize({ width: 1200, height: 900 });
});

await step('a dropped event stream resumes with Last-Event-ID', async () => {
  const job = await api('/v1/jobs', { method: 'POST', body: { ...tiny, steps: 12, save_every: 4 } });
  assert.equal(job.status, 201, JSON.stringify(job.body));
  const second = await context.newPage();
  // The first event stream is cut after a few chunks, as a flaky network would.
  await second.addInitScript(() => {
    const realFetch = window.fetch.bind(window);
    let cut = false;
    window.fetch = async (input, init) => {
      const res = await realFetch(input, init);
      if (cut || !String(input).endsWith('/events')) return res;
      cut = true;
      const reader = res.body.getReader();
      let chunks = 0;
      const body = new ReadableStream({
        async pull(c) {
          const { value, done } = await reader.read();
          if (done || chunks >= 3) { reader.cancel(); c.close(); return; }
          chunks += 1;
          c.enqueue(value);
        },
      });
      return new Response(body, { status: res.status, headers: res.headers });
    };
  });
  const streams = [];
  second.on('request', (r) => { if (r.url().endsWith('/events')) streams.push(r.headers()['last-event-id'] || null); });
  second.on('pageerror', (e) => consoleErrors.push(String(e)));
  await second.goto(BASE + '/#/jobs/' + job.body.id);
  await waitFor('the job to succeed', async () => (await second.textContent('#job-state')) === 'succeeded', 300_000);
  assert.ok(streams.length >= 2, 'reconnected: ' + JSON.stringify(streams));
  assert.equal(streams[0], null);
  assert.match(streams[1] || '', /^[0-9]+$/, 'the second stream resumes after an event id');
  assert.equal(await second.textContent('#job-step'), '12');
  await second.close();
});

await step('/docs lists every route of openapi.yaml, from this server alone', async () => {
  const yaml = await (await fetch(BASE + '/openapi.yaml')).text();
  const wanted = new Set();
  let path = null;
  for (const line of yaml.split('\n')) {
    const p = line.match(/^ {2}(\/\S*):\s*$/);
    if (p) { path = p[1]; continue; }
    if (/^\S/.test(line)) path = null;
    const m = line.match(/^ {4}(get|put|post|delete|patch):/);
    if (path && m) wanted.add(m[1].toUpperCase() + ' ' + path);
  }
  assert.ok(wanted.size >= 15, 'parsed ' + wanted.size + ' operations');
  await page.goto(BASE + '/docs');
  await page.locator('.opblock').first().waitFor();
  const shown = new Set(await page.locator('.opblock').evaluateAll((els) => els.map((e) => {
    const method = e.querySelector('.opblock-summary-method').textContent.trim().toUpperCase();
    const p = e.querySelector('.opblock-summary-path');
    return method + ' ' + (p.dataset.path || p.textContent.trim()).replace(/\u200b/g, '');
  })));
  const missing = [...wanted].filter((w) => !shown.has(w));
  assert.deepEqual(missing, [], 'routes missing from /docs');
  await shot('09-docs');
});

await step('steer a running job from its page, then fork the finished job from a frame', async () => {
  const job = await api('/v1/jobs', { method: 'POST', body: { ...tiny, steps: 1000, save_every: 10 } });
  assert.equal(job.status, 201, JSON.stringify(job.body));
  const id = job.body.id;
  await page.goto(BASE + '/#/jobs/' + id);
  await waitFor('the job to run', async () => (await state()) === 'running');
  await page.locator('#job-steer').waitFor({ state: 'visible' });
  await page.fill('#job-steer-prompts', 'a lighthouse in a storm');
  await page.click('#job-steer-apply');
  await waitFor('the revision note', async () => (await page.textContent('#job-steer-note')).includes('Revision 1'));
  await waitFor('the revision to take effect', async () => {
    const j = (await api('/v1/jobs/' + id)).body;
    return j.revisions.length === 1 && j.revisions[0].step !== null;
  });
  await shot('11-steered');
  // Fewer steps end it soon; then a frame of it starts a new job.
  const at = (await api('/v1/jobs/' + id)).body.progress.step;
  const fewer = await api('/v1/jobs/' + id, { method: 'PATCH', body: { steps: at + 25 } });
  assert.equal(fewer.status, 202, JSON.stringify(fewer.body));
  await waitFor('the job to succeed', async () => (await state()) === 'succeeded', 120_000);
  assert.equal(await page.locator('#job-steer').isHidden(), true, 'no editor on a finished job');
  await page.locator('#job-fork:not([disabled])').waitFor();
  await page.locator('#job-scrub').fill('1');
  await page.click('#job-fork');
  await page.waitForURL((u) => /#\/jobs\/[0-9a-f-]{36}$/.test(u.toString()) && !u.toString().endsWith(id));
  const child = page.url().split('/').pop();
  const fork = (await api('/v1/jobs/' + child)).body;
  assert.deepEqual([fork.parent.id, fork.parent.step], [id, 10]);
  // The source's spec in force at that step: steered only if the revision came by then.
  const revision = (await api('/v1/jobs/' + id)).body.revisions[0];
  const expected = revision.step <= 10 ? 'a lighthouse in a storm' : tiny.prompts;
  assert.equal(fork.spec.prompts, expected, 'the fork renders the spec in force at its step');
  await waitFor('the fork note', async () => (await page.textContent('#job-fork-note')).includes('Forked from step 10'));
  await shot('12-forked');
});

await step('with keys on, key A sees only its own jobs', async () => {
  const env = { ...process.env };
  delete env.VQCLIP_CONFIG;
  const create = (name) => execFileSync(BIN, ['keys', 'create', '--name', name, '--database-url', DB],
    { encoding: 'utf8', env }).trim();
  const keyA = create('browser-a');
  const keyB = create('browser-b');
  const jobB = await api('/v1/jobs', { method: 'POST', key: keyB, body: { ...tiny, prompts: 'only for B', steps: 3, save_every: 0 } });
  assert.equal(jobB.status, 201, JSON.stringify(jobB.body));
  const jobA = await api('/v1/jobs', { method: 'POST', key: keyA, body: { ...tiny, prompts: 'only for A', steps: 3, save_every: 0 } });
  assert.equal(jobA.status, 201, JSON.stringify(jobA.body));

  await page.goto(BASE + '/#/jobs');
  await page.locator('#key-box').waitFor({ state: 'visible' });
  await page.locator('#banner').waitFor({ state: 'visible' });
  await page.fill('#api-key', keyA);
  await page.click('#key-save');
  await page.locator(`#gallery li[data-job="${jobA.body.id}"]`).waitFor();
  await sleep(500);
  const ids = await page.locator('#gallery li').evaluateAll((els) => els.map((e) => e.dataset.job));
  assert.deepEqual(ids, [jobA.body.id], 'key A lists only its job');
  assert.equal(await page.evaluate(() => localStorage.getItem('vqclip.api_key')), keyA, 'kept in local storage');
  await shot('10-keys');
  await page.goto(BASE + '/#/jobs/' + jobB.body.id);
  await waitFor('B is not found with A', async () => (await page.textContent('#job-title')) === 'Job not found');
});

await step('nothing was fetched from anywhere but this server, and no script error', async () => {
  assert.deepEqual(external, []);
  assert.deepEqual(consoleErrors, []);
});

await context.close();
rmSync(userData, { recursive: true, force: true });
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
