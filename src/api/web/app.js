// The vqclip page: a form, a live view of a job, a gallery. Plain JS, no build step.
// Every call goes to this server's /v1 API with the key kept in local storage, so the
// page sees exactly what that key may see.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORE = 'vqclip.api_key';
const AUGMENTS = ['Ji', 'Sh', 'Gn', 'Pe', 'Ro', 'Af', 'Et', 'Ts', 'Cr', 'Er', 'Re'];
const DEFAULT_AUGMENTS = ['Af', 'Pe', 'Ji', 'Er'];
const TERMINAL = ['succeeded', 'failed', 'canceled'];

let config = null;
// Everything tied to the view on screen; left when the view changes.
let view = { abort: new AbortController(), blobs: [] };

function apiKey() { return localStorage.getItem(KEY_STORE) || ''; }

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

class Problem extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || ('HTTP ' + status));
    this.status = status;
    this.body = body || {};
  }
}

async function api(path, options) {
  const opts = Object.assign({ signal: view.abort.signal }, options || {});
  opts.headers = authHeaders(opts.headers);
  const res = await fetch(path, opts);
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not problem+json */ }
    if (res.status === 401) showKeyBox(true);
    throw new Problem(res.status, body);
  }
  return res;
}

async function json(path, options) { return (await api(path, options)).json(); }

// <img> and <video> cannot send the Authorization header; fetch and hand them a blob.
async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  view.blobs.push(url);
  return url;
}

function banner(text) {
  const b = $('banner');
  b.textContent = text || '';
  b.hidden = !text;
}

function showKeyBox(show) {
  $('key-box').hidden = !show;
}

function leaveView() {
  view.abort.abort();
  view.blobs.forEach((u) => URL.revokeObjectURL(u));
  view = { abort: new AbortController(), blobs: [] };
}

function show(name) {
  for (const v of ['new', 'job', 'jobs']) $('view-' + v).hidden = v !== name;
  document.querySelectorAll('[data-nav]').forEach((a) => {
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  });
}

function ignoreAbort(e) {
  if (e && e.name === 'AbortError') return;
  banner(e instanceof Problem ? e.message : 'The server could not be reached: ' + e.message);
}

// ---------------------------------------------------------------- the form

function option(value, text, selected) {
  const o = document.createElement('option');
  o.value = value;
  o.textContent = text || value;
  o.selected = !!selected;
  return o;
}

function fillModels() {
  const m = config.models;
  const vq = $('f-vqgan');
  const clip = $('f-clip');
  vq.replaceChildren();
  clip.replaceChildren();
  const vqNames = m.vqgan.includes(m.default_vqgan) ? m.vqgan : [m.default_vqgan].concat(m.vqgan);
  vqNames.forEach((n) => vq.append(option(n, n === m.default_vqgan ? n + ' (default)' : n, n === m.default_vqgan)));
  const clipNames = m.default_clip.filter((n) => !m.clip.includes(n)).concat(m.clip);
  clipNames.forEach((n) => clip.append(option(n, m.default_clip.includes(n) ? n + ' (default)' : n, m.default_clip.includes(n))));
}

function fillAugments() {
  const box = $('augments');
  box.replaceChildren();
  for (const a of AUGMENTS) {
    const id = 'f-aug-' + a;
    const input = document.createElement('input');
    Object.assign(input, { type: 'checkbox', id, value: a, name: 'augments', checked: DEFAULT_AUGMENTS.includes(a) });
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = a;
    const span = document.createElement('span');
    span.className = 'aug';
    span.append(input, label);
    box.append(span);
  }
}

function clearErrors() {
  document.querySelectorAll('#job-form .error').forEach((e) => { e.hidden = true; e.textContent = ''; });
  document.querySelectorAll('#job-form [aria-invalid]').forEach((e) => e.removeAttribute('aria-invalid'));
}

