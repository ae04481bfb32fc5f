/**
 * A workflow's audit records, each with what verifying its chain says about it
 * (GET /v1/workflows/<id>/auditRecords, served by the audit reader).
 * @module audit
 */

import { listAuditRecords } from './api.js';
import { el, errorBox, timeView } from './dom.js';
import { badge, table } from './detail-sections.js';
import { stripEnum } from './format.js';

const VERDICT_CLASS = {
  VERIFIED: 'state-succeeded',
  NOT_YET_COVERED: 'state-waiting-approval',
  FAILED: 'state-failed',
};
const VERDICT_WORDS = {
  VERIFIED: 'verified',
  NOT_YET_COVERED: 'not yet covered',
  FAILED: 'FAILED',
};

function receiptText(receipt) {
  if (!receipt?.writer) return '—';
  const hash = receipt.recordHash ? ` · ${atobHex(receipt.recordHash).slice(0, 12)}…` : '';
  return `${receipt.writer}:${receipt.sequence ?? 0}${hash}`;
}

function atobHex(base64) {
  try {
    return [...atob(base64)].map((c) => c.charCodeAt(0).toString(16).padStart(2, '0')).join('');
  } catch {
    return '';
  }
}

function row(view) {
  const record = view.record || {};
  const verdict = stripEnum(view.verification, 'RECORD_VERIFICATION_') || 'UNSPECIFIED';
  return el('tr', { 'data-testid': 'audit-row', 'data-verification': verdict, 'data-kind': stripEnum(record.kind, 'AUDIT_KIND_') },
    el('td', {}, timeView(record.time, { relative: false })),
    el('td', { class: 'mono' }, view.owner || view.writer || '—'),
    el('td', {}, stripEnum(record.kind, 'AUDIT_KIND_').toLowerCase().replaceAll('_', ' ')),
    el('td', {}, record.outcome || '—'),
    el('td', { class: 'mono' }, record.resource || '—'),
    el('td', {}, badge(VERDICT_WORDS[verdict] || verdict, VERDICT_CLASS[verdict] || 'kind', { title: view.detail || '' })),
    el('td', { class: 'mono' }, receiptText(view.receipt)));
}

/**
 * The audit section of a workflow page, with a button that reads and verifies again.
 * @param {string} id workflow id
 * @param {AbortSignal} signal
 * @returns {{section: HTMLElement, load: () => Promise<void>}}
 */
export function auditSection(id, signal) {
  const summary = el('p', { 'data-testid': 'audit-summary', role: 'status', 'aria-live': 'polite' }, 'Reading the audit trail…');
  const body = el('div', {});
  const again = el('button', { type: 'button', class: 'button' }, 'Verify again');
  const headingId = `audit-${id}`;
  const section = el('section', { class: 'panel', 'aria-labelledby': headingId, 'data-testid': 'audit' },
    el('div', { class: 'page-head' }, el('h2', { id: headingId }, 'Audit records'), again), summary, body);
  let busy = false;

  async function load() {
    if (busy || signal.aborted) return;
    busy = true;
    again.disabled = true;
    try {
      const answer = await listAuditRecords(id, signal);
      const records = answer.records || [];
      const verified = records.filter((r) => r.verification === 'RECORD_VERIFICATION_VERIFIED').length;
      const signatures = answer.signaturesChecked ? 'signatures checked' : 'signatures NOT checked';
      const issues = Number(answer.issues || 0);
      summary.textContent = `${records.length} records, ${verified} covered by a signed checkpoint; ${signatures}; `
        + `${issues ? `${issues} integrity issue(s) in the stream` : 'no integrity issue in the stream'}.`;
      body.replaceChildren(records.length
        ? table('Audit records', ['Time', 'Chain', 'Kind', 'Outcome', 'Resource', 'Verification', 'Receipt'], records.map(row))
        : el('p', { class: 'empty' }, 'No records yet.'));
    } catch (error) {
      if (signal.aborted) return;
      summary.textContent = '';
      body.replaceChildren(errorBox(`Could not read the audit trail: ${error?.message || 'unknown error'}`, () => load()));
    } finally {
      busy = false;
      again.disabled = false;
    }
  }

  again.addEventListener('click', () => load());
  return { section, load };
}
