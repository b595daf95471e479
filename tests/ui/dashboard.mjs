// Browser test of the dashboard at /ui, in headless Chromium through
// playwright-core (installed by scripts/browser.sh install).
//
//   NODE_PATH=$(scripts/browser.sh node-path) \
//   INFERQ_URL=http://127.0.0.1:18080 INFERQ_ADMIN_TOKEN=... SCREENSHOT_DIR=/tmp/shots \
//   node tests/ui/dashboard.mjs
//
// Needs a running API (with the admin token set) and a worker with the
// simulated backend. Prints one line per passed step; exits non-zero with a
// message on the first failed one. Stops by itself: every wait is bounded
// and the whole run is cut at OVERALL_MS.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { homedir } from 'node:os';

const OVERALL_MS = 90_000;
const STEP_WAIT_MS = 10_000;
const MODEL = 'ui-test';

const BASE = (process.env.INFERQ_URL || '').replace(/\/+$/, '');
const TOKEN = process.env.INFERQ_ADMIN_TOKEN || '';
const SHOTS = process.env.SCREENSHOT_DIR || join(process.cwd(), 'target', 'ui-screenshots');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function fatal(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

if (!BASE) fatal('INFERQ_URL is not set (e.g. http://127.0.0.1:18080)');
if (!TOKEN) fatal('INFERQ_ADMIN_TOKEN is not set');

// ESM ignores NODE_PATH; a CommonJS require honours it. Fall back to the
// folder scripts/browser.sh installs into.
function loadPlaywright() {
  const require = createRequire(import.meta.url);
  try {
    return require('playwright-core');
  } catch (_) {
    const dir = process.env.INFERQ_BROWSER_DIR || join(homedir(), '.cache', 'inferq-browser');
    try {
      return createRequire(join(dir, 'node_modules', 'noop.js'))('playwright-core');
    } catch (e) {
      fatal(`cannot load playwright-core (run scripts/browser.sh install and set NODE_PATH): ${e.message}`);
    }
  }
  return null;
}

const { chromium } = loadPlaywright();
mkdirSync(SHOTS, { recursive: true });

let browser = null;
let page = null;
let stepNo = 0;
let currentStep = '(start)';
const pageErrors = [];
const consoleErrors = [];

let shuttingDown = false;
async function shutdown(code, message) {
  if (shuttingDown) return;
  shuttingDown = true;
  if (message) console.error(message);
  if (code !== 0) {
    console.log(`dashboard: ${Math.max(stepNo - 1, 0)} passed, 1 failed`);
    if (consoleErrors.length) console.error(`browser console errors:\n  ${consoleErrors.slice(-10).join('\n  ')}`);
    if (pageErrors.length) console.error(`page errors:\n  ${pageErrors.join('\n  ')}`);
    if (page) {
      try {
        console.error(`page url: ${page.url()}`);
        await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true, timeout: 5000 });
        console.error(`screenshot of the failure: ${join(SHOTS, 'failure.png')}`);
      } catch (_) { /* best effort */ }
    }
    // Never leave the test queue paused for the next run.
    if (page) {
      try {
        await fetchJson('POST', `/queues/${MODEL}/resume`);
      } catch (_) { /* best effort */ }
    }
  }
  if (browser) {
    await Promise.race([browser.close().catch(() => {}), sleep(5000)]);
  }
  process.exit(code);
}

const overall = setTimeout(() => {
  shutdown(1, `FAIL: overall timeout of ${OVERALL_MS / 1000} s in step ${stepNo} (${currentStep})`);
}, OVERALL_MS);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function step(name, fn) {
  stepNo += 1;
  currentStep = name;
  const started = Date.now();
  try {
    await fn();
  } catch (e) {
    await shutdown(1, `FAIL step ${stepNo} (${name}): ${e && e.message ? e.message.split('\n')[0] : e}`);
  }
  console.log(`ok ${stepNo} - ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
}

// Polls `probe` until it returns a truthy value; the last value seen goes
// into the error.
async function waitUntil(what, probe, timeoutMs = STEP_WAIT_MS, everyMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last && last.ok !== false) return last;
    } catch (e) {
      last = e.message.split('\n')[0];
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}; last seen: ${JSON.stringify(last)}`);
    }
    await sleep(everyMs);
  }
}

