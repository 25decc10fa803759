// Drives the built vlsm page in Debian's headless Chromium and prints what it observed as
// JSON on stdout; the assertions live in the Rust test (native/tests/browser.rs).
//
//   node page.mjs e2e   --dist DIR --model DIR --image FILE --prompt A --prompt B
//                       [--port N] [--cli-link LINK] [--mismatch-link LINK] [--truth MASK]
//                       [--huge IMAGE] [--shots DIR]
//                       [--nifti VOL --nifti-truth LABELS --nifti-link LINK --dicom FILE
//                        --bad-dicom FILE --unsupported-dicom FILE]
//   node page.mjs bench --dist DIR --model DIR --image FILE   (timings, memory; by hand)
//
// It serves DIST at / and the model folder at /models/m/ from 127.0.0.1, logs every request
// (for the privacy check), and never reaches any other host.

import { chromium } from 'playwright-core';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';

function parseArgs(argv) {
  const args = { mode: argv[0], prompt: [] };
  for (let i = 1; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (key === 'prompt') args.prompt.push(argv[i + 1]);
    else args[key] = argv[i + 1];
  }
  return args;
}

const TYPES = {
  '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm',
  '.css': 'text/css', '.png': 'image/png', '.json': 'application/json',
  '.txt': 'text/plain', '.safetensors': 'application/octet-stream',
};

// Extra model folders, by mount: /models/m2/ (--model2), /models/m3/ (--model3),
// /models/m4/ (--model4, a folder whose model.safetensors is not safetensors).
function serve(dist, modelDir, port = 0, extra = {}) {
  const log = [];
  const state = { modelsOffline: false, truncateWeights: false };
  const server = http.createServer((req, res) => {
    let body = 0;
    req.on('data', (c) => { body += c.length; });
    req.on('end', () => {
      const url = new URL(req.url, 'http://x');
      log.push({ method: req.method, path: url.pathname, query: url.search, body });
      let file;
      if (url.pathname.startsWith('/models/endless/')) {
        // A hostile server: any file is an endless stream of bytes without a length.
        res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
        const chunk = Buffer.alloc(1 << 16, 0x20);
        let open = true;
        res.on('close', () => { open = false; });
        const pump = () => { while (open && res.write(chunk)) { /* until the buffer is full */ } if (open) res.once('drain', pump); };
        pump();
        return;
      }
      if (url.pathname.startsWith('/models/m/')) {
        if (state.modelsOffline) { res.writeHead(503); res.end(); return; }
        file = path.join(modelDir, decodeURIComponent(url.pathname.slice('/models/m/'.length)));
      } else if (Object.keys(extra).some((m) => url.pathname.startsWith(`/models/${m}/`))) {
        const mount = url.pathname.split('/')[2];
        file = path.join(extra[mount], decodeURIComponent(url.pathname.slice(`/models/${mount}/`.length)));
      } else {
        file = path.join(dist, decodeURIComponent(url.pathname));
        if (url.pathname.endsWith('/')) file = path.join(file, 'index.html');
      }
      if (!file.startsWith(dist) && !file.startsWith(modelDir) && !Object.values(extra).some((d) => file.startsWith(d))) {
        res.writeHead(403); res.end(); return;
      }
      fs.readFile(file, (err, data) => {
        if (err) { res.writeHead(404); res.end('not found'); return; }
        res.writeHead(200, {
          'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream',
          'content-length': data.length,
          'cache-control': 'no-store',
        });
        if (state.truncateWeights && file.endsWith('.safetensors')) {
          // A connection that dies half-way through the weights.
          res.write(data.subarray(0, data.length >> 1), () => res.socket.destroy());
          return;
        }
        res.end(data);
      });
    });
  });
  return new Promise((resolve) => {
    server.listen(Number(port), '127.0.0.1', () => resolve({ server, log, state, port: server.address().port }));
  });
}

