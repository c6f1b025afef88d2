// ScaleODM web console: a single page with hash routes (#/login, #/tasks, #/new, #/task/<uuid>)
// over this gateway's NodeODM API. The token is never part of the page's URL (api.js).

import { STATUS, KIND_STATUS, follow, pool, request, token } from './api.js';
import { clearError, formatDate, h, replace, showError, showNotice } from './dom.js';

const view = document.getElementById('view');
let leaving = [];
let keepBanner = false; // an error shown just before a navigation stays on the next page

/** Go to `hash`, keeping the error banner shown when `keep`. */
function navigate(hash, keep = false) {
  if (window.location.hash === hash) {
    route();
    return;
  }
  keepBanner = keep;
  window.location.hash = hash;
}

/** What every page gets: navigation, notices, and the handling of a refused token. */
const ctx = {
  go(hash) { navigate(hash); },
  notice: showNotice,
  onLeave(fn) { leaving.push(fn); },
  /** True (and the login page shown) when `err` is a refused token. */
  handleAuth(err) {
    if (!err || !err.auth) return false;
    showError('The server refused the access token.', `Server said: ${err.message}`,
      'Enter a valid token to continue.');
    setNode(null);
    if (!window.location.hash.startsWith('#/login')) navigate('#/login', true);
    return true;
  },
};

function setNode(info) {
  const el = document.getElementById('node-status');
  if (!info) { el.textContent = 'not connected'; el.className = 'node-status off'; return; }
  const engine = [info.engine || 'odm', info.engineVersion && info.engineVersion !== '?' ? info.engineVersion : '']
    .filter(Boolean).join(' ');
  el.textContent = `API ${info.version ?? '?'} · ${engine}`;
  el.className = 'node-status on';
}

// ----------------------------------------------------------------------------------- login

function renderLogin() {
  const input = h('input', { type: 'password', id: 'token-input', autocomplete: 'off', spellcheck: 'false',
    'aria-describedby': 'token-help' });
  const reveal = h('input', { type: 'checkbox', id: 'token-reveal' });
  const result = h('p', { id: 'token-result', role: 'status', 'aria-live': 'polite' });
  const forget = h('button', { type: 'button', class: 'secondary', id: 'token-forget', text: 'Forget token' });
  reveal.addEventListener('change', () => { input.type = reveal.checked ? 'text' : 'password'; });
  forget.addEventListener('click', () => {
    token.set('');
    input.value = '';
    setNode(null);
    result.textContent = 'Token forgotten.';
  });
  const form = h('form', { class: 'card login', id: 'login-form', novalidate: true },
    h('h1', { text: 'Access token' }),
    h('div', { class: 'field' },
      h('label', { for: 'token-input', text: 'Token' }), input,
      h('label', { class: 'inline', for: 'token-reveal' }, reveal, ' Show token'),
      h('p', { class: 'help', id: 'token-help', text: 'The node\u2019s token (NodeODM\u2019s ?token=). It is kept in this browser tab only, until the tab is closed. Leave it empty for a node without a token.' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'token-submit', text: 'Connect' }), forget),
    result);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearError();
    result.textContent = 'Checking…';
    token.set(input.value.trim());
    try {
      const info = await request('/info');
      setNode(info);
      result.textContent = `Connected: ScaleODM API ${info.version ?? '?'}, ${info.taskQueueCount ?? 0} task(s) queued or running.`;
      showNotice('Connected.');
      ctx.go('#/tasks');
    } catch (err) {
      if (err.auth) {
        token.set('');
        setNode(null);
        showError('This token was refused by the server.', `Server said: ${err.message}`);
        result.textContent = 'Not connected.';
      } else {
        showError(err.message);
        result.textContent = 'Not connected.';
      }
      input.focus();
    }
  });
  replace(view, form);
  input.focus();
}

// ------------------------------------------------------------------------------- task list

