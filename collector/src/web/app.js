// logvault web page. Plain JS, no build step, served under a strict CSP
// (script-src 'self', no inline code). Every piece of log data reaches the
// DOM through text nodes only: never innerHTML, never an HTML string.
'use strict';

const TOKEN_KEY = 'logvault.token'; // sessionStorage: gone when the tab closes
const PAGE_SIZE = 100;
const TAIL_MAX_ROWS = 1000;
const CONTEXT_LINES = 10;
const SSE_MAX_LINE = 1 << 20; // a runaway event must not grow memory forever

const $ = (id) => document.getElementById(id);
const state = {
  token: null,
  search: null,   // AbortController of the running search + aggregate
  params: null,   // {q, from, to, order} of the shown results; resent with the cursor
  cursor: null,
  shown: new Set(), // ids on screen, so a hit found by both search and tail shows once
  histogram: null,  // last aggregate answer, redrawn on resize
  tail: null,     // AbortController of the live tail
  tailQueue: [],  // tail hits waiting for the next animation frame
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---------- small DOM helpers ----------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) appendEscaped(node, String(text));
  return node;
}

// Control characters (C0, DEL, C1) and bidi overrides are shown as escapes
// such as \x1b in a styled span, so a terminal sequence or a "Trojan Source"
// override in a log line can neither act nor hide what the line says.
const UNSAFE_CHARS = /[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const NAMED_ESCAPES = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function escapeChar(c) {
  if (NAMED_ESCAPES[c]) return NAMED_ESCAPES[c];
  const code = c.charCodeAt(0);
  return code < 0x100 ? '\\x' + code.toString(16).padStart(2, '0') : '\\u{' + code.toString(16) + '}';
}

function appendEscaped(parent, text) {
  let last = 0;
  for (const m of text.matchAll(UNSAFE_CHARS)) {
    parent.append(text.slice(last, m.index)); // append(string) makes a text node
    const esc = document.createElement('span');
    esc.className = 'esc';
    esc.textContent = escapeChar(m[0]);
    parent.append(esc);
    last = m.index + 1;
  }
  parent.append(text.slice(last));
}

// '2026-11-24T10:00:00.123Z' -> '2026-11-24 10:00:00.123' (always UTC, like the API)
function fmtTime(value, withMs = true) {
  const d = new Date(value);
  if (value === undefined || value === null || isNaN(d)) return String(value ?? '');
  const s = d.toISOString().replace('T', ' ').replace('Z', '');
  return withMs ? s : s.slice(0, 19);
}

const fmtCount = (n) => new Intl.NumberFormat('en-US').format(n);

// ---------- API ----------

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  return q.toString();
}

async function readError(res) {
  let code = 'http_' + res.status;
  let message = res.statusText || 'request failed';
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_) { /* not JSON (e.g. a proxy page): keep the status text */ }
  const retry = res.headers.get('Retry-After');
  if (res.status === 429 && retry) message += ` (retry after ${retry} s)`;
  return new ApiError(res.status, code, message);
}

async function api(path, { body, signal, accept = 'application/json' } = {}) {
  const headers = { Authorization: 'Bearer ' + state.token, Accept: accept };
  if (body) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method: body ? 'POST' : 'GET', headers, signal, cache: 'no-store',
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!res.ok) throw await readError(res);
  return accept === 'application/json' ? res.json() : res;
}

// One place decides where an error is shown. Returns true if it was handled.
function showError(err) {
  if (err.name === 'AbortError') return true; // superseded by a newer request
  if (err.status === 401) {
    signOut('Signed out: ' + err.message);
    return true;
  }
  if (err.code === 'bad_query' || err.code === 'bad_request') {
    $('query-error').textContent = err.message;
    return true;
  }
  $('error').textContent = err instanceof ApiError ? `${err.message} (${err.code})` : 'Network error: ' + err.message;
  $('error').hidden = false;
  return true;
}

function clearErrors() {
  $('query-error').textContent = '';
  $('error').hidden = true;
}

// ---------- sign-in ----------

// Shows who the token names. Decoded for display only: the server verifies it.
function describeToken(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part));
    const tenants = claims.tenants ? claims.tenants.join(',') : claims.tenant;
    return [claims.sub, claims.role, tenants].filter(Boolean).join(' · ');
  } catch (_) {
    return '';
  }
}

