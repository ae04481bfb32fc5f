/**
 * Workflow events: one timeline entry per event, and facts derived from the history
 * (who wrote each blackboard key, handoff edges, guardrail trips).
 * @module timeline
 */

import { el, timeView } from './dom.js';
import {
  enumWords, formatMicros, formatTime, gateKindWords, snakeCase, statusText, stripEnum, toNumber,
} from './format.js';
import { eventKind } from './watch.js';

const LABELS = {
  workflowStarted: 'Workflow started',
  taskDispatched: 'Task dispatched',
  taskSucceeded: 'Task succeeded',
  taskFailed: 'Task failed',
  handoffRouted: 'Handoff routed',
  gateOpened: 'Gate opened',
  gateDecided: 'Gate decided',
  blackboardRolledBack: 'Blackboard rolled back',
  guardrailTripped: 'Guardrail tripped',
  workflowCompleted: 'Workflow completed',
  workflowFailed: 'Workflow failed',
  workflowCancelled: 'Workflow cancelled',
  taskSkipped: 'Task skipped',
  compensationStarted: 'Compensation started',
  gateApprovalRecorded: 'Gate approval recorded',
};

const TONES = {
  taskSucceeded: 'ok', workflowCompleted: 'ok', taskFailed: 'bad', workflowFailed: 'bad',
  guardrailTripped: 'bad', workflowCancelled: 'bad', blackboardRolledBack: 'warn',
  gateOpened: 'warn', compensationStarted: 'warn', taskSkipped: 'muted',
};

const list = (items) => (items || []).join(', ');
const yes = (flag) => (flag ? 'yes' : '');
const when = (iso) => (iso ? formatTime(iso) : '');

/**
 * "12 tokens, 0.01 cost, 1 tool call" for a Usage (empty when all zero).
 * @param {{tokens?: string, costMicros?: string, toolCalls?: number} | undefined} usage
 * @returns {string}
 */
export function usageText(usage) {
  if (!usage) return '';
  const parts = [];
  if (toNumber(usage.tokens)) parts.push(`${toNumber(usage.tokens)} tokens`);
  if (toNumber(usage.costMicros)) parts.push(`${formatMicros(usage.costMicros)} cost`);
  if (toNumber(usage.toolCalls)) parts.push(`${toNumber(usage.toolCalls)} tool call${toNumber(usage.toolCalls) === 1 ? '' : 's'}`);
  return parts.join(', ');
}

function guardrailName(guardrail) {
  return enumWords(stripEnum(guardrail || '', 'GUARDRAIL_')) || 'Unspecified';
}

const FACTS = {
  workflowStarted: (e) => [['Goal', e.goal], ['Template', e.plan?.template],
    ['Tasks', e.plan?.tasks?.length ? String(e.plan.tasks.length) : ''], ['Started by', e.startedBy],
    ['Deadline', when(e.deadline)]],
  taskDispatched: (e) => [['Task', e.taskId], ['Capability', e.capability], ['Attempt', e.attempt],
    ['Agent', e.agentInstance], ['Reserved', usageText(e.reserved)]],
  taskSucceeded: (e) => [['Task', e.taskId], ['Attempt', e.attempt], ['Agent', e.agentInstance],
    ['Summary', e.summary], ['Wrote', list(Object.keys(e.blackboardWrites || {}))],
    ['Confidence', e.hasConfidence ? String(toNumber(e.confidence)) : ''], ['Usage', usageText(e.usage)]],
  taskFailed: (e) => [['Task', e.taskId], ['Attempt', e.attempt], ['Error', statusText(e.error)],
    ['Will retry', e.willRetry ? `yes${e.retryTime ? `, at ${formatTime(e.retryTime)}` : ''}` : 'no'],
    ['Transient', yes(e.transient)]],
  taskSkipped: (e) => [['Task', e.taskId], ['Reason', e.reason]],
  handoffRouted: (e) => [['From', e.fromTaskId], ['To', `${e.toTaskId || '?'} (${e.capability || '?'})`],
    ['Reason', e.reason]],
  gateOpened: (e) => [['Gate', e.gateId], ['Task', e.taskId], ['Kind', gateKindWords(e.kind)],
    ['Tool', e.tool], ['Reason', e.reason], ['Expires', when(e.expireTime)]],
  gateApprovalRecorded: (e) => [['Gate', e.gateId], ['Approved by', e.approvedBy],
    ['Quorum', e.quorum ? String(e.quorum) : ''], ['Comment', e.comment]],
  gateDecided: (e) => [['Gate', e.gateId], ['Decision', e.approved ? 'approved' : 'rejected'],
    ['Decided by', e.decidedBy || 'unknown'], ['Comment', e.comment]],
  blackboardRolledBack: (e) => [['To version', String(toNumber(e.toVersion))], ['Task', e.taskId],
    ['Reason', e.reason]],
  guardrailTripped: (e) => [['Guardrail', guardrailName(e.guardrail)], ['Task', e.taskId], ['Detail', e.detail]],
  workflowCompleted: (e) => [['Partial', yes(e.partial)]],
  workflowFailed: (e) => [['Error', statusText(e.error)], ['Compensated', list(e.compensated)],
    ['Not undone', list(e.uncompensated)]],
  workflowCancelled: (e) => [['Reason', e.reason], ['Cancelled by', e.cancelledBy],
    ['Compensated', list(e.compensated)], ['Not undone', list(e.uncompensated)]],
  compensationStarted: (e) => [['Why', statusText(e.error) || e.cancelled?.reason || ''],
    ['Undoing', list((e.tasks || []).map((t) => `${t.fromTaskId} with ${t.toTaskId} (${t.capability})`))],
    ['Cannot undo', list(e.uncompensated)], ['Deadline', when(e.deadline)]],
};

