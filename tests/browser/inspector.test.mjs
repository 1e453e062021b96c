// End-to-end test of the browser inspector (`/`) and the API docs (`/docs`)
// in headless Chromium, against a running convscope server.
//
//   CONVSCOPE_URL=http://127.0.0.1:8080 node tests/browser/inspector.test.mjs
//
// Environment:
//   CONVSCOPE_URL   base URL of the server (required)
//   CHROMIUM        Chromium executable (default /usr/bin/chromium)
//   OUT_DIR         where screenshots go (default: a fresh temp dir)
//   TEST_TIMEOUT_S  global timeout in seconds (default 180)
//
// Every request the pages make to any origin but the server's is blocked and
// counted; a test fails if there was one (the pages must work offline, no CDN).
// Exits 0 when every test passes, 1 otherwise. `tests/browser/run.sh` builds
// nothing but starts the server and runs this.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
const CAT = path.join(repoRoot, 'data', 'cifar10', 'samples', 'test0000_cat.png');
const MODEL = 'resnet20-cifar10';

const baseEnv = process.env.CONVSCOPE_URL;
if (!baseEnv) {
  console.error('FAIL: set CONVSCOPE_URL to the server, e.g. http://127.0.0.1:8080');
  process.exit(2);
}
const base = new URL(baseEnv);
const origin = base.origin;
const url = (p) => new URL(p, base).toString();
const outDir = process.env.OUT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'convscope-browser-'));
fs.mkdirSync(outDir, { recursive: true });
const globalTimeoutS = Number(process.env.TEST_TIMEOUT_S || 180);
const STEP_MS = 90_000; // one wait inside a test (ScoreCAM-free defaults answer in well under a second)

let browser;
const globalTimer = setTimeout(async () => {
  console.error(`FAIL: global timeout of ${globalTimeoutS} s reached`);
  try { await browser?.close(); } catch { /* exiting anyway */ }
  process.exit(1);
}, globalTimeoutS * 1000);

class TestFailure extends Error {}
function assert(cond, msg) {
  if (!cond) throw new TestFailure(msg);
}

// A fresh context whose every off-origin request is aborted and recorded.
async function isolatedPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const offOrigin = [];
  const pageErrors = [];
  await context.route('**/*', (route) => {
    const u = route.request().url();
    let o;
    try { o = new URL(u).origin; } catch { o = 'unparseable'; }
    if (o === origin) return route.continue();
    offOrigin.push(u);
    return route.abort('blockedbyclient');
  });
  const page = await context.newPage();
  page.on('websocket', (ws) => {
    if (new URL(ws.url()).origin.replace(/^ws/, 'http') !== origin) offOrigin.push(ws.url());
  });
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') console.log(`    [console.error] ${m.text()}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400) console.log(`    [http ${r.status()}] ${r.request().method()} ${r.url()}`);
  });
  page.setDefaultTimeout(STEP_MS);
  return { context, page, offOrigin, pageErrors };
}

function checkIsolation({ offOrigin, pageErrors }) {
  assert(offOrigin.length === 0,
    `the page tried to reach ${offOrigin.length} off-origin URL(s): ${[...new Set(offOrigin)].join(', ')}`);
  assert(pageErrors.length === 0, `uncaught page error(s): ${pageErrors.join(' | ')}`);
}

