/**
 * Formatting of proto3-JSON values for display: enum names, times, numbers, ids.
 * @module format
 */

/** Workflow states a workflow never leaves. */
export const TERMINAL_WORKFLOW_STATES = new Set(['SUCCEEDED', 'FAILED', 'CANCELLED', 'COMPENSATED']);

/** Every WorkflowState except UNSPECIFIED, without the prefix, in lifecycle order. */
export const WORKFLOW_STATES = [
  'PENDING', 'RUNNING', 'WAITING_APPROVAL', 'SUCCEEDED', 'FAILED', 'CANCELLED',
  'COMPENSATING', 'COMPENSATED',
];

/**
 * Remove an enum prefix: ("WORKFLOW_STATE_RUNNING", "WORKFLOW_STATE_") → "RUNNING".
 * @param {string | undefined} value
 * @param {string} prefix
 * @returns {string}
 */
export function stripEnum(value, prefix) {
  if (!value) return '';
  return value.startsWith(prefix) ? value.slice(prefix.length) : value;
}

/**
 * Display form of a WorkflowState (missing = UNSPECIFIED, its default).
 * @param {string | undefined} state
 * @returns {string}
 */
export function workflowState(state) {
  return stripEnum(state || 'WORKFLOW_STATE_UNSPECIFIED', 'WORKFLOW_STATE_');
}

/**
 * Display form of a TaskState (missing = PENDING: not started yet).
 * @param {string | undefined} state
 * @returns {string}
 */
export function taskState(state) {
  return stripEnum(state || 'TASK_STATE_PENDING', 'TASK_STATE_');
}

/**
 * Display form of a GateState.
 * @param {string | undefined} state
 * @returns {string}
 */
export function gateState(state) {
  return stripEnum(state || 'GATE_STATE_UNSPECIFIED', 'GATE_STATE_');
}

/**
 * CSS class for a stripped state name: "WAITING_APPROVAL" → "state-waiting-approval".
 * @param {string} stripped
 * @returns {string}
 */
export function stateClass(stripped) {
  return `state-${(stripped || 'unspecified').toLowerCase().replace(/_/g, '-')}`;
}

/**
 * Sentence-case words for an enum tail: "TOOL_APPROVAL" → "Tool approval".
 * @param {string} stripped
 * @returns {string}
 */
export function enumWords(stripped) {
  const text = (stripped || '').toLowerCase().replace(/_/g, ' ');
  return text ? text[0].toUpperCase() + text.slice(1) : '';
}

/**
 * Words for a GateKind: "GATE_KIND_TOOL_APPROVAL" → "Tool approval".
 * @param {string | undefined} kind
 * @returns {string}
 */
export function gateKindWords(kind) {
  return enumWords(stripEnum(kind || '', 'GATE_KIND_')) || 'Approval';
}

/**
 * Absolute local time, or "—".
 * @param {string | undefined} iso
 * @returns {string}
 */
export function formatTime(iso) {
  const ms = Date.parse(iso || '');
  return Number.isNaN(ms) ? '—' : new Date(ms).toLocaleString();
}

/**
 * Relative time: "in 5 min", "3 min ago", "just now", "in 2 h", "4 days ago".
 * @param {string | undefined} iso
 * @param {number} [now]
 * @returns {string}
 */
export function relativeTime(iso, now = Date.now()) {
  const ms = Date.parse(iso || '');
  if (Number.isNaN(ms)) return '';
  const diff = ms - now;
  const seconds = Math.round(Math.abs(diff) / 1000);
  if (seconds < 45) return diff > 0 ? 'in a few seconds' : 'just now';
  const minutes = Math.round(seconds / 60);
  const hours = Math.round(minutes / 60);
  const days = Math.round(hours / 24);
  let span;
  if (minutes < 60) span = `${minutes} min`;
  else if (hours < 36) span = `${hours} h`;
  else span = `${days} day${days === 1 ? '' : 's'}`;
  return diff > 0 ? `in ${span}` : `${span} ago`;
}

/**
 * Number from a proto3-JSON number or int64 string (missing = 0).
 * @param {unknown} value
 * @returns {number}
 */
export function toNumber(value) {
  const number = Number(value ?? 0);
  return Number.isFinite(number) ? number : 0;
}

/**
 * Cost in micro-units as currency units: 1234500 → "1.2345".
 * @param {unknown} micros
 * @returns {string}
 */
export function formatMicros(micros) {
  return (toNumber(micros) / 1e6).toLocaleString(undefined, { maximumFractionDigits: 6 });
}

/**
 * Id part of a resource name: "workflows/abc" → "abc"; "workflows/a/gates/g" → "g".
 * @param {string | undefined} name
 * @returns {string}
 */
export function lastSegment(name) {
  const parts = (name || '').split('/');
  return parts[parts.length - 1] || '';
}

/**
 * Workflow id of a workflow or gate resource name.
 * @param {string | undefined} name "workflows/<id>" or "workflows/<id>/gates/<gate>"
 * @returns {string}
 */
export function workflowIdOf(name) {
  const match = /^workflows\/([^/]+)/.exec(name || '');
  return match ? match[1] : '';
}

/**
 * Hash link to a workflow's detail page.
 * @param {string} id
 * @returns {string}
 */
export function workflowHref(id) {
  return `#/workflows/${encodeURIComponent(id)}`;
}

/**
 * Short text of a google.rpc.Status: "Budget exhausted (code 8)".
 * @param {{code?: number, message?: string} | undefined} status
 * @returns {string}
 */
export function statusText(status) {
  if (!status || (!status.message && !status.code)) return '';
  const message = status.message || 'Error';
  return status.code ? `${message} (code ${status.code})` : message;
}

/**
 * Display a JSON value compactly: strings as is, the rest as JSON.
 * @param {unknown} value
 * @returns {string}
 */
export function compactValue(value) {
  if (typeof value === 'string') return value;
  return JSON.stringify(value ?? null);
}

/**
 * camelCase → snake_case: "taskDispatched" → "task_dispatched".
 * @param {string} name
 * @returns {string}
 */
export function snakeCase(name) {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/**
 * "1 of 2 approvals" for a gate.
 * @param {{approvedBy?: string[], quorum?: number}} gate
 * @returns {string}
 */
export function quorumText(gate) {
  const approved = (gate.approvedBy || []).length;
  const quorum = toNumber(gate.quorum) || 1;
  return `${approved} of ${quorum} approval${quorum === 1 ? '' : 's'}`;
}
