/**
 * One pending gate in the inbox: what waits, who asked, and the decision form.
 * After a decision the card follows the workflow's state for up to two minutes.
 * @module gate-card
 */

import { decideGate, getWorkflow } from './api.js';
import { el, refreshRelativeTimes, timeView, uniqueId } from './dom.js';
import {
  TERMINAL_WORKFLOW_STATES, compactValue, gateKindWords, quorumText, stateClass, workflowHref,
  workflowIdOf, workflowState,
} from './format.js';
import { isQuiet, sleep } from './util.js';

const REDACTED = '[redacted]';
const FOLLOW_FOR_MS = 2 * 60 * 1000;
const POLL_EVERY_MS = 1000;
const APPROVE = 'GATE_DECISION_APPROVE';
const REJECT = 'GATE_DECISION_REJECT';

function argumentValue(value) {
  if (value === REDACTED) {
    return el('span', { class: 'badge redacted', title: 'Hidden from reviewers by the tool proxy' }, 'redacted');
  }
  if (value !== null && typeof value === 'object') return el('code', {}, JSON.stringify(value));
  return String(value);
}

function argumentList(args) {
  const list = el('dl', { class: 'arguments', 'data-testid': 'gate-arguments' });
  for (const [name, value] of Object.entries(args)) {
    list.append(el('div', { class: 'argument' }, el('dt', {}, name), el('dd', {}, argumentValue(value))));
  }
  return list;
}

function workflowLink(pending, workflowId) {
  return el('a', { href: workflowHref(workflowId), 'data-testid': 'gate-workflow', class: 'workflow-link' },
    el('strong', {}, pending.template || 'workflow'),
    pending.goal ? ` · ${pending.goal}` : '',
    el('span', { class: 'muted mono' }, ` (${workflowId})`));
}

function approvalsView(gate) {
  const who = gate.approvedBy || [];
  return [
    el('span', { 'data-testid': 'gate-quorum' }, quorumText(gate)),
    who.length ? el('span', { class: 'muted' }, ` · so far: ${who.join(', ')}`) : null,
  ];
}

function row(label, ...value) {
  return el('div', {}, el('dt', {}, label), el('dd', {}, ...value));
}

function detailsView(pending, titleId) {
  const gate = pending.gate || {};
  const args = gate.arguments && typeof gate.arguments === 'object' ? gate.arguments : {};
  const workflowId = workflowIdOf(pending.workflow || gate.name);
  const policies = gate.policyIds || [];
  const title = gate.tool
    ? el('span', { 'data-testid': 'gate-tool', class: 'mono' }, gate.tool)
    : gateKindWords(gate.kind);
  const hasAmount = Object.prototype.hasOwnProperty.call(args, 'amount');
  return [
    el('header', { class: 'gate-head' },
      el('h2', { id: titleId }, title),
      el('span', { class: 'badge kind' }, gateKindWords(gate.kind)),
      hasAmount ? el('p', { class: 'amount' },
        el('span', { class: 'label' }, 'Amount '),
        el('span', { 'data-testid': 'gate-amount' }, compactValue(args.amount)),
        typeof args.currency === 'string' ? ` ${args.currency}` : null) : null),
    el('dl', { class: 'facts gate-facts' },
      row('Workflow', workflowLink(pending, workflowId)),
      row('Requested by', el('span', { 'data-testid': 'gate-started-by' }, pending.startedBy || 'unknown')),
      row('Reason', el('span', { 'data-testid': 'gate-reason' }, gate.reason || '—')),
      row('Policies', el('span', { 'data-testid': 'gate-policies', class: 'mono' }, policies.join(', ') || '—')),
      row('Approvals', ...approvalsView(gate)),
      row('Expires', el('span', { 'data-testid': 'gate-expiry' },
        gate.expireTime ? timeView(gate.expireTime) : 'never')),
      gate.taskId ? row('Task', el('span', { class: 'mono' }, gate.taskId)) : null,
      gate.createTime ? row('Opened', timeView(gate.createTime)) : null),
    el('h3', { class: 'subhead' }, 'Arguments'),
    Object.keys(args).length ? null : el('p', { class: 'muted' }, 'No arguments.'),
    argumentList(args),
  ];
}