// The problem's `field` (e.g. `width`, `models.clip`, `image_prompts[0].image`) names
// the input; the detail goes next to the closest one the form has.
function showError(field, detail) {
  for (const key of fieldCandidates(field || '')) {
    const box = document.getElementById('err-' + key);
    if (!box) continue;
    box.textContent = detail;
    box.hidden = false;
    const input = document.querySelector('#job-form [data-field="' + key + '"]');
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      const details = input.closest('details');
      if (details) details.open = true;
      if (input.focus) input.focus();
    }
    return;
  }
  const box = $('form-error');
  box.textContent = detail;
  box.hidden = false;
}

// `image_prompts[0].image` -> itself, `image_prompts[0]`, `image_prompts`.
function fieldCandidates(field) {
  const out = [];
  let k = field;
  while (k) {
    out.push(k);
    const shorter = k.replace(/(\[\d+\]|\.[^.[]*)$/, '');
    if (shorter === k) break;
    k = shorter;
  }
  return out;
}

function number(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

async function upload(file) {
  const body = new FormData();
  body.append('file', file);
  const res = await json('/v1/uploads', { method: 'POST', body });
  return res.ref;
}

async function specFromForm() {
  const spec = {
    prompts: $('f-prompts').value,
    width: number('f-width'),
    height: number('f-height'),
    steps: number('f-steps'),
    seed: number('f-seed'),
    save_every: number('f-save_every'),
    cutn: number('f-cutn'),
    cut_pow: number('f-cut_pow'),
    cut_method: $('f-cut_method').value,
    optimizer: $('f-optimizer').value,
    lr: number('f-lr'),
    augments: Array.from(document.querySelectorAll('#augments input:checked')).map((i) => i.value),
    init_weight: number('f-init_weight'),
    change_prompt_every: number('f-change_prompt_every'),
    video: { enabled: $('f-video').checked, fps: number('f-fps') },
    models: {
      vqgan: $('f-vqgan').value,
      clip: Array.from($('f-clip').selectedOptions).map((o) => o.value),
    },
  };
  if ($('f-zoom').checked) {
    spec.zoom = {
      start: number('f-zoom_start'), every: number('f-zoom_every'), scale: number('f-zoom_scale'),
      shift_x: number('f-zoom_shift_x'), shift_y: number('f-zoom_shift_y'),
    };
  }
  const init = $('f-init_image').files[0];
  if (init) {
    try { spec.init_image = await upload(init); } catch (e) { throw fieldProblem(e, 'init_image'); }
  }
  const images = Array.from($('f-image_prompts').files);
  if (images.length) {
    spec.image_prompts = [];
    for (const f of images) {
      try { spec.image_prompts.push({ image: await upload(f) }); } catch (e) { throw fieldProblem(e, 'image_prompts'); }
    }
  }
  return JSON.parse(JSON.stringify(spec)); // drops the fields left empty
}

// An upload's refusal belongs next to its file field.
function fieldProblem(e, field) {
  if (e instanceof Problem && !e.body.field) e.body.field = field;
  return e;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  banner('');
  const button = $('submit');
  button.disabled = true;
  try {
    const spec = await specFromForm();
    const job = await json('/v1/jobs', {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': crypto.randomUUID() },
      body: JSON.stringify(spec),
    });
    location.hash = '#/jobs/' + job.id;
  } catch (e) {
    if (e instanceof Problem) showError(e.body.field, e.message);
    else ignoreAbort(e);
  } finally {
    button.disabled = false;
  }
}

// "Render again": the stored spec, seed included, back into the form.
function fillForm(spec, seed) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  const prompts = typeof spec.prompts === 'string' ? spec.prompts
    : (spec.prompts || []).map((p) => [p.text, p.weight, p.stop].filter((x) => x !== undefined && x !== null).join(':')).join(' | ');
  set('f-prompts', prompts);
  ['width', 'height', 'steps', 'save_every', 'cutn', 'cut_pow', 'cut_method', 'optimizer', 'lr', 'init_weight', 'change_prompt_every']
    .forEach((k) => set('f-' + k, spec[k]));
  set('f-seed', seed !== undefined && seed !== null ? seed : spec.seed);
  if (spec.augments) document.querySelectorAll('#augments input').forEach((i) => { i.checked = spec.augments.includes(i.value); });
  if (spec.video) { $('f-video').checked = spec.video.enabled !== false; set('f-fps', spec.video.fps); }
  $('f-zoom').checked = !!spec.zoom;
  if (spec.zoom) {
    ['start', 'every', 'scale', 'shift_x', 'shift_y'].forEach((k) => set('f-zoom_' + k, spec.zoom[k]));
  }
  if (spec.models) {
    if (spec.models.vqgan) {
      if (![...$('f-vqgan').options].some((o) => o.value === spec.models.vqgan)) $('f-vqgan').append(option(spec.models.vqgan));
      $('f-vqgan').value = spec.models.vqgan;
    }
    if (spec.models.clip) {
      for (const n of spec.models.clip) {
        if (![...$('f-clip').options].some((o) => o.value === n)) $('f-clip').append(option(n));
      }
      [...$('f-clip').options].forEach((o) => { o.selected = spec.models.clip.includes(o.value); });
    }
  }
  if (spec.init_image || spec.image_prompts) banner('Init and prompt images are not carried over; choose them again.');
}

// ---------------------------------------------------------------- a job

function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return '–';
  if (s < 60) return Math.round(s) + ' s';
  const m = Math.floor(s / 60);
  return m + ' min ' + Math.round(s - 60 * m) + ' s';
}