function launch(webgpu = true) {
  const args = [
    '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync',
  ];
  // A software WebGPU adapter (SwiftShader), so the WebGPU path runs without a GPU.
  if (webgpu) args.push('--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-webgpu-adapter=swiftshader');
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args });
}

/// Collects console errors and every request the page (and its worker) makes.
function watch(page, sink) {
  page.on('console', (m) => { if (m.type() === 'error') sink.console.push(m.text()); });
  page.on('pageerror', (e) => sink.console.push(`pageerror: ${e.message}`));
  page.on('request', (r) => sink.requests.push({
    url: r.url(), method: r.method(), body: (r.postDataBuffer() ?? Buffer.alloc(0)).length,
  }));
}

const TIMEOUT = 300_000;

async function waitFor(page, selector) {
  await page.waitForSelector(selector, { timeout: TIMEOUT });
}

async function loadModel(page, url) {
  await page.fill('#weights-url', url);
  await page.click('#load');
  await page.waitForSelector('main[data-model="loaded"], main[data-model="failed"]', { timeout: TIMEOUT });
  return page.getAttribute('main', 'data-model');
}

async function setPrompts(page, prompts) {
  for (let i = 1; i < prompts.length; i++) await page.click('#add-prompt');
  const inputs = await page.$$('input.prompt');
  for (let i = 0; i < prompts.length; i++) await inputs[i].fill(prompts[i]);
}

async function runAndRead(page) {
  await page.click('#run');
  await page.waitForSelector('main[data-run="done"], main[data-run="failed"]', { timeout: TIMEOUT });
  return readResults(page);
}

async function readResults(page) {
  const run = await page.getAttribute('main', 'data-run');
  const fingerprints = await page.$$eval('.card', (cs) => cs.map((c) => c.dataset.fingerprint));
  // How each mask compares with the opened link's record (null: nothing to compare with).
  const agreements = await page.$$eval('.card', (cs) => cs.map((c) => {
    const a = c.querySelector('.agreement');
    return a ? { kind: a.dataset.agreement, text: a.textContent } : null;
  }));
  const timing = await page.$eval('#timing', (t) => ({
    encode_ms: Number(t.dataset.encodeMs), decode_ms: Number(t.dataset.decodeMs),
    prompts: Number(t.dataset.prompts),
  })).catch(() => null);
  const backend = await page.getAttribute('#backend-used', 'data-backend').catch(() => null);
  const error = await page.textContent('#error').catch(() => null);
  return { run, fingerprints, agreements, timing, backend, error };
}

async function errorText(page) {
  await page.waitForSelector('#error', { timeout: 60_000 });
  return page.textContent('#error');
}

