/**
 * The policies page (#/policies): the policy set being served, its version, and what
 * its own test cases (policy/tests) show each policy deciding.
 * @module policies
 */

import { getPolicySet } from './api.js';
import { el, scrollRegion, timeView } from './dom.js';
import { badge } from './detail-sections.js';
import { isQuiet } from './util.js';

const STATUS_CLASS = { covered: 'state-succeeded', shadowed: 'state-waiting-approval', unreached: 'state-failed' };

function policyRow(c) {
  const status = c.status || 'unreached';
  return el('tr', { 'data-testid': 'policy-row', 'data-policy': c.policyId || '', 'data-status': status },
    el('th', { scope: 'row', class: 'mono' }, c.policyId || '—'),
    el('td', {}, c.effect || '—'),
    el('td', { class: 'mono' }, c.file || '—'),
    el('td', { class: 'num' }, String(c.decided || 0)),
    el('td', { class: 'num' }, String(c.matched || 0)),
    el('td', {}, badge(status, STATUS_CLASS[status] || 'kind')));
}

/**
 * Render the policies page.
 * @param {{root: HTMLElement, signal: AbortSignal}} context
 */
export function renderPolicies({ root, signal }) {
  const summary = el('div', { 'data-testid': 'policy-set' }, el('p', { class: 'muted' }, 'Loading the policy set…'));
  const body = el('tbody');
  const table = el('table', { class: 'data', 'data-testid': 'policies' },
    el('caption', { class: 'visually-hidden' }, 'Policies and their coverage'),
    el('thead', {}, el('tr', {}, ['Policy', 'Effect', 'File', 'Cases decided', 'Cases matched', 'Coverage']
      .map((title) => el('th', { scope: 'col' }, title)))),
    body);
  root.append(el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, 'Policies')),
    el('section', { class: 'panel', 'aria-label': 'Policy set' }, summary),
    scrollRegion(table, 'Policies table'));

  getPolicySet(signal).then((response) => {
    const set = response.policySet || {};
    const coverage = set.coverage || [];
    const covered = coverage.filter((c) => c.status === 'covered').length;
    const facts = [
      el('p', {}, 'Version ', el('span', { class: 'mono', 'data-testid': 'policy-version' }, set.version || '—'),
        ' · loaded ', timeView(set.loadTime)),
      el('p', { 'data-testid': 'policy-coverage' }, coverage.length
        ? `${covered} of ${coverage.length} policies decide at least one of ${set.testCases || 0} test cases`
          + `${set.failedCases ? `; ${set.failedCases} case(s) FAIL` : '; every case passes'}.`
        : 'No test cases ship with this policy set: coverage unknown.'),
    ];
    if (set.lastError) facts.push(el('p', { class: 'notice error', role: 'alert' }, `Last reload refused: ${set.lastError}`));
    summary.replaceChildren(...facts);
    const rows = coverage.length ? coverage.map(policyRow)
      : (set.policyIds || []).map((id) => policyRow({ policyId: id, status: 'unreached' }));
    body.replaceChildren(...rows);
  }).catch((error) => {
    if (isQuiet(error, signal)) return;
    summary.replaceChildren(el('p', { class: 'notice error', role: 'alert' },
      `Could not load the policy set: ${error?.message || 'unknown error'}`));
  });
}