function promptText(spec) {
  if (!spec) return '';
  if (typeof spec.prompts === 'string') return spec.prompts;
  return (spec.prompts || []).map((p) => p.text).join(' | ');
}

function setState(state) {
  const s = $('job-state');
  s.textContent = state;
  s.dataset.state = state;
  $('job-cancel').hidden = TERMINAL.includes(state);
  $('job-steer').hidden = TERMINAL.includes(state);
  if (state !== 'queued') $('job-queue').hidden = true;
}

// PATCH: the new prompts take effect at the job's next step boundary.
function steerEditor(id, spec) {
  $('job-steer-prompts').value = promptText(spec);
  $('job-steer-note').textContent = '';
  $('job-steer').onsubmit = async (event) => {
    event.preventDefault();
    $('job-steer-apply').disabled = true;
    try {
      const r = await json('/v1/jobs/' + id, {
        method: 'PATCH',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompts: $('job-steer-prompts').value }),
      });
      $('job-steer-note').textContent = 'Revision ' + r.revision + ' takes effect at the next step.';
      $('job-prompts').textContent = $('job-steer-prompts').value;
      view.promptNames = promptNames(Object.assign({}, spec, { prompts: $('job-steer-prompts').value }));
    } catch (e) {
      ignoreAbort(e);
      if (e instanceof Problem) $('job-steer-note').textContent = e.message;
    } finally { $('job-steer-apply').disabled = false; }
  };
}

// A new job from the frame on screen, with this job's settings at that step.
async function forkFrom(id, step) {
  $('job-fork').disabled = true;
  try {
    const child = await json('/v1/jobs/' + id + '/fork', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ from_step: step }),
    });
    location.hash = '#/jobs/' + child.id;
  } catch (e) {
    ignoreAbort(e);
    if (e instanceof Problem) $('job-fork-note').textContent = e.message;
    $('job-fork').disabled = false;
  }
}

function showProgress(p) {
  if (!p || !p.total) return;
  $('job-progress-box').hidden = false;
  $('job-step').textContent = p.step;
  $('job-total').textContent = p.total;
  $('job-progress').max = p.total;
  $('job-progress').value = p.step;
  $('job-eta').textContent = fmtSeconds(p.eta_seconds);
  if (Array.isArray(p.losses)) {
    const rows = p.losses.map((l, i) => {
      const tr = document.createElement('tr');
      const th = document.createElement('th');
      th.scope = 'row';
      th.textContent = lossName(i, p.losses.length);
      const td = document.createElement('td');
      td.textContent = l === null ? '–' : Number(l).toFixed(4);
      tr.append(th, td);
      return tr;
    });
    $('job-losses').replaceChildren(...rows);
  }
}