async function renderTasks() {
  const tasks = new Map(); // uuid -> {info, row, cells}
  const search = h('input', { type: 'search', id: 'filter-name', autocomplete: 'off', placeholder: 'Name or uuid' });
  const status = h('select', { id: 'filter-status' },
    h('option', { value: '', text: 'All' }),
    Object.entries(STATUS).map(([code, label]) => h('option', { value: code, text: label })));
  const live = h('span', { class: 'live muted', id: 'tasks-live', 'aria-live': 'polite' });
  const count = h('p', { class: 'muted', id: 'tasks-count', 'aria-live': 'polite' });
  const body = h('tbody', { id: 'task-rows' });
  const table = h('table', { class: 'tasks', id: 'tasks-table' },
    h('caption', { class: 'sr-only', text: 'Tasks' }),
    h('thead', {}, h('tr', {},
      ['Name', 'Status', 'Progress', 'Images', 'Created'].map((c) => h('th', { scope: 'col', text: c })))),
    body);
  replace(view,
    h('div', { class: 'page-head' }, h('h1', { text: 'Tasks' }), live,
      h('a', { class: 'button primary', href: '#/new', text: 'New task' })),
    h('div', { class: 'filters card', role: 'search' },
      h('div', { class: 'field' }, h('label', { for: 'filter-name', text: 'Filter by name' }), search),
      h('div', { class: 'field' }, h('label', { for: 'filter-status', text: 'Status' }), status)),
    count, table);

  function matches(info) {
    const q = search.value.trim().toLowerCase();
    const code = status.value;
    if (code && String(info.status && info.status.code) !== code) return false;
    return !q || String(info.name || '').toLowerCase().includes(q) || String(info.uuid).includes(q);
  }

  function filter() {
    let shown = 0;
    for (const t of tasks.values()) {
      t.row.hidden = !matches(t.info);
      if (!t.row.hidden) shown += 1;
    }
    count.textContent = tasks.size
      ? `${shown} of ${tasks.size} task${tasks.size === 1 ? '' : 's'} shown`
      : 'No tasks yet.';
  }
  search.addEventListener('input', filter);
  status.addEventListener('change', filter);

  function paint(t) {
    const info = t.info;
    const code = info.status && info.status.code;
    t.cells.name.textContent = info.name || '(unnamed task)';
    t.cells.status.textContent = STATUS[code] || `status ${code}`;
    t.cells.status.className = `badge status-${STATUS[code] || 'unknown'}`;
    const pct = Math.max(0, Math.min(100, Number(info.progress) || 0));
    t.cells.progress.value = pct;
    t.cells.pct.textContent = `${Math.floor(pct)}%`;
    t.cells.images.textContent = String(info.imagesCount ?? '—');
    t.cells.created.textContent = formatDate(info.dateCreated);
    t.row.hidden = !matches(info);
  }

  function place(t) {
    // Newest first.
    const after = [...tasks.values()].filter((o) => o !== t && (o.info.dateCreated || 0) > (t.info.dateCreated || 0));
    const before = [...body.children].find((row) => !after.some((o) => o.row === row));
    body.insertBefore(t.row, before || null);
  }

  function add(info) {
    if (!info || !info.uuid || tasks.has(info.uuid)) return;
    const cells = {
      name: h('a', { href: `#/task/${encodeURIComponent(info.uuid)}`, class: 'task-link' }),
      status: h('span', { class: 'badge' }),
      progress: h('progress', { max: '100', value: '0', 'aria-label': 'Progress' }),
      pct: h('span', { class: 'pct' }),
      images: h('span'),
      created: h('span'),
    };
    const row = h('tr', { dataset: { uuid: info.uuid } },
      h('td', { 'data-label': 'Name' }, cells.name),
      h('td', { 'data-label': 'Status' }, cells.status),
      h('td', { 'data-label': 'Progress' }, cells.progress, ' ', cells.pct),
      h('td', { 'data-label': 'Images' }, cells.images),
      h('td', { 'data-label': 'Created' }, cells.created));
    cells.progress.setAttribute('aria-label', `Progress of ${info.name || info.uuid}`);
    const t = { info, row, cells };
    tasks.set(info.uuid, t);
    place(t);
    paint(t);
  }

  const fetching = new Set();
  async function fetchInfo(uuid) {
    if (fetching.has(uuid)) return;
    fetching.add(uuid);
    try {
      const info = await request(`/task/${encodeURIComponent(uuid)}/info`);
      const known = tasks.get(uuid);
      if (known) { known.info = info; paint(known); } else add(info);
      filter();
    } catch (err) {
      if (!ctx.handleAuth(err)) { /* removed meanwhile: nothing to show */ }
    } finally {
      fetching.delete(uuid);
    }
  }

  // Events of every task: opened before the list is read, so nothing happens unseen; what
  // arrives before the list is complete is applied by reading those tasks again.
  let loaded = false;
  const touched = new Set();
  function onEvent(kind, data) {
    const uuid = data.task_id;
    if (!uuid) return;
    if (!loaded) { touched.add(uuid); return; }
    const t = tasks.get(uuid);
    if (kind === 'removed') {
      if (t) { t.row.remove(); tasks.delete(uuid); filter(); }
      return;
    }
    if (!t) { if (kind !== 'output' && kind !== 'child') fetchInfo(uuid); return; }
    const info = t.info;
    if (kind in KIND_STATUS) info.status = { code: KIND_STATUS[kind] };
    if (kind === 'queued') info.progress = 0;
    else if (kind === 'progress') info.progress = Math.max(Number(info.progress) || 0, Number(data.progress) || 0);
    else if (kind === 'completed') info.progress = 100;
    else if (kind === 'inputs') info.imagesCount = data.images_count;
    paint(t);
    filter();
    if (kind === 'completed' || kind === 'failed' || kind === 'canceled') fetchInfo(uuid);
  }
  const opened = new Promise((resolve) => {
    const source = follow('/events', {}, onEvent, (s) => {
      if (s === 'open') { live.textContent = 'live'; resolve(); } else if (s === 'reconnecting') live.textContent = 'reconnecting…';
      else { live.textContent = 'not live (reload to retry)'; resolve(); }
    });
    ctx.onLeave(() => source.close());
    setTimeout(resolve, 3000); // a slow stream does not hold the list back
  });

  try {
    await opened;
    const list = await request('/task/list');
    const infos = await pool(Array.isArray(list) ? list : [], 4, (item) =>
      request(`/task/${encodeURIComponent(item.uuid)}/info`).catch((err) => {
        if (err.auth) throw err;
        return null; // removed between the list and its info
      }));
    infos.forEach(add);
    loaded = true;
    for (const uuid of touched) fetchInfo(uuid);
    filter();
  } catch (err) {
    if (!ctx.handleAuth(err)) showError(`The task list could not be loaded: ${err.message}`);
  }
}

