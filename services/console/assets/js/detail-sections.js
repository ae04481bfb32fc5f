/**
 * Sections of the workflow detail page built from a Workflow (and its events):
 * summary, tasks, gates, blackboard, budget, compensation.
 * @module detail-sections
 */

import { el, definitionList, jsonBlock, scrollRegion, timeView } from './dom.js';
import {
  enumWords, formatMicros, gateKindWords, gateState, quorumText, stateClass, statusText, taskState,
  toNumber, workflowState,
} from './format.js';
import { usageText } from './timeline.js';
import { eventKind } from './watch.js';

const USAGE_FIELDS = new Set(['tokens', 'costMicros', 'toolCalls']);

/**
 * A small coloured label.
 * @param {string} text
 * @param {string} className e.g. "state-succeeded"
 * @param {Record<string, unknown>} [attrs]
 * @returns {HTMLElement}
 */
export function badge(text, className, attrs = {}) {
  return el('span', { class: `badge ${className}`, ...attrs }, text);
}

/**
 * A data table in a horizontally scrollable region.
 * @param {string} label caption (read by screen readers)
 * @param {string[]} headings
 * @param {HTMLElement[]} rows
 * @returns {HTMLElement}
 */
export function table(label, headings, rows) {
  return scrollRegion(el('table', { class: 'data' },
    el('caption', { class: 'visually-hidden' }, label),
    el('thead', {}, el('tr', {}, headings.map((title) => el('th', { scope: 'col' }, title)))),
    el('tbody', {}, rows)), label);
}

function camelWords(name) {
  return enumWords(name.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase());
}

/**
 * Key facts of a workflow: state, people, times, result or error.
 * @param {object} workflow
 * @returns {HTMLElement[]}
 */
export function summaryView(workflow) {
  const state = workflowState(workflow.state);
  const error = statusText(workflow.error);
  return [
    definitionList([
      ['State', badge(state, stateClass(state), { 'data-testid': 'workflow-state' })],
      ['Template', workflow.plan?.template || '—'],
      ['Goal', workflow.goal || '—'],
      ['Started by', workflow.startedBy || '—'],
      ['Created', timeView(workflow.createTime)],
      ['Updated', timeView(workflow.updateTime)],
      ['Deadline', workflow.deadline ? timeView(workflow.deadline) : ''],
      ['Events', workflow.eventCount ? String(toNumber(workflow.eventCount)) : ''],
      ['Request id', workflow.requestId ? el('span', { class: 'mono' }, workflow.requestId) : ''],
    ], 'facts summary'),
    error ? el('div', { class: 'notice error' }, el('strong', {}, 'Error: '), error) : null,
    workflow.result ? el('div', { class: 'result' }, el('h3', { class: 'subhead' }, 'Result'), jsonBlock(workflow.result)) : null,
  ].filter(Boolean);
}

/**
 * Tasks table: planned tasks (in plan order) and tasks added at run time.
 * @param {object} workflow
 * @returns {HTMLElement}
 */
export function tasksView(workflow) {
  const statuses = new Map((workflow.tasks || []).map((t) => [t.taskId, t]));
  const ids = [...new Set([...(workflow.plan?.tasks || []).map((t) => t.id), ...statuses.keys()])].filter(Boolean);
  if (!ids.length) return el('p', { class: 'empty' }, 'No tasks.');
  const specs = new Map((workflow.plan?.tasks || []).map((t) => [t.id, t]));
  const rows = ids.map((id) => {
    const status = statuses.get(id) || {};
    const spec = specs.get(id) || {};
    const state = taskState(status.state);
    const waiting = status.waitingReason
      ? [status.waitingReason, status.retryTime ? el('span', { class: 'muted' }, ' · retry ', timeView(status.retryTime)) : null]
      : '—';
    return el('tr', { 'data-task-row': id },
      el('th', { scope: 'row', class: 'mono' }, id, spec.optional ? el('span', { class: 'badge optional' }, 'optional') : null),
      el('td', {}, status.capability || spec.capability || '—'),
      el('td', {}, badge(state, stateClass(state))),
      el('td', { class: 'num' }, String(toNumber(status.attempts))),
      el('td', { class: 'mono' }, status.agent || '—'),
      el('td', {}, waiting),
      el('td', {}, statusText(status.error) || '—'));
  });
  return table('Tasks', ['Task', 'Capability', 'State', 'Attempts', 'Agent', 'Waiting reason', 'Error'], rows);
}

/**
 * Gates table: state, who decided, comment, quorum.
 * @param {object} workflow
 * @returns {HTMLElement}
 */
