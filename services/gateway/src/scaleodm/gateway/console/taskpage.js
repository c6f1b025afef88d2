// One task: status and progress live, the console tail live, actions (cancel, restart with
// options, remove), downloads (all.zip, single assets and the STAC Item), and a map when the
// task has an orthophoto.
//
// Live state comes from GET /task/{uuid}/events (routes/events.py): the task's whole history is
// replayed, then live events follow, until the current attempt ends; a restart opens the stream
// again after the last event seen. Should the stream be refused (e.g. too many streams), the page
// polls /task/{uuid}/info and /task/{uuid}/output?line=N instead.

import { KIND_STATUS, STATUS, TERMINAL, apiUrl, follow, request, withToken } from './api.js';
import { append, clearError, formatDate, formatDuration, h, replace, showError, uid } from './dom.js';
import { showMap } from './map.js';
import { loadOptions, optionErrors, optionsEditor } from './options.js';

const MAX_CONSOLE_LINES = 5000;
const POLL_MS = 3000;

export async function render(view, ctx, uuid) {
  const state = {
    info: null, attempt: 0, lastSeq: null, lines: 0, source: null, poll: 0, map: null,
    stac: undefined, left: false,
  };
  ctx.onLeave(() => {
    state.left = true;
    if (state.source) state.source.close();
    clearTimeout(state.poll);
    if (state.map) state.map.remove();
  });

  const title = h('h1', { class: 'task-name', id: 'task-title' });
  const badge = h('span', { class: 'badge', id: 'task-status' });
  const progress = h('progress', { id: 'task-progress', max: '100', value: '0', 'aria-labelledby': 'task-progress-label' });
  const progressText = h('span', { id: 'task-progress-text' });
  const facts = h('dl', { class: 'facts' });
  const errorBox = h('p', { class: 'task-error', hidden: true, role: 'status' });
  const live = h('span', { class: 'live muted', 'aria-live': 'polite' });

  const cancelBtn = h('button', { type: 'button', class: 'secondary', text: 'Cancel', id: 'task-cancel' });
  const restartBtn = h('button', { type: 'button', class: 'secondary', text: 'Restart…', id: 'task-restart',
    'aria-expanded': 'false', 'aria-controls': 'restart-panel' });
  const removeBtn = h('button', { type: 'button', class: 'danger', text: 'Remove', id: 'task-remove' });
  const restartPanel = h('section', { class: 'card', id: 'restart-panel', hidden: true, 'aria-label': 'Restart with options' });

  const downloads = h('ul', { class: 'downloads', id: 'downloads' });
  const downloadsNote = h('p', { class: 'muted', text: 'Downloads are available once the task has completed.' });

  const consoleBox = h('pre', { class: 'console', id: 'task-console', tabindex: '0', role: 'log',
    'aria-label': 'Console output', 'aria-live': 'off' });
  const followBox = h('input', { type: 'checkbox', id: uid('follow'), checked: true });
  const lineCount = h('span', { class: 'muted', id: 'console-lines' });

  const mapSection = h('section', { class: 'card', id: 'map-section', hidden: true, 'aria-labelledby': 'map-title' });
  const mapBox = h('div', { class: 'map', id: 'task-map', role: 'region', 'aria-label': 'Map of the orthophoto' });
  const mapNote = h('p', { class: 'muted' });
  append(mapSection, h('h2', { id: 'map-title', text: 'Map' }), mapBox, mapNote);

  replace(view,
    h('p', { class: 'crumbs' }, h('a', { href: '#/tasks', text: '← All tasks' })),
    h('section', { class: 'card task-head', 'aria-labelledby': 'task-title' },
      h('div', { class: 'task-title-row' }, title, badge),
      h('p', { class: 'muted uuid' }, 'uuid ', h('code', { text: uuid })),
      h('div', { class: 'progress-row' },
        h('span', { id: 'task-progress-label', class: 'sr-only', text: 'Task progress' }),
        progress, progressText, live),
      errorBox, facts,
      h('div', { class: 'actions' }, cancelBtn, restartBtn, removeBtn)),
    restartPanel,
    h('section', { class: 'card', 'aria-labelledby': 'dl-title' },
      h('h2', { id: 'dl-title', text: 'Downloads' }), downloadsNote, downloads),
    mapSection,
    h('section', { class: 'card', 'aria-labelledby': 'console-title' },
      h('div', { class: 'console-head' },
        h('h2', { id: 'console-title', text: 'Console' }),
        h('label', { class: 'inline', for: followBox.id }, followBox, ' Follow'), lineCount),
      consoleBox));

  // ----------------------------------------------------------------------------- rendering

  function show() {
    const info = state.info;
    if (!info) return;
    const code = info.status && info.status.code;
    title.textContent = info.name || '(unnamed task)';
    document.title = `${info.name || uuid} — ScaleODM`;
    badge.textContent = STATUS[code] || `status ${code}`;
    badge.className = `badge status-${STATUS[code] || 'unknown'}`;
    const pct = Math.max(0, Math.min(100, Number(info.progress) || 0));
    progress.value = pct;
    progressText.textContent = `${Math.floor(pct)}%`;
    const message = info.status && info.status.errorMessage;
    errorBox.hidden = !message;
    errorBox.textContent = message ? `Error: ${message}` : '';
    replace(facts,
      h('dt', { text: 'Created' }), h('dd', { text: formatDate(info.dateCreated) }),
      h('dt', { text: 'Processing time' }), h('dd', { text: formatDuration(info.processingTime) }),
      h('dt', { text: 'Images' }), h('dd', { text: String(info.imagesCount ?? '—') }),
      h('dt', { text: 'Options' }), h('dd', { class: 'options-shown' },
        (info.options || []).length
          ? h('ul', { class: 'plain' }, info.options.map((o) => h('li', {},
            h('code', { text: String(o.name) }), ' = ', h('code', { text: typeof o.value === 'string' ? o.value : JSON.stringify(o.value) }))))
          : 'defaults'));
    cancelBtn.disabled = TERMINAL.has(code);
    restartBtn.disabled = !TERMINAL.has(code);
    showDownloads();
  }

  function showDownloads() {
    const completed = state.info && state.info.status && state.info.status.code === 40;
    downloadsNote.hidden = completed;
    if (!completed) { replace(downloads); return; }
    const items = [h('li', {}, h('a', {
      href: apiUrl(`/task/${encodeURIComponent(uuid)}/download/all.zip`), download: 'all.zip',
      id: 'download-all', text: 'All results (all.zip)' }))];
    const stac = state.stac;
    if (stac && stac.assets && typeof stac.assets === 'object') {
      const labels = { orthophoto: 'Orthophoto (GeoTIFF)', dsm: 'Surface model, DSM (GeoTIFF)', dtm: 'Terrain model, DTM (GeoTIFF)' };
      for (const [key, label] of Object.entries(labels)) {
        const asset = stac.assets[key];
        const href = asset && typeof asset.href === 'string' ? withToken(asset.href) : null;
        if (href) items.push(h('li', {}, h('a', { href, download: '', id: `download-${key}`, text: label })));
      }
    }
    if (stac) {
      items.push(h('li', {}, h('button', { type: 'button', class: 'link', id: 'download-stac',
        text: 'STAC Item (JSON)', onclick: downloadStac })));
    }
    replace(downloads, items);
  }

  // The STAC Item is fetched and saved from memory: opening its URL would put the token in
  // the address bar of a tab.
  async function downloadStac() {
    try {
      const item = await request(`/task/${encodeURIComponent(uuid)}/stac`);
      const blob = new Blob([JSON.stringify(item, null, 2)], { type: 'application/geo+json' });
      const url = URL.createObjectURL(blob);
      const a = h('a', { href: url, download: `${uuid}.stac.json`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      if (!ctx.handleAuth(err)) showError(`STAC Item: ${err.message}`);
    }
  }

  async function loadStac() {
    if (state.stac !== undefined) return;
    state.stac = null;
    try {
      state.stac = await request(`/task/${encodeURIComponent(uuid)}/stac`);
    } catch (err) {
      if (ctx.handleAuth(err)) return;
      state.stac = null;
      mapNote.textContent = `No map: ${err.message}`;
    }
    if (state.left) return;
    showDownloads();
    const assets = state.stac && state.stac.assets;
    if (assets && assets.orthophoto && !state.map) {
      mapSection.hidden = false;
      mapNote.textContent = 'Loading map…';
      try {
        state.map = await showMap(mapBox, uuid, { hasDsm: Boolean(assets.dsm) });
        if (state.left) { state.map.remove(); return; }
        mapNote.textContent = assets.dsm
          ? 'Orthophoto; the surface model can be shown with the layer control.'
          : 'Orthophoto.';
      } catch (err) {
        if (ctx.handleAuth(err)) return;
        mapNote.textContent = `The map could not be shown: ${err.message}`;
      }
    }
  }

  function resetForAttempt() {
    consoleBox.replaceChildren();
    chunks.length = 0;
    shownLines = 0;
    state.lines = 0;
    lineCount.textContent = '';
    state.stac = undefined;
    mapSection.hidden = true;
    if (state.map) { state.map.remove(); state.map = null; }
  }

  function addLines(start, lines) {
    // Lines already shown (a replay overlapping live events) are skipped; the console keeps
    // the last MAX_CONSOLE_LINES.
    const fresh = lines.slice(Math.max(0, state.lines - start)).map(String);
    if (!fresh.length) return;
    state.lines = Math.max(state.lines, start + lines.length);
    consoleBox.append(document.createTextNode(`${fresh.join('\n')}\n`));
    chunks.push(fresh.length);
    shownLines += fresh.length;
    while (chunks.length > 1 && shownLines > MAX_CONSOLE_LINES) {
      shownLines -= chunks.shift();
      consoleBox.firstChild.remove();
    }
    lineCount.textContent = `${state.lines} lines`;
    if (followBox.checked) consoleBox.scrollTop = consoleBox.scrollHeight;
  }
  const chunks = []; // the number of lines in each text node of the console
  let shownLines = 0;

  // ---------------------------------------------------------------------------- live state

  function onEvent(kind, data, id) {
    if (state.left || !state.info) return;
    const seq = Number(id);
    if (Number.isFinite(seq)) state.lastSeq = seq;
    const attempt = Number(data.attempt) || 0;
    if (attempt < state.attempt) return; // an earlier attempt, replayed
    if (attempt > state.attempt) {
      state.attempt = attempt;
      resetForAttempt();
    }
    const info = state.info;
    if (kind in KIND_STATUS) {
      info.status = { code: KIND_STATUS[kind], ...(kind === 'failed' ? { errorMessage: data.error_message } : {}) };
    }
    switch (kind) {
      case 'queued':
        info.progress = 0;
        if (Array.isArray(data.options)) info.options = data.options;
        if (Number.isFinite(data.date_created_ms)) info.dateCreated = data.date_created_ms;
        break;
      case 'inputs': info.imagesCount = data.images_count; break;
      case 'progress': info.progress = Math.max(Number(info.progress) || 0, Number(data.progress) || 0); break;
      case 'output': addLines(Number(data.line_start) || 0, Array.isArray(data.lines) ? data.lines : []); break;
      case 'completed': info.progress = 100; break;
      case 'removed':
        ctx.notice('This task was removed.');
        ctx.go('#/tasks');
        return;
      default: break;
    }
    show();
    if (TERMINAL.has(info.status.code)) refreshInfo(kind === 'completed');
  }

  // Final values (processing time, error message) come from the info once an attempt ends.
  async function refreshInfo(completed) {
    try {
      const info = await request(`/task/${encodeURIComponent(uuid)}/info`);
      if (state.left) return;
      state.info = { ...info, progress: Math.max(Number(info.progress) || 0, completed ? 100 : 0) };
      show();
      if (info.status && info.status.code === 40) loadStac();
    } catch (err) {
      ctx.handleAuth(err);
    }
  }

  function openStream() {
    if (state.source) state.source.close();
    const params = state.lastSeq !== null ? { since: state.lastSeq } : {};
    state.source = follow(`/task/${encodeURIComponent(uuid)}/events`, params, onEvent, (s) => {
      if (state.left) return;
      if (s === 'open') live.textContent = 'live';
      else if (s === 'reconnecting') {
        // After the last attempt's end the server ends the stream; EventSource then asks again
        // once and is answered 204 (closed). Nothing is missing meanwhile.
        const code = state.info && state.info.status && state.info.status.code;
        live.textContent = TERMINAL.has(code) ? '' : 'reconnecting…';
      } else {
        state.source = null;
        const code = state.info && state.info.status && state.info.status.code;
        // Ended with the task (204 after its terminal event): nothing more to follow.
        if (TERMINAL.has(code)) { live.textContent = ''; return; }
        live.textContent = 'polling';
        poll();
      }
    });
  }

  async function poll() {
    clearTimeout(state.poll);
    if (state.left) return;
    try {
      const info = await request(`/task/${encodeURIComponent(uuid)}/info`);
      const lines = await request(`/task/${encodeURIComponent(uuid)}/output`, { params: { line: state.lines } });
      if (state.left) return;
      state.info = info;
      if (Array.isArray(lines)) addLines(state.lines, lines);
      show();
      if (TERMINAL.has(info.status.code)) {
        live.textContent = '';
        if (info.status.code === 40) loadStac();
        return;
      }
    } catch (err) {
      if (ctx.handleAuth(err)) return;
      live.textContent = `polling (${err.message})`;
    }
    state.poll = setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------------------- actions

  async function act(path, form, done, onError = () => {}) {
    clearError();
    for (const b of [cancelBtn, restartBtn, removeBtn]) b.disabled = true;
    try {
      await request(path, { method: 'POST', form });
      await done();
    } catch (err) {
      if (!ctx.handleAuth(err)) {
        showError(err.message); // the server's message, verbatim
        onError(err);
      }
    } finally {
      if (!state.left) {
        removeBtn.disabled = false;
        show();
      }
    }
  }

  cancelBtn.addEventListener('click', () => act('/task/cancel', { uuid }, async () => {
    ctx.notice('Task canceled.');
    await refreshInfo(false);
  }));

  removeBtn.addEventListener('click', () => {
    const name = (state.info && state.info.name) || uuid;
    // A native dialog: accessible, and no page content can imitate it.
    if (!window.confirm(`Remove task "${name}"? Its results are deleted for good.`)) return;
    act('/task/remove', { uuid }, async () => {
      ctx.notice('Task removed.');
      ctx.go('#/tasks');
    });
  });

  let restartEditor = null;
  restartBtn.addEventListener('click', async () => {
    const opening = restartPanel.hidden;
    restartPanel.hidden = !opening;
    restartBtn.setAttribute('aria-expanded', String(opening));
    if (!opening || restartEditor) return;
    replace(restartPanel, h('p', { class: 'muted', text: 'Loading options…' }));
    try {
      restartEditor = optionsEditor(await loadOptions(), (state.info && state.info.options) || []);
    } catch (err) {
      if (!ctx.handleAuth(err)) replace(restartPanel, h('p', { text: `Options unavailable: ${err.message}` }));
      return;
    }
    const go = h('button', { type: 'button', class: 'primary', text: 'Restart with these options', id: 'restart-go' });
    go.addEventListener('click', () => {
      restartEditor.markErrors([]);
      act('/task/restart', { uuid, options: JSON.stringify(restartEditor.values()) }, async () => {
        ctx.notice('Task restarted.');
        restartPanel.hidden = true;
        restartBtn.setAttribute('aria-expanded', 'false');
        state.info.status = { code: 10 };
        state.info.progress = 0;
        show();
        if (!state.source) openStream(); // the previous stream ended with the last attempt
      }, (err) => restartEditor.markErrors(optionErrors(err.message)));
    });
    replace(restartPanel, h('h2', { text: 'Restart with options' }),
      h('p', { class: 'help', text: 'The task runs again from the start with these options; its previous results are replaced.' }),
      restartEditor.element, h('div', { class: 'actions' }, go));
  });

  // ---------------------------------------------------------------------------------- start

  try {
    state.info = await request(`/task/${encodeURIComponent(uuid)}/info`);
  } catch (err) {
    if (ctx.handleAuth(err)) return;
    replace(view, h('p', { class: 'crumbs' }, h('a', { href: '#/tasks', text: '← All tasks' })),
      h('h1', { text: 'Task not available' }), h('p', { class: 'task-error', text: err.message }));
    return;
  }
  if (state.left) return;
  show();
  openStream(); // its replay ends with the task's latest state (and loads the map if completed)
}