// The API straight from the browser context: the admin cookie goes along.
async function fetchJson(method, path, data) {
  const res = await page.request.fetch(`${BASE}${path}`, {
    method,
    data,
    headers: data === undefined ? {} : { 'Content-Type': 'application/json' },
    timeout: STEP_WAIT_MS,
  });
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  return { status: res.status(), body };
}

async function submit(path, data) {
  const { status, body } = await fetchJson('POST', path, data);
  if (status !== 202 && status !== 200 && status !== 201) {
    throw new Error(`POST ${path} answered ${status}: ${JSON.stringify(body)}`);
  }
  if (!body || !body.id) throw new Error(`POST ${path} gave no id: ${JSON.stringify(body)}`);
  return body.id;
}

const tid = (id) => `[data-testid="${id}"]`;
const text = async (selector) => ((await page.locator(selector).first().textContent({ timeout: 2000 })) || '').trim();
const shot = (name) => page.screenshot({ path: join(SHOTS, name), fullPage: true });

async function go(hash) {
  await page.goto(`${BASE}/ui${hash}`);
}

async function main() {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  context.setDefaultTimeout(STEP_WAIT_MS);
  context.setDefaultNavigationTimeout(STEP_WAIT_MS);
  page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  // Confirmations (re-drive all) are accepted.
  const dialogs = [];
  page.on('dialog', (d) => { dialogs.push(d.message()); d.accept().catch(() => {}); });

  let okIds = [];
  let failId = '';

  await step('login: /ui sends a visitor without the cookie to the form; a wrong token is refused; the right one opens the dashboard', async () => {
    await page.goto(`${BASE}/ui`);
    await page.waitForURL((u) => u.pathname === '/ui/login', { timeout: STEP_WAIT_MS });
    await page.locator('input[name="token"]').waitFor({ state: 'visible' });
    await page.fill('input[name="token"]', `${TOKEN}-wrong`);
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/ui/login' && u.searchParams.get('error') === '1'),
      page.click('form[action="/ui/login"] button[type="submit"]'),
    ]);
    const err = page.locator(tid('login-error'));
    await err.waitFor({ state: 'visible' });
    if (!/wrong token/i.test(await err.textContent())) throw new Error('the error note does not say "Wrong token"');
    await shot('login-error.png');
    await page.fill('input[name="token"]', TOKEN);
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/ui' || u.pathname === '/ui/'),
      page.click('form[action="/ui/login"] button[type="submit"]'),
    ]);
    await page.locator(tid('page-queues')).waitFor({ state: 'visible' });
    await page.locator(tid('nav')).waitFor({ state: 'visible' });
    const cookies = await context.cookies(BASE);
    if (!cookies.some((c) => c.httpOnly)) {
      throw new Error(`no HttpOnly cookie after signing in (cookies: ${cookies.map((c) => c.name).join(', ') || 'none'})`);
    }
    const visible = await page.evaluate(() => document.cookie);
    if (visible.includes(TOKEN)) throw new Error('the token is readable from document.cookie');
    await shot('login.png');
  });

  await step('submit 5 tasks and 1 that fails on its first run through POST /tasks', async () => {
    for (let n = 1; n <= 5; n += 1) {
      okIds.push(await submit('/tasks', { model: MODEL, prompt: `hello dashboard ${n}` }));
    }
    failId = await submit('/tasks', {
      model: MODEL, prompt: 'fails once', max_attempts: 1, params: { sim: { fail_runs: 1 } },
    });
  });

  await step('queues page: ui-test appears; last minute reaches 5 succeeded and 1 failed', async () => {
    await go('#/queues');
    await page.locator(tid(`queue-row-${MODEL}`)).waitFor({ state: 'visible', timeout: 15_000 });
    // (>= because a re-run within a minute still sees the last run's tasks;
    // so this run's own six must have finished too.)
    await waitUntil('the six submitted tasks to finish', async () => {
      const left = [];
      for (const id of [...okIds, failId]) {
        const { body } = await fetchJson('GET', `/tasks/${id}`);
        if (!body || !['succeeded', 'failed'].includes(body.status)) left.push(body && body.status);
      }
      return left.length === 0 ? true : { ok: false, unfinished: left };
    }, 30_000, 500);
    await waitUntil('last-minute succeeded >= 5 and failed >= 1 on the ui-test row', async () => {
      const ok = Number(await text(tid(`queue-succeeded-${MODEL}`)));
      const bad = Number(await text(tid(`queue-failed-${MODEL}`)));
      return { ok: ok >= 5 && bad >= 1, succeeded: ok, failed: bad };
    }, 30_000, 500);
    // a few samples on the charts
    await sleep(2500);
    await shot('queues.png');
  });

  await step('tasks page filtered to status=failed, model=ui-test lists the failed task; its page shows the injected error', async () => {
    await go('#/tasks');
    await page.locator(tid('page-tasks')).waitFor({ state: 'visible' });
    await page.selectOption(tid('filter-status'), 'failed');
    await page.fill(tid('filter-model'), MODEL);
    await page.click(tid('filter-apply'));
    await page.waitForFunction(() => {
      const q = new URLSearchParams(location.hash.split('?')[1] || '');
      return location.hash.startsWith('#/tasks') && q.get('status') === 'failed' && q.get('model') === 'ui-test';
    }, null, { timeout: STEP_WAIT_MS });
    await page.locator(tid(`task-row-${failId}`)).waitFor({ state: 'visible', timeout: 15_000 });
    const rowsStatus = await page.locator(`${tid('tasks-body')} tr[data-key] .badge`).allTextContents();
    if (rowsStatus.some((s) => s !== 'failed')) throw new Error(`the failed filter lists other statuses: ${rowsStatus.join(', ')}`);
    await shot('tasks.png');
    await page.click(tid(`task-link-${failId}`));
    await page.waitForFunction((id) => location.hash === `#/task/${id}`, failId);
    await waitUntil('task status "failed"', async () => (await text(tid('task-status'))) === 'failed');
    const err = await waitUntil('an attempt of run 1 with an error containing "injected"', async () => {
      const t = await text(tid('history-error-1-1'));
      return /injected/i.test(t) ? t : { ok: false, error: t };
    });
    if (!err) throw new Error('no error');
    await page.locator(tid('task-redrive')).waitFor({ state: 'visible' });
    await shot('task-failed.png');
  });

  await step('dead letters list the task; its re-drive button runs it again and it succeeds with runs 1 (failed) and 2 (succeeded) in its history', async () => {
    await page.click(tid('nav-dlq'));
    await page.locator(tid('page-dlq')).waitFor({ state: 'visible' });
    await page.fill(tid('filter-model'), MODEL);
    await page.click(tid('filter-apply'));
    await page.locator(tid(`dlq-row-${failId}`)).waitFor({ state: 'visible', timeout: 15_000 });
    const rowText = await text(tid(`dlq-row-${failId}`));
    if (!/injected/i.test(rowText)) throw new Error(`the dead-letter row shows no injected error: ${rowText}`);
    await shot('dlq.png');
    await page.click(tid(`redrive-${failId}`));
    await waitUntil('the re-drive notice', async () => /re-drove/i.test(await text(tid('notice'))));
    await page.locator(tid(`dlq-row-${failId}`)).waitFor({ state: 'detached', timeout: STEP_WAIT_MS });
    await go(`#/task/${failId}`);
    await waitUntil('status "succeeded" after the re-drive', async () => {
      const s = await text(tid('task-status'));
      return s === 'succeeded' ? s : { ok: false, status: s };
    }, 15_000);
    await waitUntil('run 1 failed and run 2 succeeded in the history', async () => {
      const r1 = await text(tid('history-outcome-1-1'));
      const r2 = await text(tid('history-outcome-2-1'));
      const heads = await page.locator(`${tid('history')} tr.run-head`).count();
      return { ok: r1 === 'failed' && r2 === 'succeeded' && heads === 2, run1: r1, run2: r2, runs: heads };
    });
    await shot('task-succeeded.png');
  });

  await step('dead letters: "re-drive all matching" (after a confirm) re-drives what the filter matches', async () => {
    const id = await submit('/tasks', {
      model: MODEL, prompt: 'fails once too', max_attempts: 1, params: { sim: { fail_runs: 1 } },
    });
    await go(`#/dlq?model=${MODEL}&error_contains=injected`);
    await page.locator(tid(`dlq-row-${id}`)).waitFor({ state: 'visible', timeout: 15_000 });
    const before = dialogs.length;
    await page.click(tid('redrive-all'));
    await waitUntil('a confirm() before the bulk re-drive', async () => dialogs.length > before, 3000);
    const notice = await waitUntil('the bulk re-drive notice', async () => {
      const t = await text(tid('notice'));
      return /re-drove [1-9]\d* task/i.test(t) ? t : null;
    });
    await page.locator(tid(`dlq-row-${id}`)).waitFor({ state: 'detached', timeout: STEP_WAIT_MS });
    await waitUntil('the bulk re-driven task to succeed', async () => {
      const { body } = await fetchJson('GET', `/tasks/${id}`);
      return body && body.status === 'succeeded' ? body.status : { ok: false, status: body && body.status };
    }, 15_000, 500);
    if (!notice) throw new Error('no notice');
  });

  await step('batches page: a batch submitted through POST /batches shows progress 3/3', async () => {
    const batchId = await submit('/batches', {
      tasks: [
        { model: MODEL, prompt: 'b1' },
        { model: MODEL, prompt: 'b2' },
        { model: MODEL, prompt: 'b3' },
      ],
    });
    await page.click(tid('nav-batches'));
    await page.locator(tid('page-batches')).waitFor({ state: 'visible' });
    await page.locator(tid(`batch-row-${batchId}`)).waitFor({ state: 'visible', timeout: 15_000 });
    await waitUntil('batch progress 3/3', async () => {
      const t = await text(tid(`batch-progress-${batchId}`));
      return t === '3/3' ? t : { ok: false, progress: t };
    }, 20_000, 500);
    await waitUntil('batch status completed', async () => (await text(tid(`batch-status-${batchId}`))) === 'completed', 5000);
    await shot('batches.png');
  });

  await step('queues page: pause and resume ui-test (GET /queues agrees)', async () => {
    await page.click(tid('nav-queues'));
    const row = page.locator(tid(`queue-row-${MODEL}`));
    await row.waitFor({ state: 'visible' });
    await page.click(tid(`pause-${MODEL}`));
    await waitUntil('the row to show paused', async () =>
      (await row.getAttribute('data-paused')) === 'true' && (await text(tid(`queue-paused-${MODEL}`))) === 'paused');
    await waitUntil('GET /queues to say paused: true', async () => {
      const { body } = await fetchJson('GET', '/queues');
      const q = body && body.queues && body.queues.find((x) => x.name === MODEL);
      return q && q.paused === true;
    });
    await shot('queues-paused.png');
    await page.click(tid(`resume-${MODEL}`));
    await waitUntil('the row to show not paused', async () =>
      (await row.getAttribute('data-paused')) === 'false' && (await text(tid(`queue-paused-${MODEL}`))) === 'active');
    await waitUntil('GET /queues to say paused: false', async () => {
      const { body } = await fetchJson('GET', '/queues');
      const q = body && body.queues && body.queues.find((x) => x.name === MODEL);
      return q && q.paused === false;
    });
  });

  if (pageErrors.length) {
    await shutdown(1, `FAIL: the page threw: ${pageErrors.join(' | ')}`);
  }
  clearTimeout(overall);
  console.log(`screenshots in ${SHOTS}`);
  console.log(`dashboard: ${stepNo} passed, 0 failed`);
  await shutdown(0);
}

main().catch((e) => shutdown(1, `FAIL in step ${stepNo + 1} (${currentStep}): ${e && e.stack ? e.stack : e}`));
