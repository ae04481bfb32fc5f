/**
 * The inbox (#/inbox): gates the logged-in person may decide, refreshed every 5 s.
 * Cards that show a decision, hold a typed comment or have focus are left alone.
 * @module inbox
 */

import { listGates } from './api.js';
import { el } from './dom.js';
import { createGateCard } from './gate-card.js';
import { every, isQuiet } from './util.js';

const REFRESH_EVERY_MS = 5000;

/**
 * Render the inbox.
 * @param {{root: HTMLElement, signal: AbortSignal}} context
 */
export function renderInbox({ root, signal }) {
  const refreshButton = el('button', { type: 'button', class: 'button', 'data-testid': 'refresh' }, 'Refresh');
  const count = el('p', { class: 'muted', role: 'status', 'aria-live': 'polite' }, 'Loading approvals…');
  const problem = el('p', { class: 'notice error', role: 'alert', hidden: true });
  const empty = el('p', { class: 'empty', 'data-testid': 'inbox-empty', hidden: true }, 'Nothing waits for your decision.');
  const list = el('div', { class: 'gate-list' });
  const updated = el('p', { class: 'muted small' });
  root.append(
    el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, 'Approvals'), refreshButton),
    count, problem, empty, list, updated,
  );

  /** @type {Map<string, import('./gate-card.js').GateCard>} */
  const cards = new Map();
  let loading = false;
  let lastCount = -1;

  function showProblem(text) {
    if (problem.textContent !== text) problem.textContent = text;
    problem.hidden = !text;
  }

  function showCount(waiting) {
    if (waiting === lastCount) return;
    lastCount = waiting;
    count.textContent = waiting ? `${waiting} decision${waiting === 1 ? '' : 's'} waiting for you.` : '';
  }

  function apply(gates) {
    const seen = new Set();
    for (const pending of gates) {
      const name = pending?.gate?.name;
      if (!name || seen.has(name)) continue;
      seen.add(name);
      const card = cards.get(name);
      if (card) {
        card.update(pending);
      } else {
        const created = createGateCard(pending, { signal });
        cards.set(name, created);
        list.append(created.element);
      }
    }
    for (const [name, card] of cards) {
      if (seen.has(name) || card.locked()) continue;
      card.element.remove();
      cards.delete(name);
    }
    empty.hidden = seen.size > 0;
    showCount(seen.size);
  }

  async function refresh() {
    if (loading || signal.aborted) return;
    loading = true;
    list.setAttribute('aria-busy', 'true');
    try {
      const { gates = [] } = await listGates(signal);
      if (signal.aborted) return;
      apply(gates);
      showProblem('');
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every 5 seconds.`;
    } catch (error) {
      if (isQuiet(error, signal)) return;
      if (lastCount < 0) count.textContent = '';
      showProblem(`Could not load approvals: ${error?.message || 'unknown error'}`);
    } finally {
      loading = false;
      list.removeAttribute('aria-busy');
    }
  }

  refreshButton.addEventListener('click', refresh);
  every(refresh, REFRESH_EVERY_MS, signal);
  refresh();
}
