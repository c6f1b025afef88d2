// DOM helpers. Every piece of data reaches the page as a text node or a property: no innerHTML,
// no HTML strings, no inline styles (the page's Content-Security-Policy forbids them anyway).

const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'multiple', 'open']);

/**
 * Create an element. `props`: `class`, `text` (its text), `on<event>` listeners, `dataset`,
 * the properties in PROPS, anything else as an attribute (string). `children`: nodes or strings
 * (strings become text nodes); null/undefined/false are skipped.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = String(value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (PROPS.has(key)) el[key] = value;
    else if (key === 'style' || key.startsWith('on')) throw new Error(`refused attribute ${key}`);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, ...children);
  return el;
}

/** Append nodes or strings (as text) to `parent`. */
export function append(parent, ...children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replace the children of `parent`. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, ...children);
}

let noticeTimer = 0;

/** Show an error banner (text only); `detail` lines follow the message. */
export function showError(message, ...detail) {
  const banner = document.getElementById('banner');
  const close = h('button', { type: 'button', class: 'banner-close', 'aria-label': 'Dismiss error',
    onclick: clearError }, '×');
  replace(banner, h('div', { class: 'banner-text' },
    h('strong', { text: message }),
    ...detail.filter(Boolean).map((line) => h('div', { class: 'banner-detail', text: line }))),
  close);
  banner.hidden = false;
}

export function clearError() {
  const banner = document.getElementById('banner');
  banner.hidden = true;
  banner.replaceChildren();
}

/** A passing message (success) in the status region. */
export function showNotice(message) {
  const notice = document.getElementById('notice');
  notice.textContent = message;
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { notice.hidden = true; }, 6000);
}

export function formatBytes(n) {
  if (!Number.isFinite(n)) return '?';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '—';
  const s = Math.floor(ms / 1000);
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = s % 60;
  return hh ? `${hh}h ${mm}m ${ss}s` : mm ? `${mm}m ${ss}s` : `${ss}s`;
}

export function formatDate(ms) {
  if (!Number.isFinite(ms)) return '—';
  return new Date(ms).toLocaleString();
}

let ids = 0;
/** A unique element id with a readable prefix. */
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}
