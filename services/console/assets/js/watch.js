/**
 * Follows a workflow's :watch stream (newline-delimited JSON, one {"event": …} per
 * line), reconnecting from the last sequence + 1 with a bounded backoff until the
 * terminal event arrives or the signal aborts.
 * @module watch
 */

import { ApiError, openWatch } from './api.js';
import { sleep } from './util.js';

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 5000;

/** Oneof fields of WorkflowEvent.kind, in proto order. */
export const EVENT_KINDS = [
  'workflowStarted', 'taskDispatched', 'taskSucceeded', 'taskFailed', 'handoffRouted',
  'gateOpened', 'gateDecided', 'blackboardRolledBack', 'guardrailTripped',
  'workflowCompleted', 'workflowFailed', 'workflowCancelled', 'taskSkipped',
  'compensationStarted', 'gateApprovalRecorded',
];

const TERMINAL_KINDS = new Set(['workflowCompleted', 'workflowFailed', 'workflowCancelled']);

/** HTTP statuses after which reconnecting cannot help. */
const FINAL_STATUSES = new Set([400, 401, 403, 404]);

/**
 * The oneof field set on an event, e.g. "taskDispatched" ("" when unknown).
 * @param {object} event WorkflowEvent
 * @returns {string}
 */
export function eventKind(event) {
  return EVENT_KINDS.find((kind) => event && event[kind] !== undefined) || '';
}

/**
 * Whether the event ends the workflow (and the stream).
 * @param {object} event
 * @returns {boolean}
 */
export function isTerminalEvent(event) {
  return TERMINAL_KINDS.has(eventKind(event));
}

function parseLine(line) {
  let text = line.trim();
  if (!text) return null;
  for (let tries = 0; tries < 2; tries += 1) {
    try {
      return JSON.parse(text);
    } catch {
      // Tolerate a JSON-array framing ("[{…}", ",{…}", "{…}]") as well.
      text = text.replace(/^[[,]\s*/, '').replace(/\s*[\],]$/, '');
    }
  }
  return null;
}

/**
 * Messages of a newline-delimited JSON body; a line may arrive in several chunks.
 * @param {Response} response
 * @returns {AsyncGenerator<object>}
 */
export async function* readJsonLines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline = buffer.indexOf('\n');
      while (newline >= 0) {
        const message = parseLine(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        if (message) yield message;
        newline = buffer.indexOf('\n');
      }
    }
    const last = parseLine(buffer + decoder.decode());
    if (last) yield last;
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * @typedef {'connecting' | 'live' | 'reconnecting' | 'ended' | 'failed'} WatchStatus
 */

/**
 * Watch a workflow. Events are delivered once each, in sequence order.
 * @param {string} id workflow id
 * @param {{signal: AbortSignal, onEvent: (event: object) => void,
 *   onStatus?: (status: WatchStatus, error?: Error) => void, startSequence?: number}} options
 * @returns {Promise<void>} settles when the workflow ended, the watch failed or was aborted
 */
export async function watchWorkflow(id, { signal, onEvent, onStatus = () => {}, startSequence = 1 }) {
  let next = startSequence;
  let delay = MIN_DELAY_MS;
  onStatus('connecting');
  while (!signal.aborted) {
    try {
      const response = await openWatch(id, next, signal);
      onStatus('live');
      for await (const message of readJsonLines(response)) {
        if (!message.event) {
          if (message.code || message.message || message.error) {
            const status = message.error || message;
            throw new ApiError(status.message || 'The event stream failed.', { code: Number(status.code) || 0 });
          }
          continue;
        }
        const sequence = Number(message.event.sequence || 0);
        if (sequence && sequence < next) continue;
        if (sequence) next = sequence + 1;
        delay = MIN_DELAY_MS;
        onEvent(message.event);
        if (isTerminalEvent(message.event)) {
          onStatus('ended');
          return;
        }
      }
    } catch (error) {
      if (signal.aborted || error?.name === 'AbortError') return;
      if (FINAL_STATUSES.has(error?.status)) {
        if (error.status !== 401) onStatus('failed', error);
        return;
      }
    }
    if (signal.aborted) return;
    onStatus('reconnecting');
    await sleep(delay, signal);
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  }
}