// The losses come one per prompt (text, image, noise), then the z regulariser when
// the job has one; the names are the prompts of the job on screen.
function lossName(i, count) {
  const names = view.promptNames || [];
  if (i < names.length) return names[i];
  if (count === names.length + 1 && i === count - 1) return 'z regulariser';
  return 'prompt ' + (i + 1);
}

function promptNames(spec) {
  if (!spec) return [];
  let texts;
  if (typeof spec.prompts === 'string') {
    // generate.py syntax: `text:weight:stop | ...`, story phrases after `^`.
    const phrase = spec.prompts.split('^')[0];
    texts = phrase.split('|').map((p) => p.trim().replace(/(:-?[\d.]+){1,2}$/, '')).filter(Boolean);
  } else {
    texts = (spec.prompts || []).map((p) => p.text);
  }
  return texts
    .concat((spec.image_prompts || []).map((_, i) => 'image ' + (i + 1)))
    .concat((spec.noise_prompts || []).map((p) => 'noise ' + p.seed));
}

let frameLoading = Promise.resolve();
function showFrame(url, caption) {
  // Frames arrive faster than a slow link loads them; keep the order, drop nothing.
  frameLoading = frameLoading.then(async () => {
    try {
      const src = await blobUrl(url);
      $('job-image').src = src;
      $('job-caption').textContent = caption;
    } catch (e) { ignoreAbort(e); }
  });
  return frameLoading;
}

// Server-Sent Events read with fetch, so that the Authorization header goes along
// (EventSource cannot send it). A dropped connection resumes after the last event id.
async function followEvents(id, handlers) {
  const signal = view.abort.signal;
  let lastId = null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers = { Accept: 'text/event-stream' };
      if (lastId !== null) headers['Last-Event-ID'] = lastId;
      const res = await api('/v1/jobs/' + id + '/events', { headers, signal });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let ended = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        delay = 500;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, '');
          const ev = { event: 'message', data: '' };
          for (const line of block.split(/\r?\n/)) {
            if (line.startsWith(':')) continue;
            const i = line.indexOf(':');
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
            if (field === 'id') ev.id = val;
            else if (field === 'event') ev.event = val;
            else if (field === 'data') ev.data += (ev.data ? '\n' : '') + val;
          }
          if (ev.id !== undefined) lastId = ev.id;
          if (!ev.data) continue;
          let data = {};
          try { data = JSON.parse(ev.data); } catch (_) { continue; }
          if (handlers[ev.event]) handlers[ev.event](data);
          if (['completed', 'failed', 'canceled'].includes(ev.event)) ended = true;
        }
      }
      // The server ends the stream after the terminal event; any other end is a drop.
      if (ended) return;
      const job = await json('/v1/jobs/' + id);
      if (TERMINAL.includes(job.state)) { handlers.end && handlers.end(job); return; }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof Problem && e.status < 500 && e.status !== 429) { ignoreAbort(e); return; }
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 8000);
  }
}

// While queued the stream has nothing to say; the position comes from the job itself.
async function pollPosition(id) {
  const current = view;
  if (current.polling) return;
  current.polling = true;
  try {
    await pollUntilClaimed(id, current.abort.signal);
  } finally {
    current.polling = false;
  }
}