async function signIn(token) {
  token = token.trim().replace(/^Bearer\s+/i, '');
  if (!token) return;
  state.token = token;
  $('signin').disabled = true;
  try {
    await api('/api/v1/search?' + query({ q: '*', limit: 1 })); // the check the brief asks for
  } catch (err) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $('signin-error').textContent = (err.status === 401 ? 'Token rejected: ' : 'Sign-in failed: ') + err.message;
    return;
  } finally {
    $('signin').disabled = false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = ''; // don't leave the secret sitting in the DOM
  $('signin-error').textContent = '';
  $('whoami').textContent = describeToken(token);
  $('signin-view').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
  $('query').focus();
  runSearch();
}

function signOut(message) {
  stopTail('stopped');
  if (state.search) state.search.abort();
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('results').replaceChildren();
  $('histogram').replaceChildren();
  $('total').textContent = $('levels').textContent = $('whoami').textContent = '';
  $('more').hidden = true;
  clearErrors();
  $('app').hidden = true;
  $('signout').hidden = true;
  $('signin-view').hidden = false;
  $('signin-error').textContent = message || '';
  $('token').focus();
}

// ---------- search ----------

// A datetime typed without a zone is taken as UTC, the zone the page shows.
function normalizeTime(text) {
  const t = text.trim();
  if (/^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/.test(t)) {
    return t.replace(' ', 'T') + (t.length === 16 ? ':00Z' : 'Z');
  }
  return t;
}

function readForm() {
  const range = $('range').value;
  const q = $('query').value.trim();
  if (range === 'custom') return { q, from: normalizeTime($('from').value), to: normalizeTime($('to').value), order: 'desc' };
  return { q, from: range === 'all' ? '' : range, to: '', order: 'desc' };
}

async function runSearch() {
  if (state.search) state.search.abort();
  const ctrl = new AbortController();
  state.search = ctrl;
  const params = readForm();
  // Not disabling #search: a disabled default button also blocks submit-on-Enter,
  // and a newer search simply aborts this one.
  document.body.classList.add('busy');
  const page = api('/api/v1/search?' + query({ ...params, limit: PAGE_SIZE }), { signal: ctrl.signal });
  const agg = api('/api/v1/aggregate', {
    signal: ctrl.signal,
    body: { q: params.q, from: params.from || undefined, to: params.to || undefined,
      histogram: { interval: 'auto' }, terms: [{ field: 'level', size: 10 }] },
  });
  agg.catch(() => {}); // when both fail, the search error is the one shown; don't report this one as unhandled
  try {
    const answer = await page;
    clearErrors();
    state.params = params;
    state.shown.clear();
    $('results').replaceChildren();
    showPage(answer);
    $('results').classList.remove('stale');
    renderAggregate(await agg);
    $('histogram').classList.remove('stale');
    if (state.tail) startTail(); // the tail follows the query on screen
  } catch (err) {
    if (err.name === 'AbortError') return;
    // What is on screen no longer answers the query in the box: dim it, keep it for reference.
    $('histogram').classList.add('stale');
    if (state.params !== params) $('results').classList.add('stale');
    showError(err);
  } finally {
    if (state.search === ctrl) document.body.classList.remove('busy');
  }
}

function showPage(answer) {
  $('total').textContent = fmtCount(answer.total) + (answer.total === 1 ? ' match' : ' matches');
  const rows = document.createDocumentFragment();
  for (const hit of answer.hits || []) {
    if (state.shown.has(hit.id)) continue;
    state.shown.add(hit.id);
    rows.append(hitRow(hit));
  }
  $('results').append(rows);
  state.cursor = answer.cursor || null;
  $('more').hidden = !state.cursor;
}

async function loadMore() {
  if (!state.cursor || !state.params) return;
  $('more').disabled = true;
  try {
    showPage(await api('/api/v1/search?' + query({ ...state.params, limit: PAGE_SIZE, cursor: state.cursor })));
  } catch (err) {
    showError(err);
  } finally {
    $('more').disabled = false;
  }
}

// ---------- results ----------

const levelClass = (level) => 'level-' + String(level || 'none').toLowerCase().replace(/[^a-z]/g, '');

// One hit as <details>: the summary is the dense row, the body is built on first open.
function hitRow(hit) {
  const row = el('details', 'hit ' + levelClass(hit.level));
  row.dataset.id = hit.id;
  const summary = el('summary');
  const source = el('span', 'cell source', hit.source || '');
  source.title = hit.source || ''; // long paths are cut; the full one on hover
  summary.append(
    el('span', 'cell time', fmtTime(hit.timestamp)),
    el('span', 'cell level', hit.level || ''),
    el('span', 'cell host', hit.host || ''),
    source,
    el('span', 'cell msg', hit.message || ''),
  );
  row.append(summary);
  row.addEventListener('toggle', () => {
    if (row.open && row.childElementCount === 1) row.append(hitDetail(hit));
  });
  return row;
}

