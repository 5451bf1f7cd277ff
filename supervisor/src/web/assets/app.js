// labvisor's lab page: plain JavaScript, no build step. The supervisor pushes the lab over
// Server-Sent Events (/api/lab, /api/sut/NAME); this file only renders what it is sent.
'use strict';

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

const GROUP_ORDER = { problem: 0, offline: 1, starting: 2, busy: 3, healthy: 4 };
const OUTPUT_CHUNKS_SHOWN = 4000;

const page = {
  me: { user: null, anonymous_read: false, broker: false },
  stream: null,
  skew: 0, // local clock minus the server's
  rows: new Map(),
  trs: new Map(),
  summary: null,
  line: '',
  supervisors: [],
  sort: { key: 'default', desc: false },
  dirty: new Set(),
  full: false,
  frame: false,
  sut: null,
  jobs: new Map(),
};

function age(ms) {
  if (ms == null) return '-';
  const s = Math.max(0, Math.round((Date.now() - page.skew - ms) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${Math.round(s / 3600)}h`;
}

function duration(ms) {
  if (ms == null) return '-';
  const s = ms / 1000;
  return s < 60 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m${Math.round(s % 60)}s`;
}

function stateText(r) {
  if (r.admin && r.admin.mode !== 'online') {
    return `${r.admin.mode}${r.admin.reason ? ': ' + r.admin.reason : ''}`;
  }
  if (r.state === 'busy' && r.job) return `busy with job ${r.job}`;
  if (r.device_work) return `busy with the device's own work (${r.device_work})`;
  return r.state;
}

function lastJobText(r) {
  const j = r.last_job;
  return j ? `${j.state} (${j.id})` : '-';
}

// ---- the session ----------------------------------------------------------------------

async function loadMe() {
  const res = await fetch('/api/me');
  page.me = await res.json();
  $('#user').textContent = page.me.user ? page.me.user : '';
  $('#login-open').hidden = !!page.me.user || !page.me.broker;
  $('#logout').hidden = !page.me.user;
}

function mayRead() {
  return page.me.anonymous_read || !!page.me.user;
}

function openLogin() {
  $('#login-error').textContent = '';
  $('#login-dialog').showModal();
}

async function login(ev) {
  ev.preventDefault();
  const body = { username: $('#login-user').value, password: $('#login-password').value };
  const res = await fetch('/api/login', {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  const answer = await res.json();
  if (!res.ok) {
    $('#login-error').textContent = answer.error || `refused (${res.status})`;
    return;
  }
  $('#login-password').value = '';
  $('#login-dialog').close();
  await loadMe();
  route();
}

async function logout() {
  await fetch('/api/logout', { method: 'POST' });
  await loadMe();
  route();
}

// ---- streams ----------------------------------------------------------------------------

function connect(url, handlers) {
  if (page.stream) page.stream.close();
  const es = new EventSource(url);
  page.stream = es;
  for (const [name, fn] of Object.entries(handlers)) {
    es.addEventListener(name, (e) => fn(JSON.parse(e.data)));
  }
  es.onopen = () => { $('#conn').textContent = ''; $('#conn').classList.remove('down'); };
  es.onerror = () => {
    $('#conn').textContent = es.readyState === EventSource.CLOSED
      ? 'disconnected' : 'reconnecting…';
    $('#conn').classList.add('down');
  };
}

function route() {
  const m = location.hash.match(/^#\/sut\/([^/]+)$/);
  $('#need-login').hidden = true;
  $('#lab').hidden = true;
  $('#sut').hidden = true;
  if (page.stream) { page.stream.close(); page.stream = null; }
  if (!mayRead()) {
    $('#need-login').hidden = false;
    $('#summary').textContent = '';
    return;
  }
  if (m) showSut(decodeURIComponent(m[1])); else showLab();
}

// ---- the lab view -----------------------------------------------------------------------

function showLab() {
  $('#lab').hidden = false;
  page.sut = null;
  connect('/api/lab', {
    lab: (s) => {
      page.skew = Date.now() - s.now_ms;
      page.rows = new Map(s.rows.map((r) => [r.sut, r]));
      page.summary = s.summary;
      page.line = s.line;
      page.supervisors = s.supervisors;
      page.full = true;
      schedule();
    },
    row: (u) => {
      const old = page.rows.get(u.row.sut);
      page.rows.set(u.row.sut, u.row);
      page.summary = u.summary;
      if (!old || old.group !== u.row.group) page.full = true; else page.dirty.add(u.row.sut);
      schedule();
    },
    gone: (u) => {
      page.rows.delete(u.sut);
      page.summary = u.summary;
      page.full = true;
      schedule();
    },
  });
}

function schedule() {
  if (page.frame) return;
  page.frame = true;
  requestAnimationFrame(() => {
    page.frame = false;
    if (page.sut) return;
    if (page.full) renderTable(); else patchRows();
    renderSummary();
  });
}

function summaryLine(s) {
  if (!s) return '';
  let line = `${s.suts} SUTs: ${s.healthy} healthy, ${s.busy} busy`;
  if (s.starting) line += `, ${s.starting} starting`;
  line += `, ${s.offline} offline, ${s.problems} problems`;
  const kinds = Object.entries(s.by_problem || {}).map(([k, n]) => `${n} ${k.replace(/-/g, ' ')}`);
  if (kinds.length) line += ` (${kinds.join(', ')})`;
  return line;
}

function renderSummary() {
  $('#summary').textContent = summaryLine(page.summary);
  $('#supervisors').innerHTML = page.supervisors.map((s) => `supervisor ${esc(s.status.id)}: ${
    esc(s.status.state)}${s.problem ? ` — <b>${esc(s.problem)}</b>` : ''}`).join('<br>');
}

function sortValue(r, key) {
  switch (key) {
    case 'sut': return r.sut;
    case 'health': return r.health;
    case 'state': return stateText(r);
    case 'heartbeat': return -(r.heartbeat_ms || 0);
    case 'queue': return r.queue;
    case 'restarts': return r.restarts;
    case 'last': return r.last_job ? r.last_job.state : '';
    case 'node': return r.node || '';
    default: return GROUP_ORDER[r.group] ?? 9;
  }
}

function sortedRows() {
  const { key, desc } = page.sort;
  const rows = [...page.rows.values()];
  rows.sort((a, b) => {
    const pa = a.group === 'problem' ? 0 : 1;
    const pb = b.group === 'problem' ? 0 : 1;
    if (key === 'default' && pa !== pb) return pa - pb;
    const va = sortValue(a, key);
    const vb = sortValue(b, key);
    let c = va < vb ? -1 : va > vb ? 1 : 0;
    if (desc) c = -c;
    return c || (a.sut < b.sut ? -1 : a.sut > b.sut ? 1 : 0);
  });
  return rows;
}

function rowCells(r) {
  return `<td>${esc(r.sut)}</td><td>${esc(r.health)}</td><td>${esc(stateText(r))}</td>`
    + `<td class="age" data-ms="${r.heartbeat_ms ?? ''}">${age(r.heartbeat_ms)}</td>`
    + `<td>${r.queue}</td><td>${r.restarts}</td>`
    + `<td class="verdict-${esc(r.last_job ? r.last_job.state : '')}">${esc(lastJobText(r))}</td>`
    + `<td>${esc(r.node || '')}</td><td class="detail">${esc(r.detail || '')}</td>`;
}

function rowText(r) {
  return [r.sut, r.health, stateText(r), r.node, r.detail, r.supervisor, lastJobText(r),
    ...(r.problems || [])].join(' ').toLowerCase();
}

function visible(r) {
  const show = $('#show').value;
  if (show !== 'all' && r.group !== show) return false;
  const f = $('#filter').value.trim().toLowerCase();
  return !f || f.split(/\s+/).every((w) => rowText(r).includes(w));
}

function renderTable() {
  page.full = false;
  page.dirty.clear();
  const rows = sortedRows();
  const html = rows.map((r) => `<tr class="g-${esc(r.group)}" data-sut="${esc(r.sut)}"${
    visible(r) ? '' : ' hidden'}>${rowCells(r)}</tr>`).join('');
  const tbody = $('#suts tbody');
  tbody.innerHTML = html;
  page.trs = new Map([...tbody.rows].map((tr) => [tr.dataset.sut, tr]));
  countShown();
  // When the table was drawn and how many rows it has, for anyone measuring the page.
  performance.mark('labvisor-table', { detail: { rows: rows.length } });
  document.querySelectorAll('#suts th[data-sort]').forEach((th) => {
    th.classList.toggle('sorted', th.dataset.sort === page.sort.key);
    th.classList.toggle('desc', th.dataset.sort === page.sort.key && page.sort.desc);
  });
}

function patchRows() {
  for (const sut of page.dirty) {
    const r = page.rows.get(sut);
    const tr = page.trs.get(sut);
    if (!r || !tr) { page.full = true; continue; }
    tr.innerHTML = rowCells(r);
    tr.className = `g-${r.group}`;
    tr.hidden = !visible(r);
  }
  page.dirty.clear();
  if (page.full) renderTable(); else countShown();
}

function applyFilter() {
  for (const [sut, tr] of page.trs) {
    const r = page.rows.get(sut);
    if (r) tr.hidden = !visible(r);
  }
  countShown();
}

function countShown() {
  let n = 0;
  for (const tr of page.trs.values()) if (!tr.hidden) n += 1;
  $('#shown').textContent = `${n} of ${page.rows.size} shown`;
}

function tickAges() {
  document.querySelectorAll('td.age, dd.age').forEach((el) => {
    const ms = el.dataset.ms;
    el.textContent = ms ? age(Number(ms)) : '-';
  });
}

// ---- a SUT's view -------------------------------------------------------------------------

function showSut(name) {
  page.sut = name;
  page.jobs = new Map();
  $('#sut').hidden = false;
  $('#sut-name').textContent = name;
  $('#output').textContent = '';
  $('#act-result').textContent = '';
  $('#actions').hidden = !page.me.user;
  $('#actions-login').hidden = !!page.me.user;
  logHint(name, null);
  connect(`/api/sut/${encodeURIComponent(name)}`, {
    sut: (s) => {
      page.skew = Date.now() - s.now_ms;
      renderSutRow(s.row, s.view);
      page.jobs = new Map(s.jobs.map((j) => [j.id, j]));
      renderJobs();
      $('#output').textContent = '';
      appendOutput(s.output);
    },
    row: (u) => renderSutRow(u.row, null),
    gone: () => renderSutRow(null, null),
    job: (u) => { page.jobs.set(u.job.id, u.job); renderJobs(); },
    output: (u) => appendOutput([u.chunk]),
  });
}

// Where the complete log is: the page shows live output only.
function logHint(name, container) {
  const path = `/labvisor/data/log/${name}.log`;
  const id = container ? container.slice(0, 12) : '<container>';
  $('#log-hint').textContent = 'Live from the broker since this page opened (and what the supervisor kept). '
    + `The complete log is the file ${path} on the SUT's volume: `
    + `docker cp ${id}:${path} - | tar -xO`;
}

function renderSutRow(r, view) {
  const badges = $('#sut-state');
  if (!r) {
    badges.innerHTML = '<span class="problem">unknown to the broker</span>';
    $('#sut-facts').innerHTML = '';
    return;
  }
  badges.innerHTML = `<span class="${esc(r.group)}">${esc(r.group)}</span>`
    + `<span>${esc(stateText(r))}</span><span>health: ${esc(r.health)}</span>`
    + (r.problems || []).map((p) => `<span class="problem">${esc(p)}</span>`).join('');
  const container = r.container_id || (view && view.container_id);
  if (container) logHint(page.sut, container);
  const facts = [
    ['heartbeat', `<span class="age-wrap"></span>`],
    ['queue', r.queue],
    ['restarts', r.restarts],
    ['last job', esc(lastJobText(r))],
    ['container', esc(container || '-')],
    ['image', esc(r.image || (view && view.image) || '-')],
    ['node', esc(r.node || '-')],
    ['supervisor', esc(r.supervisor || '-')],
    ['pending action', esc(r.pending_action || '-')],
    ['detail', esc(r.detail || '-')],
  ];
  if (r.config_problems && r.config_problems.length) {
    facts.push(['file problems', r.config_problems.map(esc).join('<br>')]);
  }
  $('#sut-facts').innerHTML = facts.map(([k, v]) => (k === 'heartbeat'
    ? `<dt>${k}</dt><dd class="age" data-ms="${r.heartbeat_ms ?? ''}">${age(r.heartbeat_ms)}</dd>`
    : `<dt>${k}</dt><dd>${v}</dd>`)).join('');
}

function renderJobs() {
  const jobs = [...page.jobs.values()].sort((a, b) => b.queued_ms - a.queued_ms);
  $('#jobs tbody').innerHTML = jobs.map((j) => `<tr data-job="${esc(j.id)}">`
    + `<td>${esc(j.id)}${j.health_check ? ' (health check)' : ''}</td>`
    + `<td class="verdict-${esc(j.state)}">${esc(j.state)}</td>`
    + `<td>${j.exit_code ?? (j.signal != null ? 'signal ' + j.signal : '-')}</td>`
    + `<td>${new Date(j.queued_ms).toLocaleString()}</td>`
    + `<td>${duration(j.duration_ms)}</td><td>${esc(j.reason || '')}</td></tr>`).join('');
}

function appendOutput(chunks) {
  const pre = $('#output');
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  for (const c of chunks) {
    if (c.gap) {
      const gap = document.createElement('span');
      gap.className = 'gap';
      gap.textContent = c.gap;
      pre.appendChild(gap);
    }
    if (c.text) pre.appendChild(document.createTextNode(c.text));
  }
  while (pre.childNodes.length > OUTPUT_CHUNKS_SHOWN) pre.removeChild(pre.firstChild);
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

// ---- actions ------------------------------------------------------------------------------

async function act(what, body) {
  const out = $('#act-result');
  out.className = 'result';
  out.textContent = `${what}…`;
  const res = await fetch(`/api/sut/${encodeURIComponent(page.sut)}/${what}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-labvisor-action': '1' },
    body: JSON.stringify(body),
  });
  const answer = await res.json().catch(() => ({}));
  let text = answer.message || answer.error || `${res.status}`;
  try {
    const ack = JSON.parse(answer.message);
    if (ack && ack.result) text = `job ${ack.id}: ${ack.result}${ack.reason ? ' — ' + ack.reason : ''}`;
  } catch (_) { /* not JSON: the command's own words */ }
  if (answer.code === 4) text += ' (is this login allowed to do this on this SUT?)';
  out.className = `result ${res.ok ? 'good' : 'bad'}`;
  out.textContent = text;
}

async function submitJob(ev) {
  ev.preventDefault();
  const file = $('#submit-file').files[0];
  const script = file ? await file.text() : $('#submit-script').value;
  await act('submit', { script, timeout: $('#submit-timeout').value || null });
}

function adminAction(mode) {
  return () => act('admin', { mode, reason: $('#admin-reason').value || null });
}

// ---- start ------------------------------------------------------------------------------

function init() {
  $('#login-open').addEventListener('click', openLogin);
  $('#need-login-button').addEventListener('click', openLogin);
  $('#login-cancel').addEventListener('click', () => $('#login-dialog').close());
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', logout);
  $('#filter').addEventListener('input', applyFilter);
  $('#show').addEventListener('change', applyFilter);
  document.querySelectorAll('#suts th[data-sort]').forEach((th) => th.addEventListener('click', () => {
    const key = th.dataset.sort;
    page.sort = { key, desc: page.sort.key === key ? !page.sort.desc : false };
    renderTable();
  }));
  $('#suts tbody').addEventListener('click', (ev) => {
    const tr = ev.target.closest('tr');
    if (tr) location.hash = `#/sut/${encodeURIComponent(tr.dataset.sut)}`;
  });
  $('#submit-form').addEventListener('submit', submitJob);
  $('#offline-button').addEventListener('click', adminAction('offline'));
  $('#maintenance-button').addEventListener('click', adminAction('maintenance'));
  $('#online-button').addEventListener('click', adminAction('online'));
  $('#cancel-button').addEventListener('click', () => act('cancel', { job: 'current' }));
  window.addEventListener('hashchange', route);
  setInterval(tickAges, 1000);
  loadMe().then(route);
}

document.addEventListener('DOMContentLoaded', init);