async function pollUntilClaimed(id, signal) {
  while (!signal.aborted) {
    try {
      const job = await json('/v1/jobs/' + id);
      if (job.state !== 'queued') return;
      $('job-queue').hidden = false;
      $('job-position').textContent = job.position === null ? '–' : job.position;
    } catch (e) { ignoreAbort(e); return; }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function showResults(job) {
  $('job-results').hidden = false;
  const links = job.links || {};
  try {
    if (links.image) await showFrame(links.image, 'Final image');
    const frames = (await json('/v1/jobs/' + job.id + '/frames')).frames || [];
    const scrub = $('job-scrub');
    scrub.max = Math.max(frames.length - 1, 0);
    scrub.value = scrub.max;
    $('job-scrub-step').textContent = frames.length ? 'step ' + frames[frames.length - 1].step : 'none';
    scrub.disabled = frames.length < 2;
    $('job-fork').disabled = frames.length === 0;
    $('job-fork').onclick = () => {
      const f = frames[Number(scrub.value)];
      if (f) forkFrom(job.id, f.step);
    };
    scrub.oninput = () => {
      const f = frames[Number(scrub.value)];
      if (!f) return;
      $('job-scrub-step').textContent = 'step ' + f.step;
      showFrame(f.url, 'Frame at step ' + f.step);
    };
    if (links.video) {
      try {
        $('job-video').src = await blobUrl(links.video);
        $('job-video').hidden = false;
        $('job-video-title').hidden = false;
      } catch (e) { if (!(e instanceof Problem && e.status === 404)) throw e; }
    }
    if (links.metadata) {
      const meta = await json(links.metadata);
      $('job-metadata').textContent = JSON.stringify(meta, null, 2);
    }
  } catch (e) { ignoreAbort(e); }
}

async function jobView(id) {
  show('job');
  ['job-image'].forEach((i) => $(i).removeAttribute('src'));
  $('job-caption').textContent = '';
  $('job-id').textContent = id;
  $('job-error').hidden = true;
  $('job-results').hidden = true;
  $('job-video').hidden = true;
  $('job-video-title').hidden = true;
  $('job-progress-box').hidden = true;
  $('job-queue').hidden = true;
  $('job-again').hidden = true;
  $('job-metadata').textContent = '';
  let job;
  try { job = await json('/v1/jobs/' + id); } catch (e) {
    $('job-title').textContent = 'Job not found';
    setState('–');
    ignoreAbort(e);
    return;
  }
  $('job-title').textContent = 'Job';
  setState(job.state);
  $('job-prompts').textContent = promptText(job.spec);
  view.promptNames = promptNames(job.spec);
  $('job-seed').textContent = job.seed === null || job.seed === undefined ? '–' : job.seed;
  // The prompts in force: the latest revision that changed them, else the spec's.
  const steered = (job.revisions || []).filter((r) => r.changes.prompts !== undefined).pop();
  const current = Object.assign({}, job.spec, steered ? { prompts: steered.changes.prompts } : {});
  view.promptNames = promptNames(current);
  $('job-prompts').textContent = promptText(current);
  steerEditor(id, current);
  $('job-fork-note').textContent = job.parent ? 'Forked from step ' + job.parent.step + ' of job ' + job.parent.id : '';
  showProgress(job.progress);
  $('job-again').hidden = false;
  $('job-again').onclick = () => { location.hash = '#/'; setTimeout(() => fillForm(job.spec || {}, job.seed), 0); };
  $('job-cancel').onclick = async () => {
    $('job-cancel').disabled = true;
    try {
      const after = await json('/v1/jobs/' + id + '/cancel', { method: 'POST' });
      setState(after.cancel_requested && after.state === 'running' ? 'canceling' : after.state);
    } catch (e) { ignoreAbort(e); } finally { $('job-cancel').disabled = false; }
  };
  if (TERMINAL.includes(job.state)) {
    finish(job);
    return;
  }
  if (job.state === 'queued') pollPosition(id);
  const frames = await json('/v1/jobs/' + id + '/frames').catch(() => ({ frames: [] }));
  const last = (frames.frames || []).slice(-1)[0];
  if (last) showFrame(last.url, 'Step ' + last.step);
  followEvents(id, {
    state: (d) => { if (d.state) setState(d.state); if (d.state === 'queued') pollPosition(id); },
    progress: (d) => { setState('running'); showProgress(d); },
    frame: (d) => showFrame(d.url, 'Step ' + d.step),
    completed: () => refreshFinished(id),
    failed: () => refreshFinished(id),
    canceled: () => refreshFinished(id),
    end: (j) => finish(j),
  });
}

async function refreshFinished(id) {
  try { finish(await json('/v1/jobs/' + id)); } catch (e) { ignoreAbort(e); }
}

function finish(job) {
  setState(job.state);
  showProgress(job.progress);
  if (job.error) {
    $('job-error').textContent = job.error;
    $('job-error').hidden = false;
  }
  if (job.state === 'succeeded') showResults(job);
}

// ---------------------------------------------------------------- the gallery

async function galleryView() {
  show('jobs');
  $('gallery').replaceChildren();
  $('jobs-empty').hidden = true;
  await galleryPage(null);
}

async function galleryPage(cursor) {
  const more = $('gallery-more');
  more.hidden = true;
  let page;
  try {
    page = await json('/v1/jobs?limit=12' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : ''));
  } catch (e) { ignoreAbort(e); return; }
  if (!cursor && page.jobs.length === 0) $('jobs-empty').hidden = false;
  for (const job of page.jobs) $('gallery').append(galleryItem(job));
  if (page.next_cursor) {
    more.hidden = false;
    more.onclick = () => galleryPage(page.next_cursor);
  }
}

function galleryItem(job) {
  const li = document.createElement('li');
  li.className = 'card';
  li.dataset.job = job.id;
  li.dataset.state = job.state;
  const a = document.createElement('a');
  a.href = '#/jobs/' + job.id;
  const img = document.createElement('img');
  img.alt = '';
  img.width = 160;
  img.height = 160;
  const text = document.createElement('span');
  text.className = 'card-text';
  const state = document.createElement('span');
  state.className = 'state';
  state.dataset.state = job.state;
  state.textContent = job.state;
  const prompt = document.createElement('span');
  prompt.className = 'prompt';
  const seed = document.createElement('span');
  seed.className = 'seed';
  seed.textContent = 'seed ' + (job.seed === null || job.seed === undefined ? '–' : job.seed);
  text.append(state, prompt, seed);
  a.append(img, text);
  li.append(a);
  // The list leaves out specs; each card asks for its own, and its thumbnail.
  json('/v1/jobs/' + job.id).then((full) => {
    prompt.textContent = promptText(full.spec);
    img.alt = prompt.textContent;
    if (full.links && full.links.image) return blobUrl(full.links.image).then((u) => { img.src = u; });
    return json('/v1/jobs/' + job.id + '/frames').then((f) => {
      const last = (f.frames || []).slice(-1)[0];
      if (last) return blobUrl(last.url).then((u) => { img.src = u; });
      return undefined;
    });
  }).catch(ignoreAbort);
  return li;
}

// ---------------------------------------------------------------- start

function route() {
  leaveView();
  banner('');
  const hash = location.hash || '#/';
  const m = hash.match(/^#\/jobs\/([0-9a-fA-F-]{36})$/);
  if (m) jobView(m[1]);
  else if (hash === '#/jobs') galleryView();
  else show('new');
}

async function start() {
  $('api-key').value = apiKey();
  $('key-save').onclick = () => {
    const k = $('api-key').value.trim();
    if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
    route();
  };
  $('api-key').addEventListener('keydown', (e) => { if (e.key === 'Enter') $('key-save').click(); });
  $('job-form').addEventListener('submit', submit);
  fillAugments();
  try {
    config = await (await fetch('/ui/config.json')).json();
  } catch (e) {
    banner('The server could not be reached: ' + e.message);
    config = { keys: false, models: { vqgan: [], clip: [], default_vqgan: '', default_clip: [] }, limits: {} };
  }
  fillModels();
  showKeyBox(config.keys || !!apiKey());
  window.addEventListener('hashchange', route);
  route();
}

document.addEventListener('DOMContentLoaded', start);
