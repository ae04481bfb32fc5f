/**
 * The workflow list (#/workflows?state=…&template=…&started_by=…&after=…&before=…):
 * filters live in the hash query; pages are walked with a stack of page tokens.
 * @module workflows
 */

import { listWorkflows } from './api.js';
import { el, scrollRegion, timeView, uniqueId } from './dom.js';
import {
  WORKFLOW_STATES, lastSegment, stateClass, stripEnum, workflowHref, workflowState,
} from './format.js';
import { isQuiet } from './util.js';

const PAGE_SIZE = 20;

/**
 * @typedef {object} Filters
 * @property {string} state full enum name or ""
 * @property {string} template
 * @property {string} started_by
 * @property {string} after RFC 3339 or ""
 * @property {string} before RFC 3339 or ""
 */

function validTime(value) {
  return value && !Number.isNaN(Date.parse(value)) ? value : '';
}

/**
 * Filters from the hash query; unknown or malformed values are dropped.
 * @param {URLSearchParams} query
 * @returns {Filters}
 */
export function readFilters(query) {
  const state = stripEnum(query.get('state') || '', 'WORKFLOW_STATE_');
  return {
    state: WORKFLOW_STATES.includes(state) ? `WORKFLOW_STATE_${state}` : '',
    template: (query.get('template') || '').trim(),
    started_by: (query.get('started_by') || '').trim(),
    after: validTime(query.get('after')),
    before: validTime(query.get('before')),
  };
}

/**
 * A datetime-local value (local time) as RFC 3339 UTC, or "".
 * @param {string} local e.g. "2025-03-01T09:30"
 * @returns {string}
 */
export function localToRfc3339(local) {
  if (!local) return '';
  const date = new Date(local);
  return Number.isNaN(date.getTime()) ? '' : date.toISOString().replace(/\.000Z$/, 'Z');
}

/**
 * An RFC 3339 time as a datetime-local value in local time, or "".
 * @param {string} iso
 * @returns {string}
 */
export function rfc3339ToLocal(iso) {
  const date = new Date(iso || '');
  if (!iso || Number.isNaN(date.getTime())) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`
    + `T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

function filtersHash(filters) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) if (value) params.set(key, value);
  const text = params.toString();
  return text ? `#/workflows?${text}` : '#/workflows';
}

function field(label, control) {
  return el('div', { class: 'field' }, el('label', { for: control.id }, label), control);
}

function filterForm(filters) {
  const state = el('select', { id: uniqueId('state'), name: 'state' },
    el('option', { value: '' }, 'All'),
    WORKFLOW_STATES.map((name) => el('option', {
      value: `WORKFLOW_STATE_${name}`, selected: filters.state === `WORKFLOW_STATE_${name}`,
    }, name)));
  const input = (name, type = 'text', value = '') => el('input', { id: uniqueId(name), name, type, value });
  return el('form', { class: 'filters', 'data-testid': 'workflow-filters', role: 'search', 'aria-label': 'Filter workflows' },
    field('State', state),
    field('Template', input('template', 'text', filters.template)),
    field('Started by', input('started_by', 'text', filters.started_by)),
    field('Created after', input('after', 'datetime-local', rfc3339ToLocal(filters.after))),
    field('Created before', input('before', 'datetime-local', rfc3339ToLocal(filters.before))),
    el('div', { class: 'actions' },
      el('button', { type: 'submit', class: 'button primary' }, 'Filter'),
      el('a', { href: '#/workflows', class: 'button link' }, 'Clear')));
}

function formFilters(form) {
  const data = new FormData(form);
  const text = (name) => String(data.get(name) || '').trim();
  return {
    state: text('state'),
    template: text('template'),
    started_by: text('started_by'),
    after: localToRfc3339(text('after')),
    before: localToRfc3339(text('before')),
  };
}