export function gatesView(workflow) {
  const gates = workflow.gates || [];
  if (!gates.length) return el('p', { class: 'empty' }, 'No gates opened.');
  const rows = gates.map((gate) => {
    const state = gateState(gate.state);
    const approvers = gate.approvedBy || [];
    const pending = state === 'PENDING';
    return el('tr', {},
      el('th', { scope: 'row', class: 'mono' }, (gate.name || '').split('/').pop() || '—'),
      el('td', { class: 'mono' }, gate.taskId || '—'),
      el('td', {}, gateKindWords(gate.kind), gate.tool ? el('div', { class: 'mono muted' }, gate.tool) : null),
      el('td', {}, badge(state, stateClass(state)),
        pending ? el('div', {}, el('a', { href: '#/inbox' }, 'Decide in the inbox')) : null),
      el('td', {}, quorumText(gate), approvers.length ? el('div', { class: 'muted' }, approvers.join(', ')) : null),
      el('td', {}, gate.decidedBy || '—'),
      el('td', {}, gate.comment || '—'),
      el('td', {}, gate.reason || '—'),
      el('td', {}, pending ? ['expires ', timeView(gate.expireTime, { empty: 'never' })] : timeView(gate.decideTime)));
  });
  return table('Gates', ['Gate', 'Task', 'Kind', 'State', 'Approvals', 'Decided by', 'Comment', 'Reason', 'Decided / expires'], rows);
}

/**
 * Blackboard: version, and each key with its JSON value and writer.
 * @param {object} workflow
 * @param {Map<string, string>} writers key → task id (from the timeline)
 * @returns {HTMLElement[]}
 */
export function blackboardView(workflow, writers) {
  const board = workflow.blackboard || {};
  const keys = Object.keys(board).sort();
  const version = el('p', {}, 'Version ', el('strong', { 'data-testid': 'blackboard-version' }, String(toNumber(workflow.blackboardVersion))));
  if (!keys.length) return [version, el('p', { class: 'empty' }, 'The blackboard is empty.')];
  const rows = keys.map((key) => el('tr', { 'data-key': key },
    el('th', { scope: 'row', class: 'mono' }, key),
    el('td', {}, jsonBlock(board[key])),
    el('td', { class: 'mono writer' }, writers.get(key) || el('span', { class: 'muted' }, 'initial input'))));
  return [version, table('Blackboard entries', ['Key', 'Value', 'Written by'], rows)];
}

function meter(label, used, limit) {
  if (!limit) return el('span', { class: 'muted' }, 'no cap');
  const percent = Math.round((used / limit) * 100);
  return el('span', { class: `meter${used > limit ? ' over' : ''}` },
    el('meter', {
      min: '0', max: String(limit), value: String(Math.min(used, limit)), low: String(limit * 0.75),
      high: String(limit * 0.9), optimum: '0', 'aria-label': `${label}: ${percent}% of the budget`,
    }),
    ` ${percent}%`);
}

function budgetRow(label, used, limit, format = (n) => n.toLocaleString()) {
  return el('tr', {},
    el('th', { scope: 'row' }, label),
    el('td', { class: 'num' }, format(used)),
    el('td', { class: 'num' }, limit ? format(limit) : '—'),
    el('td', {}, meter(label, used, limit)));
}

function extraUsage(usage) {
  const pairs = Object.entries(usage).filter(([key]) => !USAGE_FIELDS.has(key));
  if (!pairs.length) return null;
  return definitionList(pairs.map(([key, value]) => [camelWords(key),
    value && typeof value === 'object' ? (usageText(value) || 'nothing') : String(value)]), 'facts');
}

/**
 * Budget: consumption against the plan's budget, plus reserved / spent when Usage has them.
 * @param {object} workflow
 * @param {object[]} events (iterations = tasks dispatched)
 * @returns {HTMLElement[]}
 */
export function budgetView(workflow, events) {
  const usage = workflow.usage || {};
  const budget = workflow.plan?.budget || {};
  const iterations = events.filter((event) => eventKind(event) === 'taskDispatched').length;
  const rows = [
    budgetRow('Tokens', toNumber(usage.tokens), toNumber(budget.maxTokens)),
    budgetRow('Cost', toNumber(usage.costMicros), toNumber(budget.maxCostMicros), formatMicros),
    budgetRow('Tool calls', toNumber(usage.toolCalls), toNumber(budget.maxToolCalls)),
    budgetRow('Task executions', iterations, toNumber(budget.maxIterations) || toNumber(workflow.plan?.maxIterations)),
  ];
  return [
    table('Budget', ['Resource', 'Used', 'Limit', 'Share of budget'], rows),
    el('p', { class: 'muted small' }, 'Cost in units of the billing currency; task executions counted from the timeline.'),
    extraUsage(usage),
  ].filter(Boolean);
}

function taskList(ids, className) {
  return el('ul', { class: `chips ${className}` }, ids.map((id) => el('li', { class: 'mono' }, id)));
}

/**
 * Compensation: tasks undone and tasks whose effects were not undone.
 * @param {object} workflow
 * @returns {HTMLElement[]}
 */
export function compensationView(workflow) {
  const done = workflow.compensated || [];
  const left = workflow.uncompensated || [];
  const state = workflowState(workflow.state);
  if (!done.length && !left.length) {
    return [el('p', { class: 'empty' }, state === 'COMPENSATING' ? 'Compensations are running.' : 'Nothing was compensated.')];
  }
  return [
    el('h3', { class: 'subhead' }, 'Undone by their compensation'),
    done.length ? taskList(done, 'ok') : el('p', { class: 'muted' }, 'None.'),
    el('h3', { class: 'subhead' }, 'Not undone'),
    left.length ? taskList(left, 'bad') : el('p', { class: 'muted' }, 'None.'),
  ];
}