// ---------------------------------------------------------------------------------- router

async function route() {
  for (const fn of leaving.splice(0)) {
    try { fn(); } catch { /* a page's cleanup does not stop the next page */ }
  }
  const hash = window.location.hash || '#/tasks';
  const [, page = 'tasks', arg = ''] = hash.match(/^#\/([a-z]+)(?:\/(.*))?$/) || [];
  for (const link of document.querySelectorAll('.nav a')) {
    if (link.dataset.route === page) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = 'ScaleODM console';
  view.replaceChildren();
  window.scrollTo(0, 0);
  try {
    if (page === 'login') renderLogin();
    else if (page === 'new') await (await import('./newtask.js')).render(view, ctx);
    else if (page === 'task' && arg) await (await import('./taskpage.js')).render(view, ctx, decodeURIComponent(arg));
    else await renderTasks();
  } catch (err) {
    if (!ctx.handleAuth(err)) showError(`This page failed: ${err.message}`);
  }
  view.focus({ preventScroll: true });
}

async function start() {
  window.addEventListener('hashchange', () => {
    if (!keepBanner) clearError();
    keepBanner = false;
    route();
  });
  window.addEventListener('beforeunload', () => { for (const fn of leaving.splice(0)) fn(); });
  try {
    setNode(await request('/info'));
  } catch (err) {
    if (err.auth) {
      setNode(null);
      if (token.get()) {
        showError('The server refused the access token.', `Server said: ${err.message}`);
      }
      if (!window.location.hash.startsWith('#/login')) {
        navigate('#/login', true);
        return; // hashchange routes
      }
    } else {
      setNode(null);
      showError(err.message);
    }
  }
  route();
}

start();
