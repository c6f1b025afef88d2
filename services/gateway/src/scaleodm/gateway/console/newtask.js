// New task: files (drag-and-drop or picker), name, webhook, options; then NodeODM's chunked
// upload (nodeodm-api §3.5): POST /task/new/init -> POST /task/new/upload/{uuid} (several files
// per request, a few requests at once) -> POST /task/new/commit/{uuid}. Progress is the bytes
// sent (XMLHttpRequest upload events). A failed request is retried with a growing delay; one
// that still fails is reported with its file names, and can be retried from the page (the
// upload stays open on the server until it is committed).

import { ApiError, apiUrl, parse, request } from './api.js';
import { clearError, formatBytes, h, replace, showError } from './dom.js';
import { loadOptions, optionErrors, optionsEditor } from './options.js';

const PARALLEL_REQUESTS = 3;
const BATCH_MAX_FILES = 8;
const BATCH_MAX_BYTES = 16 * 1024 * 1024;
// Attempts per request and the delay before each retry: 1 s, 2 s, 4 s (then reported).
const MAX_ATTEMPTS = 4;
const retryDelayMs = (attempt) => 1000 * 2 ** (attempt - 1);
const REQUEST_TIMEOUT_MS = 10 * 60 * 1000;

/** Files grouped into upload requests of at most BATCH_MAX_FILES files / BATCH_MAX_BYTES. */
export function batches(files) {
  const out = [];
  let current = [];
  let bytes = 0;
  for (const file of files) {
    if (current.length && (current.length >= BATCH_MAX_FILES || bytes + file.size > BATCH_MAX_BYTES)) {
      out.push(current);
      current = [];
      bytes = 0;
    }
    current.push(file);
    bytes += file.size;
  }
  if (current.length) out.push(current);
  return out;
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(timer); reject(new DOMException('aborted', 'AbortError')); },
    { once: true });
});

/** One upload request; `onProgress(loaded)` as bytes go out. Resolves with the JSON body. */
function send(uuid, files, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const file of files) form.append('images', file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open('POST', apiUrl(`/task/new/upload/${encodeURIComponent(uuid)}`));
    xhr.timeout = REQUEST_TIMEOUT_MS;
    xhr.upload.addEventListener('progress', (ev) => onProgress(ev.loaded, ev.lengthComputable ? ev.total : 0));
    xhr.addEventListener('load', () => {
      const response = new Response(xhr.responseText, {
        status: xhr.status,
        headers: { 'content-type': xhr.getResponseHeader('content-type') || '' },
      });
      parse(response, 'Upload').then(resolve, reject);
    });
    xhr.addEventListener('error', () => reject(new ApiError('Upload: network error')));
    xhr.addEventListener('timeout', () => reject(new ApiError('Upload: timed out')));
    xhr.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
    signal.addEventListener('abort', () => xhr.abort(), { once: true });
    xhr.send(form);
  });
}

