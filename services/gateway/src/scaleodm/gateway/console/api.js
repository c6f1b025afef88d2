// The NodeODM API of this gateway, as the console uses it.
//
// The token (NodeODM's `?token=`) lives in sessionStorage only: this tab, until it closes. It is
// added to the query string of every request, EventSource included (which cannot send headers),
// and never to the page's own URL. NodeODM answers application errors as HTTP 200
// {"error": "..."} (nodeodm-api §1.1): `request` turns those into an ApiError carrying the
// server's message verbatim.

const TOKEN_KEY = 'scaleodm.console.token';

export const token = {
  get() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
  },
  set(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch { /* storage refused (private mode): the token is then not kept */ }
  },
};

// NodeODM status codes (nodeodm-api §4.1) and the event kinds that set them (routes/events.py).
export const STATUS = Object.freeze({ 10: 'queued', 20: 'running', 30: 'failed', 40: 'completed', 50: 'canceled' });
export const KIND_STATUS = Object.freeze({
  queued: 10, admitted: 10, running: 20, failed: 30, completed: 40, canceled: 50,
});
export const EVENT_KINDS = Object.freeze([
  'queued', 'admitted', 'running', 'inputs', 'progress', 'output', 'completed', 'failed',
  'canceled', 'removed', 'child',
]);
export const TERMINAL = new Set([30, 40, 50]);

export class ApiError extends Error {
  constructor(message, { auth = false, body = null, retry = true } = {}) {
    super(message);
    this.name = 'ApiError';
    this.auth = auth; // the token was refused
    this.body = body;
    this.retry = retry; // worth trying again (false: NodeODM's noRetry)
  }
}

/** Whether a NodeODM error message is a refused credential (nodeodm-api §1.3). */
export function isAuthError(message) {
  return typeof message === 'string' && message.startsWith('Invalid authentication');
}

/** `path` with `params` and the token in its query string (relative to this origin). */
export function apiUrl(path, params = {}) {
  const url = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
  }
  const t = token.get();
  if (t) url.searchParams.set('token', t);
  return url.pathname + url.search;
}

/**
 * An absolute download URL given by the server (STAC asset hrefs carry no token) with the token
 * added, only when it points to this origin: the token is never sent elsewhere.
 */
export function withToken(href) {
  let url;
  try { url = new URL(href, window.location.origin); } catch { return null; }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return null;
  const t = token.get();
  if (t && url.origin === window.location.origin) url.searchParams.set('token', t);
  return url.href;
}

/** The error answered by the server in `body`, or null. */
function errorOf(body) {
  if (body && typeof body === 'object' && !Array.isArray(body) && 'error' in body) {
    return new ApiError(String(body.error), { auth: isAuthError(String(body.error)), body,
      retry: body.noRetry !== true });
  }
  return null;
}

/** Parse a response of the API: JSON, or an ApiError. */
export async function parse(response, what) {
  const type = response.headers.get('content-type') || '';
  if (!response.ok) {
    throw new ApiError(`${what}: the server answered HTTP ${response.status}`,
      { retry: response.status >= 500 || response.status === 429 });
  }
  if (!/^application\/([a-z.-]+\+)?json\b/.test(type)) { // JSON, GeoJSON (STAC), TileJSON
    throw new ApiError(`${what}: unexpected answer (${type || 'no content type'})`);
  }
  let body;
  try { body = await response.json(); } catch {
    throw new ApiError(`${what}: the answer is not valid JSON`);
  }
  const error = errorOf(body);
  if (error) throw error;
  return body;
}

/**
 * Call the API. `form`: an object sent urlencoded (cancel/remove/restart) or a FormData sent as
 * multipart (init). Resolves with the JSON body; rejects with an ApiError.
 */
export async function request(path, { method = 'GET', params, form, signal } = {}) {
  let body;
  if (form instanceof FormData) body = form;
  else if (form) body = new URLSearchParams(form);
  let response;
  try {
    response = await fetch(apiUrl(path, params), {
      method, body, signal, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer',
    });
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(`Cannot reach the server (${path}): ${err && err.message ? err.message : err}`);
  }
  return parse(response, path);
}

/**
 * Follow an event stream. `onEvent(kind, data, id)` for every event; `onState(state)` with
 * 'open', 'reconnecting' or 'closed' (EventSource stopped: an error answer, or 204 at the end of
 * a finished task's stream). Returns the EventSource (call `.close()`).
 */
export function follow(path, params, onEvent, onState = () => {}) {
  const source = new EventSource(apiUrl(path, params));
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      onEvent(kind, data, ev.lastEventId);
    });
  }
  source.addEventListener('open', () => onState('open'));
  source.addEventListener('error', () => {
    onState(source.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting');
  });
  return source;
}

/** Run `worker(item)` over `items`, at most `limit` at a time. */
export async function pool(items, limit, worker) {
  const results = new Array(items.length);
  let next = 0;
  async function lane() {
    while (next < items.length) {
      const i = next;
      next += 1;
      results[i] = await worker(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  return results;
}