function hitDetail(hit) {
  const detail = el('div', 'detail');
  const table = el('table', 'fields');
  const addRow = (key, value) => {
    const tr = el('tr');
    tr.append(el('th', '', key), el('td', '', value));
    table.append(tr);
  };
  for (const [key, value] of Object.entries(hit.fields || {})) {
    addRow('fields.' + key, typeof value === 'string' ? value : JSON.stringify(value));
  }
  if (hit.flags && hit.flags.length) addRow('flags', hit.flags.join(', '));
  addRow('received', fmtTime(hit.received));
  addRow('tenant', hit.tenant);
  addRow('epoch / seq', `${hit.epoch} / ${hit.seq}`);
  addRow('id', hit.id);
  const button = el('button', 'context-btn', 'Context');
  button.type = 'button';
  const box = el('div', 'context');
  box.hidden = true;
  button.addEventListener('click', () => loadContext(hit, box, button));
  detail.append(table, button, box);
  return detail;
}

async function loadContext(hit, box, button) {
  button.disabled = true;
  box.hidden = false;
  box.replaceChildren(el('div', 'muted', 'loading…'));
  try {
    const ctx = await api('/api/v1/context?' + query({ id: hit.id, before: CONTEXT_LINES, after: CONTEXT_LINES }));
    const line = (h, isHit) => {
      const div = el('div', 'ctx-line ' + levelClass(h.level) + (isHit ? ' context-hit' : ''));
      div.append(el('span', 'time', fmtTime(h.timestamp)), el('span', 'msg', h.message || ''));
      return div;
    };
    const around = (list) => (list || []).map((h) => line(h, false));
    box.replaceChildren(...around(ctx.before), line(ctx.hit, true), ...around(ctx.after));
    const focus = box.querySelector('.context-hit');
    box.scrollTop = focus.offsetTop - box.clientHeight / 2; // centre the hit, don't scroll the page
  } catch (err) {
    if (err.status === 401) return showError(err);
    box.replaceChildren(el('div', 'error', 'Context failed: ' + err.message));
  } finally {
    button.disabled = false;
  }
}

// ---------- histogram and level counts ----------

const SVG_NS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderAggregate(agg) {
  state.histogram = agg.histogram;
  drawHistogram();
  const levels = (agg.terms || []).find((t) => t.field === 'level');
  $('levels').textContent = levels
    ? levels.buckets.map((b) => `${b.value} ${fmtCount(b.count)}`).concat(levels.other ? [`other ${fmtCount(levels.other)}`] : []).join(' · ')
    : '';
}

function drawHistogram() {
  const box = $('histogram');
  const hist = state.histogram;
  const buckets = (hist && hist.buckets) || [];
  const width = Math.max(box.clientWidth, 300);
  const height = 120;
  const pad = { left: 56, right: 8, top: 8, bottom: 18 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img' });
  const base = pad.top + plotH;
  root.append(svg('line', { class: 'axis', x1: pad.left, x2: width - pad.right, y1: base + 0.5, y2: base + 0.5 }));
  if (!buckets.length) {
    root.append(svg('text', { x: pad.left + 4, y: pad.top + 14 }, 'no matches in this range'));
    box.replaceChildren(root);
    return;
  }
  const max = Math.max(1, ...buckets.map((b) => b.count));
  const step = plotW / buckets.length;
  const interval = hist.interval_ms;
  buckets.forEach((b, i) => {
    const start = b.start_ms ?? Date.parse(b.start);
    const x = pad.left + i * step;
    const h = (b.count / max) * plotH;
    const g = svg('g', { class: 'bucket' });
    g.append(
      svg('title', {}, `${fmtTime(start, false)} UTC, ${fmtCount(b.count)} ${b.count === 1 ? 'match' : 'matches'}`),
      svg('rect', { class: 'slot', x, y: pad.top, width: step, height: plotH }),
      svg('rect', { class: 'bar-rect', x: x + (step > 3 ? 0.5 : 0), y: base - h, width: Math.max(step - (step > 3 ? 1 : 0), 0.5), height: h }),
    );
    g.addEventListener('click', () => zoomTo(start, start + interval));
    root.append(g);
  });
  const first = buckets[0].start_ms ?? Date.parse(buckets[0].start);
  const last = (buckets[buckets.length - 1].start_ms ?? Date.parse(buckets[buckets.length - 1].start)) + interval;
  root.append(
    svg('text', { x: pad.left - 6, y: pad.top + 9, 'text-anchor': 'end' }, fmtCount(max)),
    svg('text', { x: pad.left - 6, y: base, 'text-anchor': 'end' }, '0'),
    svg('text', { x: pad.left, y: height - 3 }, fmtTime(first, false) + ' UTC'),
    svg('text', { x: width - pad.right, y: height - 3, 'text-anchor': 'end' }, fmtTime(last, false) + ' UTC'),
  );
  box.replaceChildren(root);
}

// Clicking a bucket narrows the search to [start, start + interval).
function zoomTo(startMs, endMs) {
  $('range').value = 'custom';
  $('from').value = new Date(startMs).toISOString();
  $('to').value = new Date(endMs).toISOString();
  runSearch();
}

// ---------- live tail ----------

// Parses a text/event-stream body; calls onEvent(type, data) per event.
// EventSource cannot send an Authorization header, hence fetch + this.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let type = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // A trailing '\r' may be half of '\r\n': keep it until the next chunk.
    const lines = (buffer + value).split(/\r\n|\r(?!\n|$)|\n/);
    buffer = lines.pop();
    if (buffer.length > SSE_MAX_LINE) throw new Error('tail event too large');
    for (const line of lines) {
      if (line === '') {
        if (data.length) onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
      } else if (!line.startsWith(':')) { // ':' lines are keepalive comments
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') type = val;
        else if (field === 'data') data.push(val);
      }
    }
  }
}