export async function render(view, ctx) {
  const state = { files: [], uuid: null, failed: [], busy: false, abort: new AbortController() };
  ctx.onLeave(() => state.abort.abort());

  const fileInput = h('input', { type: 'file', id: 'files', multiple: true, class: 'file-input',
    accept: 'image/*,.jpg,.jpeg,.tif,.tiff,.png,.dng,.txt,.zip' });
  const fileList = h('ul', { class: 'file-list', 'aria-label': 'Selected files' });
  const fileSummary = h('p', { class: 'muted', 'aria-live': 'polite' });
  const drop = h('div', { class: 'dropzone', id: 'dropzone' },
    h('p', {}, h('strong', { text: 'Drop images here' }),
      ' — JPEG/TIFF images, and optionally gcp_list.txt, geo.txt, image_groups.txt.'),
    fileInput,
    h('label', { for: 'files', class: 'button', text: 'Choose files…' }));
  const clearFiles = h('button', { type: 'button', class: 'secondary', text: 'Clear files', disabled: true });

  const name = h('input', { type: 'text', id: 'task-name', autocomplete: 'off', maxlength: '200' });
  const webhook = h('input', { type: 'url', id: 'task-webhook', autocomplete: 'off', placeholder: 'https://…' });
  const submit = h('button', { type: 'submit', class: 'primary', text: 'Upload and start' });
  const retry = h('button', { type: 'button', class: 'secondary', id: 'upload-retry', text: 'Retry failed files', hidden: true });
  const progress = h('progress', { id: 'upload-progress', max: '100', value: '0', 'aria-label': 'Upload progress' });
  const progressText = h('span', { id: 'upload-progress-text', 'aria-live': 'polite' });
  const progressBox = h('div', { class: 'upload-progress', hidden: true }, progress, progressText);
  const optionsBox = h('div', { class: 'muted', text: 'Loading options…' });

  function showFiles() {
    replace(fileList, state.files.map((file, i) => h('li', {},
      h('span', { class: 'file-name', text: file.name }),
      h('span', { class: 'muted', text: formatBytes(file.size) }),
      h('button', { type: 'button', class: 'link', 'aria-label': `Remove ${file.name}`, text: 'Remove',
        disabled: state.busy, onclick: () => { state.files.splice(i, 1); showFiles(); } }))));
    const total = state.files.reduce((sum, f) => sum + f.size, 0);
    fileSummary.textContent = state.files.length
      ? `${state.files.length} file${state.files.length === 1 ? '' : 's'}, ${formatBytes(total)}`
      : 'No files selected.';
    clearFiles.disabled = state.busy || !state.files.length;
  }

  function addFiles(list) {
    const known = new Set(state.files.map((f) => `${f.name}/${f.size}/${f.lastModified}`));
    for (const file of list) {
      const key = `${file.name}/${file.size}/${file.lastModified}`;
      if (!known.has(key)) { state.files.push(file); known.add(key); }
    }
    showFiles();
  }

  fileInput.addEventListener('change', () => { addFiles(fileInput.files); fileInput.value = ''; });
  clearFiles.addEventListener('click', () => { state.files = []; showFiles(); });
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (ev) => { ev.preventDefault(); drop.classList.add('over'); });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    if (!state.busy && ev.dataTransfer) addFiles(ev.dataTransfer.files);
  });

  const form = h('form', { class: 'new-task', novalidate: true, 'aria-labelledby': 'new-title' },
    h('h1', { id: 'new-title', text: 'New task' }),
    h('section', { class: 'card', 'aria-labelledby': 'files-title' },
      h('h2', { id: 'files-title', text: 'Images and files' }),
      drop, fileSummary, fileList, clearFiles),
    h('section', { class: 'card', 'aria-labelledby': 'task-title' },
      h('h2', { id: 'task-title', text: 'Task' }),
      h('div', { class: 'field' }, h('label', { for: 'task-name', text: 'Name' }), name),
      h('div', { class: 'field' }, h('label', { for: 'task-webhook', text: 'Webhook URL (optional)' }), webhook,
        h('p', { class: 'help', text: 'Called with the task info when the task ends.' }))),
    h('details', { class: 'card options-card' },
      h('summary', { text: 'Processing options' }),
      optionsBox),
    h('div', { class: 'actions' }, submit, retry),
    progressBox);
  replace(view, form);
  showFiles();

  let editor = null;
  try {
    editor = optionsEditor(await loadOptions());
    replace(optionsBox, editor.element);
    optionsBox.className = '';
  } catch (err) {
    if (ctx.handleAuth(err)) return;
    optionsBox.textContent = `Options unavailable: ${err.message}`;
  }

  function setBusy(busy) {
    state.busy = busy;
    submit.disabled = busy;
    fileInput.disabled = busy;
    showFiles();
  }

  // Bytes sent: done requests count in full, running ones by their progress events.
  let totalBytes = 0;
  let doneBytes = 0;
  const running = new Map();
  function showProgress() {
    let sent = doneBytes;
    for (const v of running.values()) sent += v;
    const pct = totalBytes ? Math.min(100, Math.floor((sent / totalBytes) * 100)) : 0;
    progress.value = pct;
    progressText.textContent = `${pct}% — ${formatBytes(Math.min(sent, totalBytes))} of ${formatBytes(totalBytes)} sent`;
  }

  async function uploadBatch(batch, key) {
    const size = batch.reduce((s, f) => s + f.size, 0);
    let lastError = null;
    let attempt = 1;
    for (; attempt <= MAX_ATTEMPTS; attempt += 1) {
      try {
        await send(state.uuid, batch, (loaded, total) => {
          // Multipart overhead makes `total` a bit more than the files' bytes: scale to them.
          running.set(key, total ? Math.floor((loaded / total) * size) : Math.min(loaded, size));
          showProgress();
        }, state.abort.signal);
        running.delete(key);
        doneBytes += size;
        showProgress();
        return null;
      } catch (err) {
        running.delete(key);
        showProgress();
        if (err && err.name === 'AbortError') throw err;
        lastError = err;
        if (err.auth || err.retry === false || attempt === MAX_ATTEMPTS) break;
        progressText.textContent = `Retrying a failed request (attempt ${attempt + 1} of ${MAX_ATTEMPTS})…`;
        await sleep(retryDelayMs(attempt), state.abort.signal);
      }
    }
    return { batch, error: lastError, attempts: Math.min(attempt, MAX_ATTEMPTS) };
  }

  async function uploadAndCommit(groups) {
    totalBytes = groups.flat().reduce((s, f) => s + f.size, 0);
    doneBytes = 0;
    running.clear();
    progressBox.hidden = false;
    showProgress();
    let nextGroup = 0;
    const failures = [];
    async function lane() {
      while (nextGroup < groups.length) {
        const i = nextGroup;
        nextGroup += 1;
        const failed = await uploadBatch(groups[i], i);
        if (failed) failures.push(failed);
      }
    }
    await Promise.all(Array.from({ length: Math.min(PARALLEL_REQUESTS, groups.length) }, lane));
    if (failures.length) {
      state.failed = failures.map((f) => f.batch);
      const names = failures.flatMap((f) => f.batch.map((file) => file.name));
      const reasons = [...new Set(failures.map((f) => `${f.error.message} (${f.attempts} attempt${f.attempts === 1 ? '' : 's'})`))];
      const refused = failures.find((f) => f.error.auth);
      if (refused) { ctx.handleAuth(refused.error); return; }
      showError(`Upload failed for ${names.length} file${names.length === 1 ? '' : 's'}; the task was not started.`,
        `Files: ${names.join(', ')}`, ...reasons.map((r) => `Error: ${r}`),
        'Use “Retry failed files” to send them again.');
      retry.hidden = false;
      progressText.textContent = 'Upload incomplete.';
      return;
    }
    state.failed = [];
    retry.hidden = true;
    progress.value = 100;
    progressText.textContent = '100% — all files sent; starting the task…';
    const committed = await request(`/task/new/commit/${encodeURIComponent(state.uuid)}`, { method: 'POST' });
    ctx.notice('Task created.');
    ctx.go(`#/task/${encodeURIComponent(committed.uuid)}`);
  }

  async function run(work) {
    clearError();
    setBusy(true);
    try {
      await work();
    } catch (err) {
      if (err && err.name === 'AbortError') return;
      if (ctx.handleAuth(err)) return;
      const perOption = optionErrors(err.message);
      if (editor && perOption.length) {
        editor.markErrors(perOption);
        form.querySelector('details.options-card').open = true;
      }
      // The server's message, verbatim (NodeODM's validation text).
      showError(err.message);
    } finally {
      setBusy(false);
    }
  }

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (state.busy) return;
    if (!state.files.length) {
      showError('Add at least one image before starting the task.');
      return;
    }
    run(async () => {
      if (editor) editor.markErrors([]);
      const fields = new FormData();
      if (name.value.trim()) fields.append('name', name.value.trim());
      fields.append('options', JSON.stringify(editor ? editor.values() : []));
      if (webhook.value.trim()) fields.append('webhook', webhook.value.trim());
      const init = await request('/task/new/init', { method: 'POST', form: fields });
      state.uuid = init.uuid;
      await uploadAndCommit(batches(state.files));
    });
  });
  retry.addEventListener('click', () => {
    if (state.busy || !state.uuid || !state.failed.length) return;
    run(() => uploadAndCommit(state.failed));
  });
}