function workflowRow(workflow) {
  const id = lastSegment(workflow.name);
  const state = workflowState(workflow.state);
  return el('tr', { 'data-testid': 'workflow-row', 'data-workflow': id },
    el('th', { scope: 'row' }, el('a', { href: workflowHref(id), class: 'mono' }, id)),
    el('td', {}, workflow.plan?.template || '—'),
    el('td', { class: 'goal' }, workflow.goal || '—'),
    el('td', {}, el('span', { class: `badge ${stateClass(state)}`, 'data-testid': 'row-state' }, state)),
    el('td', {}, workflow.startedBy || '—'),
    el('td', {}, timeView(workflow.createTime)));
}

function workflowTable() {
  const body = el('tbody');
  const table = el('table', { 'data-testid': 'workflows', class: 'data' },
    el('caption', { class: 'visually-hidden' }, 'Workflows, newest first'),
    el('thead', {}, el('tr', {}, ['Workflow', 'Template', 'Goal', 'State', 'Started by', 'Created']
      .map((title) => el('th', { scope: 'col' }, title)))),
    body);
  return { table, body };
}

/**
 * Render the workflow list.
 * @param {{root: HTMLElement, signal: AbortSignal, query: URLSearchParams}} context
 */
export function renderWorkflows({ root, signal, query }) {
  const filters = readFilters(query);
  const form = filterForm(filters);
  const { table, body } = workflowTable();
  const status = el('p', { class: 'muted', role: 'status', 'aria-live': 'polite' });
  const problem = el('div');
  const previous = el('button', { type: 'button', class: 'button', 'data-testid': 'previous-page', disabled: true }, 'Previous');
  const next = el('button', { type: 'button', class: 'button', 'data-testid': 'next-page', disabled: true }, 'Next');
  const pageLabel = el('span', { class: 'muted' });
  root.append(
    el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, 'Workflows')),
    form, problem, status, scrollRegion(table, 'Workflows table'),
    el('nav', { class: 'pager', 'aria-label': 'Pages' }, previous, pageLabel, next),
  );

  /** Tokens of the pages before the current one. */
  const stack = [];
  let current = '';
  let nextToken = '';
  let loading = false;

  function showRows(workflows) {
    if (workflows.length) {
      body.replaceChildren(...workflows.map(workflowRow));
      return;
    }
    const anyFilter = Object.values(filters).some(Boolean);
    body.replaceChildren(el('tr', {}, el('td', { colspan: '6', class: 'empty', 'data-testid': 'workflows-empty' },
      anyFilter ? 'No workflows match these filters.' : 'No workflows yet.')));
  }

  /**
   * Load one page; commit runs (e.g. moves the token stack) only when it arrived.
   * @param {string} token
   * @param {() => void} [commit]
   */
  async function load(token, commit = () => {}) {
    if (loading) return;
    loading = true;
    table.setAttribute('aria-busy', 'true');
    status.textContent = 'Loading…';
    try {
      const response = await listWorkflows({
        page_size: PAGE_SIZE, page_token: token, state: filters.state, template: filters.template,
        started_by: filters.started_by, create_time_after: filters.after, create_time_before: filters.before,
      }, signal);
      if (signal.aborted) return;
      commit();
      current = token;
      const workflows = response.workflows || [];
      nextToken = response.nextPageToken || '';
      showRows(workflows);
      problem.replaceChildren();
      pageLabel.textContent = `Page ${stack.length + 1}`;
      status.textContent = `${workflows.length} workflow${workflows.length === 1 ? '' : 's'} on page ${stack.length + 1}.`;
    } catch (error) {
      if (isQuiet(error, signal)) return;
      status.textContent = '';
      problem.replaceChildren(el('p', { class: 'notice error', role: 'alert' },
        `Could not load workflows: ${error?.message || 'unknown error'}`));
    } finally {
      loading = false;
      table.removeAttribute('aria-busy');
      next.disabled = !nextToken;
      previous.disabled = stack.length === 0;
    }
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const hash = filtersHash(formFilters(form));
    if (hash === location.hash) load('', () => { stack.length = 0; });
    else location.hash = hash;
  });
  next.addEventListener('click', () => {
    const from = current;
    if (nextToken) load(nextToken, () => stack.push(from));
  });
  previous.addEventListener('click', () => {
    if (stack.length) load(stack[stack.length - 1], () => stack.pop());
  });
  load('');
}