function setTailStatus(text, kind) {
  const status = $('tail-status');
  status.textContent = text;
  status.title = text;
  status.className = kind || 'muted';
}

async function startTail() {
  if (state.tail) state.tail.abort();
  const ctrl = new AbortController();
  state.tail = ctrl;
  $('tail').checked = true;
  setTailStatus('connecting…');
  try {
    const res = await api('/api/v1/tail?' + query({ q: $('query').value.trim() }), { signal: ctrl.signal, accept: 'text/event-stream' });
    setTailStatus('tailing', 'ok');
    await readEvents(res.body, (type, data) => {
      if (type === 'hit') queueTailHit(JSON.parse(data));
      else if (type === 'error') throw new ApiError(0, 'tail', JSON.parse(data).error.message);
    });
    if (state.tail === ctrl) stopTail('stopped: the server closed the stream', 'bad');
  } catch (err) {
    if (err.name === 'AbortError' || state.tail !== ctrl) return;
    if (err.status === 401) return showError(err);
    stopTail('error: ' + err.message, 'bad');
  }
}

function stopTail(text, kind) {
  if (state.tail) state.tail.abort();
  state.tail = null;
  $('tail').checked = false;
  setTailStatus(text, kind);
}

// Tail hits are drawn once per frame, so a burst costs one layout, not hundreds.
function queueTailHit(hit) {
  state.tailQueue.push(hit);
  if (state.tailQueue.length === 1) requestAnimationFrame(flushTail);
}

function flushTail() {
  const results = $('results');
  const batch = state.tailQueue.splice(0);
  const rows = document.createDocumentFragment();
  for (const hit of batch.reverse()) { // arrives oldest first; newest goes on top
    if (state.shown.has(hit.id)) continue;
    state.shown.add(hit.id);
    const row = hitRow(hit);
    row.classList.add('fresh');
    rows.append(row);
  }
  results.prepend(rows);
  if (results.childElementCount > TAIL_MAX_ROWS) {
    while (results.childElementCount > TAIL_MAX_ROWS) {
      state.shown.delete(results.lastElementChild.dataset.id);
      results.lastElementChild.remove();
    }
    // The cursor would now continue after rows no longer shown: drop it rather than leave a gap.
    state.cursor = null;
    $('more').hidden = true;
  }
}

// ---------- wiring ----------

function init() {
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    $('signin-error').textContent = '';
    signIn($('token').value);
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('search-form').addEventListener('submit', (e) => {
    e.preventDefault();
    runSearch();
  });
  $('range').addEventListener('change', () => {
    if ($('range').value !== 'custom') $('from').value = $('to').value = '';
  });
  for (const id of ['from', 'to']) $(id).addEventListener('input', () => { $('range').value = 'custom'; });
  $('more').addEventListener('click', loadMore);
  $('tail').addEventListener('change', () => ($('tail').checked ? startTail() : stopTail('stopped')));
  let resizeTimer;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.histogram && drawHistogram(), 150);
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved); // a reload keeps the session; an expired token says so
}

init();
