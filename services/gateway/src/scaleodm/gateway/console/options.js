// The processing options editor, generated from GET /options (nodeodm-api §3.2): one control per
// option by its type (bool: checkbox, enum: select, others: text, so that whatever is typed
// reaches the server and its own validation message comes back), its default and help shown.
// Only options whose value differs from the default are sent (NodeODM then applies defaults).

import { h, replace, uid } from './dom.js';
import { request } from './api.js';

let catalog = null;

/** The option catalog (cached for the page's life). */
export async function loadOptions() {
  if (!catalog) {
    const body = await request('/options');
    catalog = Array.isArray(body) ? body : [];
  }
  return catalog;
}

function helpText(option) {
  const choices = Array.isArray(option.domain) ? option.domain.join(', ') : String(option.domain ?? '');
  return String(option.help ?? '')
    .replaceAll('%(default)s', String(option.value ?? ''))
    .replaceAll('%(choices)s', choices);
}

function asText(value) {
  if (value === null || value === undefined) return '';
  if (typeof value === 'string') return value;
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

/**
 * Build an editor. `initial`: [{name, value}] to start from (a task's options for a restart).
 * Returns {element, values(), markErrors(list), reset()}.
 */
export function optionsEditor(options, initial = []) {
  const start = new Map(initial.map((o) => [o.name, asText(o.value)]));
  const rows = [];
  const search = h('input', { type: 'search', id: uid('opt-search'), placeholder: 'e.g. dsm, resolution',
    autocomplete: 'off' });
  const changedOnly = h('input', { type: 'checkbox', id: uid('opt-changed') });
  const count = h('span', { class: 'muted', 'aria-live': 'polite' });
  const list = h('div', { class: 'options-list' });

  for (const option of options) {
    const name = String(option.name);
    const id = uid(`opt-${name.replace(/[^A-Za-z0-9_-]/g, '_')}`);
    const helpId = `${id}-help`;
    const errorId = `${id}-error`;
    const type = String(option.type);
    const def = asText(option.value);
    const value = start.has(name) ? start.get(name) : def;
    let control;
    if (type === 'bool') {
      control = h('input', { type: 'checkbox', id, checked: value === 'true', 'aria-describedby': helpId,
        dataset: { option: name } });
    } else if (type === 'enum' && Array.isArray(option.domain)) {
      const choices = option.domain.map(String);
      if (!choices.includes(value)) choices.unshift(value);
      control = h('select', { id, 'aria-describedby': helpId, dataset: { option: name } },
        choices.map((c) => h('option', { value: c, selected: c === value, text: c === '' ? '(none)' : c })));
    } else {
      control = h('input', { type: 'text', id, value, 'aria-describedby': helpId, autocomplete: 'off',
        spellcheck: 'false', inputmode: type === 'int' ? 'numeric' : type === 'float' ? 'decimal' : undefined,
        dataset: { option: name } });
    }
    const error = h('p', { class: 'field-error', id: errorId, hidden: true });
    const domain = Array.isArray(option.domain) ? '' : String(option.domain ?? '');
    const row = h('div', { class: 'option', dataset: { name } },
      h('div', { class: 'option-head' },
        h('label', { for: id, class: 'option-name', text: name }),
        control),
      h('p', { class: 'help', id: helpId },
        h('span', { class: 'option-meta', text: `${type}${domain ? ` (${domain})` : ''}, default: ${def === '' ? '(empty)' : def}. ` }),
        helpText(option)),
      error);
    const current = () => (type === 'bool' ? String(control.checked) : control.value);
    const entry = { name, type, def, control, row, error, current };
    control.addEventListener('input', () => { row.classList.toggle('changed', current() !== def); });
    control.addEventListener('change', () => { row.classList.toggle('changed', current() !== def); });
    row.classList.toggle('changed', value !== def);
    rows.push(entry);
    list.append(row);
  }

  function filter() {
    const q = search.value.trim().toLowerCase();
    let shown = 0;
    for (const r of rows) {
      const visible = (!q || r.name.includes(q)) && (!changedOnly.checked || r.current() !== r.def);
      r.row.hidden = !visible;
      if (visible) shown += 1;
    }
    count.textContent = `${shown} of ${rows.length} options shown`;
  }
  search.addEventListener('input', filter);
  changedOnly.addEventListener('change', filter);
  filter();

  const element = h('div', { class: 'options-editor' },
    h('div', { class: 'options-tools' },
      h('label', { for: search.id, text: 'Search options' }), search,
      h('label', { class: 'inline' }, changedOnly, ' Changed only'),
      h('button', { type: 'button', class: 'secondary', onclick: reset, text: 'Reset to defaults' }),
      count),
    list);

  function reset() {
    for (const r of rows) {
      if (r.type === 'bool') r.control.checked = r.def === 'true';
      else r.control.value = r.def;
      r.row.classList.remove('changed');
    }
    markErrors([]);
    filter();
  }

  /** [{name, value}] of the options that differ from their default. */
  function values() {
    const out = [];
    for (const r of rows) {
      const v = r.current();
      if (v === r.def) continue;
      out.push({ name: r.name, value: r.type === 'bool' ? v === 'true' : v });
    }
    return out;
  }

  /** Show per-option messages ([{name, error}]) next to their controls; [] clears them. */
  function markErrors(errors) {
    const byName = new Map(errors.map((e) => [String(e.name), String(e.error)]));
    let first = null;
    for (const r of rows) {
      const message = byName.get(r.name);
      r.error.hidden = !message;
      replace(r.error, message || '');
      if (message) {
        r.control.setAttribute('aria-invalid', 'true');
        r.control.setAttribute('aria-errormessage', r.error.id);
        r.row.hidden = false;
        first = first || r.control;
      } else {
        r.control.removeAttribute('aria-invalid');
        r.control.removeAttribute('aria-errormessage');
      }
    }
    return first;
  }

  return { element, values, markErrors, reset };
}

/**
 * NodeODM's option errors are a JSON string inside `error` (nodeodm-api §5.1):
 * '[{"name": ..., "error": ...}]'. The list, or [] when the message is something else.
 */
export function optionErrors(message) {
  if (typeof message !== 'string' || !message.startsWith('[')) return [];
  try {
    const list = JSON.parse(message);
    return Array.isArray(list) ? list.filter((e) => e && typeof e === 'object' && 'name' in e) : [];
  } catch {
    return [];
  }
}