/**
 * Display label of an event kind.
 * @param {string} kind oneof field name, e.g. "taskDispatched"
 * @returns {string}
 */
export function eventLabel(kind) {
  return LABELS[kind] || 'Unknown event';
}

/**
 * Timeline entry of one event: <li data-kind="task_dispatched" data-sequence="N">.
 * @param {object} event WorkflowEvent
 * @returns {HTMLLIElement}
 */
export function eventItem(event) {
  const kind = eventKind(event);
  const payload = (kind && event[kind]) || {};
  const facts = el('dl', { class: 'facts inline' });
  for (const [label, value] of (FACTS[kind] || (() => []))(payload)) {
    if (value === undefined || value === null || value === '' || value === 0) continue;
    facts.append(el('div', {}, el('dt', {}, label), el('dd', {}, String(value))));
  }
  return el('li', {
    class: `event tone-${TONES[kind] || 'info'}`,
    'data-kind': kind ? snakeCase(kind) : 'unknown',
    'data-sequence': String(toNumber(event.sequence)),
  },
  el('div', { class: 'event-head' },
    el('span', { class: 'sequence muted' }, `#${toNumber(event.sequence)}`),
    el('strong', { class: 'event-kind' }, eventLabel(kind)),
    el('span', { class: 'event-time muted' }, timeView(event.time, { relative: false }))),
  facts.childElementCount ? facts : null);
}

/**
 * Who wrote each blackboard key: the task of the last TaskSucceeded whose
 * blackboardWrites held it. A rollback naming a task withdraws that task's writes.
 * @param {object[]} events
 * @returns {Map<string, string>} key → task id
 */
export function blackboardWriters(events) {
  /** @type {Map<string, string[]>} */
  const history = new Map();
  for (const event of events) {
    const kind = eventKind(event);
    if (kind === 'taskSucceeded') {
      const { taskId = '', blackboardWrites = {} } = event.taskSucceeded;
      for (const key of Object.keys(blackboardWrites || {})) {
        if (!history.has(key)) history.set(key, []);
        history.get(key).push(taskId);
      }
    } else if (kind === 'blackboardRolledBack' && event.blackboardRolledBack.taskId) {
      const refused = event.blackboardRolledBack.taskId;
      for (const writers of history.values()) {
        while (writers.length && writers[writers.length - 1] === refused) writers.pop();
      }
    }
  }
  const result = new Map();
  for (const [key, writers] of history) if (writers.length) result.set(key, writers[writers.length - 1]);
  return result;
}

/**
 * Edges added at run time: handoffs (from task → new task) and compensations
 * (undone task → compensating task).
 * @param {object[]} events
 * @returns {Array<{from: string, to: string, capability: string, kind: 'handoff' | 'compensation'}>}
 */
export function runtimeEdges(events) {
  const edges = [];
  for (const event of events) {
    const kind = eventKind(event);
    if (kind === 'handoffRouted') {
      const h = event.handoffRouted;
      edges.push({ from: h.fromTaskId || '', to: h.toTaskId || '', capability: h.capability || '', kind: 'handoff' });
    } else if (kind === 'compensationStarted') {
      for (const h of event.compensationStarted.tasks || []) {
        edges.push({ from: h.fromTaskId || '', to: h.toTaskId || '', capability: h.capability || '', kind: 'compensation' });
      }
    }
  }
  return edges.filter((edge) => edge.from && (edge.to || edge.capability));
}

/**
 * List entry of one guardrail trip.
 * @param {object} event a WorkflowEvent with guardrailTripped set
 * @returns {HTMLLIElement}
 */
export function guardrailItem(event) {
  const trip = event.guardrailTripped || {};
  return el('li', { class: 'guardrail' },
    el('strong', {}, guardrailName(trip.guardrail)),
    trip.taskId ? el('span', {}, ' on ', el('span', { class: 'mono' }, trip.taskId)) : null,
    trip.detail ? el('span', {}, `: ${trip.detail}`) : null,
    el('span', { class: 'muted' }, ' · ', timeView(event.time)));
}