// Waits until `fn` is true in the page, or the error banner appears (then
// fails with its text at once instead of waiting out the timeout).
async function waitFor(page, what, fn, arg) {
  const opts = { timeout: STEP_MS, polling: 100 };
  const cond = page.waitForFunction(fn, arg, opts).then(() => 'ok');
  const shown = page.waitForFunction(() => { const b = document.getElementById('error'); return !!b && !b.hidden; }, null, opts).then(() => 'banner');
  cond.catch(() => {});
  shown.catch(() => {});
  let outcome;
  try {
    outcome = await Promise.race([cond, shown]);
  } catch (e) {
    throw new TestFailure(`timed out waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
  if (outcome === 'banner') {
    throw new TestFailure(`error banner shown while waiting for ${what}: ${await errorBanner(page)}`);
  }
}

async function errorBanner(page) {
  return page.evaluate(() => {
    const b = document.getElementById('error');
    return b && !b.hidden ? b.innerText.trim() : null;
  });
}

const imgSize = (page, id) => page.evaluate((i) => {
  const img = document.getElementById(i);
  return img ? { w: img.naturalWidth, h: img.naturalHeight, complete: img.complete, hidden: img.hidden } : null;
}, id);

async function testInspector() {
  assert(fs.existsSync(CAT), `test image missing: ${CAT}`);
  const t = await isolatedPage();
  const { page } = t;
  try {
    await page.goto(url('/'), { waitUntil: 'load' });
    await waitFor(page, `model ${MODEL} in the picker`,
      (m) => [...document.querySelectorAll('#model option')].some((o) => o.value === m), MODEL);
    await page.selectOption('#model', MODEL);
    await waitFor(page, 'the layer picker to fill',
      () => document.querySelectorAll('#act-layer option').length > 0);

    await page.setInputFiles('#image-input', CAT);

    await waitFor(page, 'the top-1 label',
      () => { const t = document.getElementById('top1-label').textContent.trim(); return t !== '' && t !== '—'; });
    const top1 = (await page.textContent('#top1-label')).trim();
    assert(top1 === 'cat', `#top1-label is ${JSON.stringify(top1)}, expected "cat"`);
    const rows = await page.locator('#predictions tbody tr').count();
    assert(rows === 5, `top-5 table has ${rows} rows, expected 5`);

    const loaded = (id) => waitFor(page, `#${id} to load`,
      (i) => { const img = document.getElementById(i); return img.dataset.loaded === 'true' && img.complete && img.naturalWidth > 0; }, id);
    await loaded('gradcam-overlay');
    const cam = await imgSize(page, 'gradcam-overlay');
    assert(cam.w === 32 && cam.h === 32,
      `#gradcam-overlay is ${cam.w}×${cam.h}, expected 32×32 (the input image's size)`);
    assert(!cam.hidden, '#gradcam-overlay is hidden');

    await loaded('activation-grid');
    const act = await imgSize(page, 'activation-grid');
    assert(act.w > 0 && act.h > 0 && !act.hidden, `activation grid did not render (${JSON.stringify(act)})`);

    await loaded('filters-img');
    const filt = await imgSize(page, 'filters-img');
    assert(filt.w > 0 && !filt.hidden, `filters grid did not render (${JSON.stringify(filt)})`);

    const banner = await errorBanner(page);
    assert(banner === null, `error banner shown: ${banner}`);
    await page.screenshot({ path: path.join(outDir, 'inspector.png'), fullPage: true });
    checkIsolation(t);
    return `top-1 "${top1}", Grad-CAM overlay ${cam.w}×${cam.h}, activation grid ${act.w}×${act.h}, filters ${filt.w}×${filt.h}`;
  } catch (e) {
    await page.screenshot({ path: path.join(outDir, 'inspector-failure.png'), fullPage: true }).catch(() => {});
    if (t.offOrigin.length) e.message += ` (also: off-origin requests ${t.offOrigin.join(', ')})`;
    throw e;
  } finally {
    await t.context.close();
  }
}

async function testDocs() {
  const t = await isolatedPage();
  const { page } = t;
  const wanted = '/models/{model}/predict';
  try {
    const res = await page.goto(url('/docs'), { waitUntil: 'load' });
    assert(res && res.ok(), `GET /docs answered ${res ? res.status() : 'nothing'}`);
    try {
      await page.waitForFunction(() => document.querySelectorAll('.opblock').length > 0,
        null, { timeout: STEP_MS, polling: 100 });
    } catch (e) {
      const text = (await page.locator('#swagger-ui').innerText().catch(() => '')).slice(0, 300);
      throw new TestFailure(`Swagger UI rendered no operations (.opblock): ${text || e.message.split('\n')[0]}`);
    }
    const ops = await page.locator('.opblock').count();
    const paths = await page.evaluate(() => [...document.querySelectorAll('.opblock-summary-path')]
      .map((el) => el.getAttribute('data-path') || el.textContent.replace(/\u200b/g, '').trim()));
    assert(paths.includes(wanted), `operation ${wanted} not shown; paths: ${paths.join(', ')}`);
    await page.screenshot({ path: path.join(outDir, 'docs.png'), fullPage: true });
    checkIsolation(t);
    return `${ops} operations rendered, ${wanted} among them`;
  } catch (e) {
    await page.screenshot({ path: path.join(outDir, 'docs-failure.png'), fullPage: true }).catch(() => {});
    if (t.offOrigin.length) e.message += ` (also: off-origin requests ${t.offOrigin.join(', ')})`;
    throw e;
  } finally {
    await t.context.close();
  }
}

/** A graph model (ResNet-20 exported from its PyTorch code): the pickers
 * list its nodes, functional ones and container aliases included, and a
 * functional node's maps render. */
async function testGraphModel() {
  const GRAPH = 'resnet20-cifar10-graph';
  const t = await isolatedPage();
  const { page } = t;
  try {
    await page.goto(url('/'), { waitUntil: 'load' });
    await waitFor(page, `model ${GRAPH} in the picker`,
      (m) => [...document.querySelectorAll('#model option')].some((o) => o.value === m), GRAPH);
    await page.selectOption('#model', GRAPH);
    // The picker keeps the default model's layers (ResNet-20 too, many of the
    // same names) until the graph model's arrive: wait for the page to say
    // whose layers it lists.
    await waitFor(page, 'the layer picker to list the graph nodes',
      (m) => document.getElementById('act-layer').dataset.model === m, GRAPH);
    const layers = await page.evaluate(() => [...document.querySelectorAll('#act-layer option')].map((o) => o.value));
    for (const want of ['conv1', 'add', 'layer1.0', 'layer2.0.shortcut', 'pad', 'linear']) {
      assert(layers.includes(want), `#act-layer lacks ${want}: ${layers.join(', ')}`);
    }
    await page.setInputFiles('#image-input', CAT);
    await waitFor(page, 'the top-1 label',
      () => { const t = document.getElementById('top1-label').textContent.trim(); return t !== '' && t !== '—'; });
    const top1 = (await page.textContent('#top1-label')).trim();
    assert(top1 === 'cat', `#top1-label is ${JSON.stringify(top1)}, expected "cat"`);
    await page.selectOption('#act-layer', 'add');
    await waitFor(page, '#activation-grid to load',
      () => { const img = document.getElementById('activation-grid'); return img.dataset.loaded === 'true' && img.complete && img.naturalWidth > 0; });
    const banner = await errorBanner(page);
    assert(banner === null, `error banner shown: ${banner}`);
    await page.screenshot({ path: path.join(outDir, 'inspector-graph.png'), fullPage: true });
    checkIsolation(t);
    return `top-1 "${top1}", ${layers.length} layers listed, maps of the functional node "add" rendered`;
  } catch (e) {
    await page.screenshot({ path: path.join(outDir, 'inspector-graph-failure.png'), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await t.context.close();
  }
}

/** A training job queued over the API: the page lists it, follows its
 * events and redraws its curves until it succeeds; then the confusion
 * matrix of an evaluation of CNN_A on MNIST shows. */
async function testTraining() {
  const submitted = await fetch(url('/jobs'), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model_name: 'browser-cnn-a', architecture: 'cnn_a', dataset: 'mnist',
      epochs: 6, batch_size: 64, train_limit: 3000, test_limit: 300, seed: 1 }),
  });
  const queued = await submitted.text();
  assert(submitted.status === 202, `POST /jobs answered ${submitted.status}: ${queued}`);
  const { job_id: jobId } = JSON.parse(queued);
  const t = await isolatedPage();
  const { page } = t;
  try {
    await page.goto(url('/'), { waitUntil: 'load' });
    await waitFor(page, 'the job in the job picker',
      (id) => [...document.querySelectorAll('#job option')].some((o) => o.value === id), jobId);
    await page.selectOption('#job', jobId);
    // Live: the curves are redrawn from the job's events while it trains.
    await waitFor(page, 'a redraw of the curves while the job runs',
      () => { const img = document.getElementById('job-plot');
        return img.dataset.status === 'running' && Number(img.dataset.redraws) >= 1; });
    await waitFor(page, 'the job to succeed and its final curves to load',
      () => { const img = document.getElementById('job-plot');
        return img.dataset.final === 'succeeded' && img.dataset.loaded === 'true' && img.complete && img.naturalWidth > 0; });
    const plot = await page.evaluate(() => { const img = document.getElementById('job-plot'); return [img.naturalWidth, img.naturalHeight]; });
    assert(plot[0] === 1100 && plot[1] === 460, `the training plot is ${plot.join('×')}, expected 1100×460`);
    const info = (await page.textContent('#job-info')).trim();
    assert(/browser-cnn-a on mnist: succeeded/.test(info) && /test accuracy/.test(info), `#job-info says ${JSON.stringify(info)}`);
    await page.screenshot({ path: path.join(outDir, 'inspector-training.png'), fullPage: true });

    await page.selectOption('#model', 'cnn-a-mnist');
    await waitFor(page, 'the model to switch',
      () => document.getElementById('act-layer').dataset.model === 'cnn-a-mnist');
    await page.selectOption('#eval-dataset', 'mnist');
    await page.fill('#eval-limit', '300');
    await page.click('#eval-run');
    await waitFor(page, 'the confusion matrix to load',
      () => { const img = document.getElementById('confusion-img'); return img.dataset.loaded === 'true' && img.complete && img.naturalWidth > 0; });
    const matrix = await page.evaluate(() => { const img = document.getElementById('confusion-img'); return [img.naturalWidth, img.naturalHeight]; });
    assert(matrix[0] > 500 && matrix[1] > 500, `the confusion matrix is ${matrix.join('×')}`);
    const banner = await errorBanner(page);
    assert(banner === null, `error banner shown: ${banner}`);
    await page.screenshot({ path: path.join(outDir, 'inspector-evaluation.png'), fullPage: true });
    checkIsolation(t);
    const redraws = await page.evaluate(() => document.getElementById('job-plot').dataset.redraws);
    return `job ${jobId.slice(0, 8)} followed to "${info}" (${redraws} redraws while it ran), plot ${plot.join('×')}, confusion matrix ${matrix.join('×')}`;
  } catch (e) {
    await page.screenshot({ path: path.join(outDir, 'inspector-training-failure.png'), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await t.context.close();
  }
}

/** The side-by-side panel: four methods' maps over the cat, each with its
 * faithfulness scores, and the deletion/insertion plot. */
async function testExplanations() {
  const t = await isolatedPage();
  const { page } = t;
  try {
    await page.goto(url('/'), { waitUntil: 'load' });
    await waitFor(page, `model ${MODEL} in the picker`,
      (m) => [...document.querySelectorAll('#model option')].some((o) => o.value === m), MODEL);
    await page.selectOption('#model', MODEL);
    await waitFor(page, 'the layer picker to fill', (m) => document.getElementById('act-layer').dataset.model === m, MODEL);
    await page.setInputFiles('#image-input', CAT);
    await waitFor(page, 'the Compare button', () => !document.getElementById('explain-run').disabled);
    await page.click('#explain-run');
    const methods = await page.evaluate(() => [...document.querySelectorAll('input[name="explain-method"]:checked')].map((c) => c.value));
    assert(methods.length === 4, `${methods.length} methods checked by default: ${methods.join(', ')}`);
    await waitFor(page, 'the scores', () => document.getElementById('explain-cards').dataset.done === 'true');
    const cards = await page.evaluate(() => [...document.querySelectorAll('#explain-cards .card')].map((c) => ({
      method: c.dataset.method,
      scores: Object.fromEntries([...c.querySelectorAll('td.score')].map((td) => [td.dataset.metric, Number(td.textContent)])),
    })));
    assert(cards.map((c) => c.method).join() === methods.join(), `cards ${cards.map((c) => c.method).join(', ')}`);
    for (const c of cards) {
      const names = Object.keys(c.scores);
      assert(names.join() === 'deletion,insertion,road_morf,road_lerf', `${c.method}: scores ${names.join(', ')}`);
      assert(Object.values(c.scores).every(Number.isFinite), `${c.method}: ${JSON.stringify(c.scores)}`);
      assert(c.scores.deletion >= 0 && c.scores.deletion <= 1 && c.scores.insertion >= 0 && c.scores.insertion <= 1,
        `${c.method}: areas outside [0, 1]: ${JSON.stringify(c.scores)}`);
    }
    for (let i = 0; i < methods.length; i++) {
      const id = `explain-img-${i}`;
      await waitFor(page, `#${id} to load`,
        (x) => { const img = document.getElementById(x); return img.dataset.loaded === 'true' && img.naturalWidth > 0; }, id);
      const size = await imgSize(page, id);
      assert(size.w === 32 && size.h === 32, `${methods[i]}'s map is ${size.w}×${size.h}, expected the image's 32×32`);
    }
    await waitFor(page, 'the curves plot',
      () => { const img = document.getElementById('explain-curves'); return img.dataset.loaded === 'true' && img.naturalWidth > 0; });
    const plot = await imgSize(page, 'explain-curves');
    const banner = await errorBanner(page);
    assert(banner === null, `error banner shown: ${banner}`);
    await page.locator('section[aria-labelledby="h-explain"]').screenshot({ path: path.join(outDir, 'inspector-explanations.png') });
    if (process.env.DOCS_IMG) {
      await page.locator('section[aria-labelledby="h-explain"]').screenshot({ path: process.env.DOCS_IMG });
    }
    checkIsolation(t);
    return cards.map((c) => `${c.method} deletion ${c.scores.deletion.toFixed(3)} insertion ${c.scores.insertion.toFixed(3)}`).join('; ') + `; plot ${plot.w}×${plot.h}`;
  } catch (e) {
    await page.screenshot({ path: path.join(outDir, 'inspector-explanations-failure.png'), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await t.context.close();
  }
}

const tests = [
  ['inspector: predict, activations, filters and Grad-CAM of the CIFAR-10 cat', testInspector],
  ['inspector: a graph model lists its nodes and shows a functional node', testGraphModel],
  ['inspector: a training job\'s curves live, and an evaluation\'s confusion matrix', testTraining],
  ['inspector: explanations side by side, each with its faithfulness scores', testExplanations],
  ['docs: Swagger UI renders /openapi.json without a CDN', testDocs],
];

let failed = 0;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  console.log(`convscope browser tests against ${origin} (Chromium ${browser.version()}); screenshots in ${outDir}`);
  for (const [name, fn] of tests) {
    const t0 = Date.now();
    try {
      const info = await fn();
      console.log(`PASS ${name} (${Date.now() - t0} ms): ${info}`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name} (${Date.now() - t0} ms): ${e instanceof TestFailure ? e.message : e.stack}`);
    }
  }
} catch (e) {
  failed++;
  console.log(`FAIL could not start Chromium: ${e.message}`);
} finally {
  await browser?.close().catch(() => {});
  clearTimeout(globalTimer);
}
console.log(failed ? `FAILED: ${failed} of ${tests.length} test(s)` : `PASSED: all ${tests.length} tests`);
process.exit(failed ? 1 : 0);