/**
 * @typedef {object} GateCard
 * @property {HTMLElement} element the <article>
 * @property {(pending: object) => void} update show fresher data (ignored once locked)
 * @property {() => boolean} locked true while a decision runs or is shown, a comment is
 *   typed, or focus is inside: the inbox refresh must not replace or remove it then
 */

/**
 * Build the card of one PendingGate.
 * @param {object} pending PendingGate {gate, workflow, goal, template, startedBy, workflowCreateTime}
 * @param {{signal: AbortSignal}} options signal of the inbox view
 * @returns {GateCard}
 */
export function createGateCard(pending, { signal }) {
  const gate = pending.gate || {};
  const workflowId = workflowIdOf(pending.workflow || gate.name);
  const titleId = uniqueId('gate-title');
  const commentId = uniqueId('comment');
  let snapshot = JSON.stringify(pending);
  let busy = false;
  let shown = false;

  const details = el('div', { class: 'gate-details' }, detailsView(pending, titleId));
  const comment = el('textarea', { id: commentId, name: 'comment', rows: '2' });
  const approve = el('button', { type: 'button', class: 'button primary', 'data-testid': 'approve' }, 'Approve');
  const reject = el('button', { type: 'button', class: 'button danger', 'data-testid': 'reject' }, 'Reject');
  const result = el('p', { class: 'gate-result', 'data-testid': 'gate-result', role: 'status', 'aria-live': 'polite' });
  const decision = el('div', { class: 'decision' },
    el('div', { class: 'field' }, el('label', { for: commentId }, 'Comment (optional, kept in the audit trail)'), comment),
    el('div', { class: 'actions' }, approve, reject),
    result);
  const article = el('article', {
    class: 'card gate', 'data-testid': 'gate', 'data-gate': gate.name || '', 'aria-labelledby': titleId,
  }, details, decision);

  function setButtons(enabled) {
    approve.disabled = !enabled;
    reject.disabled = !enabled;
  }

  function showResult(text, tone) {
    shown = true;
    result.textContent = text;
    result.className = `gate-result ${tone}`;
  }

  function showQuorum(decided) {
    const quorum = details.querySelector('[data-testid="gate-quorum"]');
    if (quorum && decided) quorum.textContent = quorumText(decided);
  }

  async function decide(choice) {
    if (busy) return;
    busy = true;
    setButtons(false);
    article.setAttribute('aria-busy', 'true');
    try {
      const response = await decideGate(gate.name, choice, comment.value.trim(), signal);
      showResult(choice === APPROVE ? 'Approved by you' : 'Rejected', choice === APPROVE ? 'ok' : 'rejected');
      showQuorum(response?.gate);
      comment.disabled = true;
      followWorkflow();
    } catch (error) {
      if (isQuiet(error, signal)) return;
      showResult(error?.message || 'The decision failed.', 'error');
      setButtons(true);
    } finally {
      busy = false;
      article.removeAttribute('aria-busy');
    }
  }

  async function followWorkflow() {
    if (!workflowId) return;
    const stateView = el('span', { 'data-testid': 'gate-workflow-state', class: 'badge' }, 'checking…');
    const note = el('span', { class: 'muted' });
    decision.append(el('p', { class: 'follow', 'aria-live': 'polite' }, 'Workflow state: ', stateView, ' ', note));
    const until = Date.now() + FOLLOW_FOR_MS;
    while (!signal.aborted && Date.now() < until) {
      try {
        const { workflow = {} } = await getWorkflow(workflowId, signal);
        const state = workflowState(workflow.state);
        stateView.textContent = state;
        stateView.className = `badge ${stateClass(state)}`;
        note.textContent = '';
        if (TERMINAL_WORKFLOW_STATES.has(state)) return;
      } catch (error) {
        if (isQuiet(error, signal)) return;
        note.textContent = `(could not refresh: ${error?.message || 'error'})`;
      }
      await sleep(POLL_EVERY_MS, signal);
    }
  }

  function locked() {
    return busy || shown || comment.value.trim() !== '' || article.contains(document.activeElement);
  }

  function update(next) {
    const text = JSON.stringify(next);
    if (locked() || text === snapshot) {
      refreshRelativeTimes(article);
      return;
    }
    snapshot = text;
    details.replaceChildren(...detailsView(next, titleId));
  }

  approve.addEventListener('click', () => decide(APPROVE));
  reject.addEventListener('click', () => decide(REJECT));
  return { element: article, update, locked };
}