// Another model folder (served at /models/MOUNT): loaded on CPU, run, shared, and the link
// reopened on WebGPU.
async function otherModel(browser, base, args, out, mount) {
  const context = await browser.newContext();
  const result = {};
  try {
    const page = await context.newPage();
    watch(page, out);
    await page.goto(`${base}/?backend=cpu`);
    await waitFor(page, '#load');
    result.state = await loadModel(page, `${base}/models/${mount}`);
    result.status = await page.textContent('#model-status');
    result.threshold = await page.inputValue('#threshold');
    if (result.state !== 'loaded') {
      result.error = await page.textContent('#error').catch(() => null);
      return result;
    }
    await page.setInputFiles('#image-file', args.image);
    await waitFor(page, '#image-status');
    await setPrompts(page, args.prompt);
    result.cpu = await runAndRead(page);
    await page.click('#share');
    await waitFor(page, '#share-link');
    result.link = await page.inputValue('#share-link');
    const gpu = await context.newPage();
    watch(gpu, out);
    await gpu.goto(result.link.replace(/^[^#]*/, `${base}/?backend=webgpu`));
    await gpu.waitForSelector('main[data-run="done"], main[data-run="failed"], main[data-model="failed"]', { timeout: TIMEOUT });
    result.webgpu = await readResults(gpu);
    if (args.shots) await gpu.screenshot({ path: path.join(args.shots, `${mount}-webgpu.png`), fullPage: true });
    return result;
  } finally {
    await context.close();
  }
}

async function setRange(page, selector, value) {
  await page.fill(selector, String(value));
  await page.dispatchEvent(selector, 'input');
}

async function clinical(page, args) {
  const r = {};
  await page.setInputFiles('#image-file', args.nifti);
  await waitFor(page, '#clinical');
  r.default_slice = await page.getAttribute('#clinical', 'data-slice');
  r.default_window = await page.getAttribute('#clinical', 'data-window');
  await setRange(page, '#slice', 3);
  await page.waitForSelector('#clinical[data-slice="axial:3"]', { timeout: 60_000 });
  await page.fill('#window', '40,400');
  await page.dispatchEvent('#window', 'change');
  await page.waitForSelector('#clinical[data-window="40,400"]', { timeout: 60_000 });
  await page.setInputFiles('#truth-file', args['nifti-truth']);
  await waitFor(page, '#truth-status');
  r.nifti = await runAndRead(page);
  r.nifti.sha256 = await page.getAttribute('#image-status', 'data-sha256');
  r.nifti.scores = await page.$$eval('.score', (ss) => ss.map((s) => ({ dice: Number(s.dataset.dice) })));
  await page.click('#share');
  await waitFor(page, '#share-link');
  r.nifti.link = await page.inputValue('#share-link');
  if (args.shots) await page.screenshot({ path: path.join(args.shots, 'nifti.png'), fullPage: true });
  // The truth follows the slice; a plane change starts in that plane's middle.
  await setRange(page, '#slice', 4);
  await page.waitForSelector('#clinical[data-slice="axial:4"]', { timeout: 60_000 });
  r.truth_after_slice = await page.textContent('#truth-status');
  r.results_after_slice = await page.$$eval('.card', (cs) => cs.length);
  await page.selectOption('#plane', 'coronal');
  await page.waitForSelector('#clinical[data-slice^="coronal:"]', { timeout: 60_000 });
  r.coronal = await page.getAttribute('#clinical', 'data-slice');
  r.coronal_status = await page.textContent('#image-status');
  await page.selectOption('#window-preset', 'lung');
  await page.waitForSelector('#clinical[data-window="-600,1500"]', { timeout: 60_000 });
  r.preset_window = await page.getAttribute('#clinical', 'data-window');

  await page.setInputFiles('#image-file', args.dicom);
  await page.waitForSelector('#clinical[data-slice="0"]', { timeout: 60_000 });
  r.dicom_has_plane = await page.$('#plane') !== null;
  r.truth_after_dicom = await page.$('#truth-status') !== null;
  await setRange(page, '#slice', 1);
  await page.waitForSelector('#clinical[data-slice="1"]', { timeout: 60_000 });
  r.dicom = await runAndRead(page);
  r.dicom.sha256 = await page.getAttribute('#image-status', 'data-sha256');
  return r;
}

async function e2e(args) {
  const { server, log, state, port } = await serve(path.resolve(args.dist), path.resolve(args.model), args.port ?? 0,
    Object.fromEntries([['m2', args.model2], ['m3', args.model3], ['m4', args.model4]].filter(([, d]) => d).map(([m, d]) => [m, path.resolve(d)])));
  const base = `http://127.0.0.1:${port}`;
  const modelUrl = `${base}/models/m`;
  const out = { base, console: [], requests: [] };
  const browser = await launch();
  try {
    // 0. A download that breaks half-way: a message, no cache entry, and Retry works.
    const broken = await browser.newContext();
    const p0 = await broken.newPage();
    watch(p0, out);
    state.truncateWeights = true;
    await p0.goto(`${base}/?backend=cpu`);
    await waitFor(p0, '#load');
    out.partial_state = await loadModel(p0, modelUrl);
    out.partial_error = await errorText(p0);
    out.partial_cached = await p0.evaluate(async () =>
      (await (await caches.open('vlsm-models-v1')).keys()).map((r) => r.url));
    state.truncateWeights = false;
    out.retry_button = await p0.textContent('#load');
    out.retry_state = await loadModel(p0, modelUrl);
    await broken.close();

    // 1. CPU path: load the model, an image, two prompts; run; share.
    const context = await browser.newContext();
    const page = await context.newPage();
    watch(page, out);
    const t0 = Date.now();
    await page.goto(`${base}/?backend=cpu`);
    await waitFor(page, '#load');
    out.page_ready_ms = Date.now() - t0;
    out.first_model = await loadModel(page, modelUrl);
    out.first_load_ms = Date.now() - t0;
    out.weights_sha256 = await page.textContent('#weights-sha256').catch(() => null);
    await page.setInputFiles('#image-file', args.image);
    await waitFor(page, '#image-status');
    await setPrompts(page, args.prompt);
    out.cpu = await runAndRead(page);
    // Threshold and opacity update live, without rerunning the model.
    const before = log.length;
    await page.fill('#threshold', '0.9');
    await page.dispatchEvent('#threshold', 'input');
    out.cpu_threshold_09 = await page.$$eval('.card', (cs) => cs.map((c) => c.dataset.fingerprint));
    await page.fill('#threshold', '0.5');
    await page.dispatchEvent('#threshold', 'input');
    out.requests_during_slider = log.length - before;
    await page.click('#share');
    await waitFor(page, '#share-link');
    out.share_link = await page.inputValue('#share-link');
    // A ground-truth mask: Dice and IoU per prompt.
    if (args.truth) {
      await page.setInputFiles('#truth-file', args.truth);
      await waitFor(page, '.score');
      out.scores = await page.$$eval('.score', (ss) => ss.map((s) => ({
        dice: Number(s.dataset.dice), iou: Number(s.dataset.iou) })));
    }
    if (args.shots) await page.screenshot({ path: path.join(args.shots, 'cpu.png'), fullPage: true });

    // 1b. A NIfTI volume: slice and window chosen on the page, a label volume as the truth
    // (it follows the slice), run and share; then a multi-frame DICOM file's second frame.
    if (args.nifti) out.clinical = await clinical(page, args);

    // 2. Second visit: the model comes from Cache Storage although the server refuses it.
    state.modelsOffline = true;
    await page.goto(`${base}/?backend=cpu`);
    await waitFor(page, '#load');
    out.offline_model = await loadModel(page, modelUrl);
    out.offline_status = await page.textContent('#model-status');
    state.modelsOffline = false;

    // 3. The share link in a fresh browser context (empty cache): restores and reruns.
    const fresh = await browser.newContext();
    const linked = await fresh.newPage();
    watch(linked, out);
    await linked.goto(out.share_link.replace(/^[^#]*/, `${base}/?backend=cpu`));
    await linked.waitForSelector('main[data-run="done"], main[data-run="failed"]', { timeout: TIMEOUT });
    out.link_cpu = await readResults(linked);
    out.link_prompts = await linked.$$eval('input.prompt', (is) => is.map((i) => i.value));
    if (args.shots) await linked.screenshot({ path: path.join(args.shots, 'link.png'), fullPage: true });

    // 4. The same link on WebGPU (SwiftShader here).
    const gpuPage = await fresh.newPage();
    watch(gpuPage, out);
    await gpuPage.goto(out.share_link.replace(/^[^#]*/, `${base}/?backend=webgpu`));
    await gpuPage.waitForSelector('main[data-run="done"], main[data-run="failed"], main[data-model="failed"]', { timeout: TIMEOUT });
    out.link_webgpu = await readResults(gpuPage);
    if (args.shots) await gpuPage.screenshot({ path: path.join(args.shots, 'webgpu.png'), fullPage: true });

    // 5. The CLI's own link (vlsm share) opened in the page.
    if (args['cli-link']) {
      const cliPage = await fresh.newPage();
      watch(cliPage, out);
      const link = args['cli-link'].replace(/^[^#]*/, `${base}/?backend=cpu`);
      await cliPage.goto(link);
      await cliPage.waitForSelector('main[data-run="done"], main[data-run="failed"]', { timeout: TIMEOUT });
      out.cli_link_cpu = await readResults(cliPage);
    }

    // 5a. A CLI link to a NIfTI slice, without the volume: the page asks for the file, then
    // shows the link's slice and window and reruns.
    if (args['nifti-link']) {
      const np = await fresh.newPage();
      watch(np, out);
      await np.goto(args['nifti-link'].replace(/^[^#]*/, `${base}/?backend=cpu`));
      await waitFor(np, '#info');
      out.nifti_link_info = await np.textContent('#info');
      await np.waitForSelector('main[data-model="loaded"]', { timeout: TIMEOUT });
      await np.setInputFiles('#image-file', args.nifti);
      await np.waitForSelector('main[data-run="done"], main[data-run="failed"]', { timeout: TIMEOUT });
      out.nifti_link = await readResults(np);
      out.nifti_link.slice = await np.getAttribute('#clinical', 'data-slice');
      out.nifti_link.window = await np.getAttribute('#clinical', 'data-window');
    }

    // 5b. A link whose weights hash differs from the weights at its URL: said, not hidden.
    if (args['mismatch-link']) {
      const mm = await fresh.newPage();
      watch(mm, out);
      await mm.goto(args['mismatch-link'].replace(/^[^#]*/, `${base}/?backend=cpu`));
      await mm.waitForSelector('main[data-run="done"], main[data-run="failed"]', { timeout: TIMEOUT });
      out.mismatch_info = await mm.textContent('#info').catch(() => null);
    }

    // 5c. Another model family (a BiomedCLIPSeg-D folder): CPU run, share, the link on WebGPU.
    if (args.model2) out.model2 = await otherModel(browser, base, args, out, 'm2');
    if (args.model3) out.model3 = await otherModel(browser, base, args, out, 'm3');

    // 6. Bad input gets a message, not a crash.
    const bad = await fresh.newPage();
    watch(bad, out);
    out.bad = {};
    await bad.goto(`${base}/?backend=cpu#vlsm=1.this-is-not-a-link`);
    out.bad.malformed_link = await errorText(bad);
    await bad.goto(`${base}/?backend=cpu#${out.share_link.split('#')[1].slice(0, 60)}`);
    await bad.reload();
    out.bad.truncated_link = await errorText(bad);
    await bad.goto(`${base}/?backend=cpu`);
    await waitFor(bad, '#load');
    out.bad.wrong_weights_state = await loadModel(bad, `${base}/models/nothing-here`);
    out.bad.wrong_weights = await errorText(bad);
    await bad.goto(`${base}/?backend=cpu`);
    await waitFor(bad, '#load');
    await loadModel(bad, `${base}/models/endless`);
    out.bad.endless_weights = await errorText(bad);
    if (args.model4) {
      await bad.goto(`${base}/?backend=cpu`);
      await waitFor(bad, '#load');
      out.bad.not_weights_state = await loadModel(bad, `${base}/models/m4`);
      out.bad.not_weights = await errorText(bad);
      out.bad.not_weights_cached = await bad.evaluate(async () =>
        (await (await caches.open('vlsm-models-v1')).keys()).map((r) => r.url));
    }
    await bad.setInputFiles('#image-file', { name: 'notes.png', mimeType: 'image/png', buffer: Buffer.from('this is not an image') });
    out.bad.not_an_image = await errorText(bad);
    if (args['bad-dicom']) {
      await bad.setInputFiles('#image-file', args['bad-dicom']);
      await bad.waitForFunction(() => /DICOM/.test(document.querySelector('#error')?.textContent ?? ''), null, { timeout: 60_000 });
      out.bad.bad_dicom = await bad.textContent('#error');
      await bad.setInputFiles('#image-file', args['unsupported-dicom']);
      await bad.waitForFunction(() => /unsupported/.test(document.querySelector('#error')?.textContent ?? ''), null, { timeout: 60_000 });
      out.bad.unsupported_dicom = await bad.textContent('#error');
    }
    if (args.huge) {
      await bad.setInputFiles('#image-file', args.huge);
      await bad.waitForFunction(() => /too large/.test(document.querySelector('#error')?.textContent ?? ''), null, { timeout: 60_000 });
      out.bad.huge_image = await bad.textContent('#error');
    }
    out.bad.alive = await bad.evaluate(() => document.querySelector('#load') !== null);
    await fresh.close();
    await context.close();
  } finally {
    await browser.close();
  }
  // 7. A browser without WebGPU: Auto falls back to the CPU and says why.
  const plain = await launch(false);
  try {
    const p = await (await plain.newContext()).newPage();
    watch(p, out);
    await p.goto(`${base}/`);
    await waitFor(p, '#load');
    out.no_webgpu_state = await loadModel(p, modelUrl);
    out.no_webgpu_backend = await p.getAttribute('#backend-used', 'data-backend');
    out.no_webgpu_note = await p.textContent('#backend-note').catch(() => null);
  } finally {
    await plain.close();
    server.close();
  }
  out.server_log = log;
  return out;
}

/// The largest resident memory (kB) of Chromium's renderer processes now (`field`: VmRSS,
/// or VmHWM, which Chromium resets from time to time, so it is sampled rather than read once).
function rendererKb(field = 'VmRSS') {
  let peak = 0;
  for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!cmd.includes('--type=renderer')) continue;
      const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(new RegExp(`${field}:\\s+(\\d+)`));
      if (m) peak = Math.max(peak, Number(m[1]));
    } catch { /* process ended */ }
  }
  return peak;
}

/// Samples the renderers' memory every 200 ms until stopped; `stop()` gives the peak (kB),
/// `stop(false)` the peak so far without stopping.
function sampleRendererMemory() {
  let peak = 0;
  const take = () => { peak = Math.max(peak, rendererKb('VmRSS'), rendererKb('VmHWM')); };
  const timer = setInterval(take, 200);
  return (stop = true) => { if (stop) clearInterval(timer); take(); return peak; };
}

async function bench(args) {
  const { server, port } = await serve(path.resolve(args.dist), path.resolve(args.model));
  const base = `http://127.0.0.1:${port}`;
  const out = { console: [], requests: [] };
  const browser = await launch();
  const stopSampling = sampleRendererMemory();
  try {
    const page = await (await browser.newContext()).newPage();
    watch(page, out);
    const t0 = Date.now();
    await page.goto(`${base}/?backend=${args.backend ?? 'cpu'}`);
    await waitFor(page, '#load');
    out.model = await loadModel(page, `${base}/models/m`);
    out.load_ms = Date.now() - t0;
    out.renderer_peak_load_mb = stopSampling(false) / 1024;
    out.status = await page.textContent('#model-status');
    await page.setInputFiles('#image-file', args.image);
    await waitFor(page, '#image-status');
    await setPrompts(page, ['polyp']);
    out.one = await runAndRead(page);
    out.one_again = await runAndRead(page);
    await setPrompts(page, Array.from({ length: 10 }, (_, i) => `prompt number ${i}`).slice(0, 10));
    out.ten = await runAndRead(page);
    out.renderer_peak_mb = stopSampling() / 1024;
  } finally {
    stopSampling();
    await browser.close();
    server.close();
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const result = args.mode === 'bench' ? await bench(args) : await e2e(args);
process.stdout.write(JSON.stringify(result, null, 1) + '\n');
