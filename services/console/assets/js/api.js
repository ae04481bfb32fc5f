/**
 * Client of Tessera's HTTP/JSON API (Envoy gRPC-JSON transcoding, proto3 JSON).
 * Same origin only; the session is an HttpOnly cookie script never sees.
 * @module api
 */

/** An API failure: HTTP status, google.rpc.Status code and message. */
export class ApiError extends Error {
  /**
   * @param {string} message human-readable message (the server's when it sent one)
   * @param {{status?: number, code?: number, details?: unknown[], generic?: boolean}} [info]
   *   generic: the server sent no message; this one was made up from the status
   */
  constructor(message, { status = 0, code = 0, details = [], generic = false } = {}) {
    super(message);
    this.name = 'ApiError';
    this.generic = generic;
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

let unauthorizedHandler = () => {};

/**
 * Register what to do when any authenticated call answers 401.
 * @param {(error: ApiError) => void} handler
 */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function queryString(query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}

async function errorFrom(response) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    // The body could not be read; fall back to the status line.
  }
  let message = text.trim();
  let code = 0;
  let details = [];
  try {
    const body = JSON.parse(text);
    if (body && typeof body === 'object') {
      message = typeof body.message === 'string' ? body.message : '';
      code = Number(body.code) || 0;
      details = Array.isArray(body.details) ? body.details : [];
    }
  } catch {
    // Plain text, e.g. Envoy's "Jwt is expired".
  }
  const generic = !message;
  if (generic) message = `Request failed (HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ''}).`;
  return new ApiError(message, { status: response.status, code, details, generic });
}

/**
 * Send a request and return the Response once it is known to be OK.
 * @param {string} method
 * @param {string} path absolute path, e.g. "/v1/gates"
 * @param {{body?: unknown, query?: Record<string, unknown>, signal?: AbortSignal, auth?: boolean}} [options]
 *   auth: false for calls whose 401 is an answer (login, session check), not an expiry.
 * @returns {Promise<Response>}
 */
export async function send(method, path, { body, query, signal, auth = true } = {}) {
  const init = { method, credentials: 'same-origin', signal, headers: {} };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path + queryString(query), init);
  } catch (error) {
    if (error?.name === 'AbortError') throw error;
    throw new ApiError('Could not reach the server. Check your connection and try again.', { generic: true });
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && auth) unauthorizedHandler(error);
    throw error;
  }
  return response;
}

async function json(method, path, options) {
  const response = await send(method, path, options);
  const text = await response.text();
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new ApiError('The server sent a response this page cannot read.', { status: response.status });
  }
}

/**
 * A Session from either answer shape: the bare Session, or {"session": Session}
 * (CreateSessionResponse / GetSessionResponse without a response_body mapping).
 * @param {object} body
 * @returns {{user: string, groups?: string[], expireTime?: string}}
 */
function asSession(body) {
  const session = body && typeof body.session === 'object' && body.session ? body.session : body;
  return { ...session, user: session?.user || '', groups: session?.groups || [] };
}

function resourcePath(name) {
  return name.split('/').map(encodeURIComponent).join('/');
}

/**
 * Log in; the server sets the session cookie.
 * @param {string} user
 * @param {string} password
 * @returns {Promise<{user: string, groups?: string[], expireTime?: string}>}
 */
export async function login(user, password) {
  return asSession(await json('POST', '/v1/sessions', { body: { user, password }, auth: false }));
}

/**
 * The current session, or an ApiError with status 401.
 * @param {AbortSignal} [signal]
 * @returns {Promise<{user: string, groups?: string[], expireTime?: string}>}
 */
export async function currentSession(signal) {
  return asSession(await json('GET', '/v1/sessions/current', { signal, auth: false }));
}

/**
 * Log out (the server clears the cookie).
 * @returns {Promise<object>}
 */
export function logout() {
  return json('DELETE', '/v1/sessions/current', { auth: false });
}

/**
 * Gates the logged-in person may decide.
 * @param {AbortSignal} [signal]
 * @returns {Promise<{gates?: object[]}>}
 */
export function listGates(signal) {
  return json('GET', '/v1/gates', { signal });
}

/**
 * Approve or reject a gate.
 * @param {string} gateName "workflows/<id>/gates/<gate>"
 * @param {'GATE_DECISION_APPROVE' | 'GATE_DECISION_REJECT'} decision
 * @param {string} comment
 * @param {AbortSignal} [signal]
 * @returns {Promise<{gate?: object}>}
 */
export function decideGate(gateName, decision, comment, signal) {
  const body = { decision };
  if (comment) body.comment = comment;
  return json('POST', `/v1/${resourcePath(gateName)}:decide`, { body, signal });
}

/**
 * One page of workflows. Empty filters are left out of the query.
 * @param {Record<string, string>} query page_size, page_token, state, template, started_by,
 *   create_time_after, create_time_before
 * @param {AbortSignal} [signal]
 * @returns {Promise<{workflows?: object[], nextPageToken?: string}>}
 */
export function listWorkflows(query, signal) {
  return json('GET', '/v1/workflows', { query, signal });
}

/**
 * One workflow.
 * @param {string} id the id part of "workflows/<id>"
 * @param {AbortSignal} [signal]
 * @returns {Promise<{workflow?: object}>}
 */
export function getWorkflow(id, signal) {
  return json('GET', `/v1/workflows/${encodeURIComponent(id)}`, { signal });
}

/**
 * Open a workflow's event stream (newline-delimited JSON).
 * @param {string} id
 * @param {number} startSequence first event sequence to send
 * @param {AbortSignal} signal
 * @returns {Promise<Response>}
 */
export function openWatch(id, startSequence, signal) {
  return send('GET', `/v1/workflows/${encodeURIComponent(id)}:watch`, {
    query: { start_sequence: startSequence },
    signal,
  });
}

/**
 * Registered agent replicas and frozen agents.
 * @param {AbortSignal} [signal]
 * @returns {Promise<{agents?: object[], frozen?: object[]}>}
 */
export function listAgents(signal) {
  return json('GET', '/v1/agents', { signal });
}

/**
 * A workflow's audit records with their verification (the audit reader).
 * @param {string} id
 * @param {AbortSignal} [signal]
 * @returns {Promise<{records?: object[], signaturesChecked?: boolean, issues?: number, verifyTime?: string}>}
 */
export function listAuditRecords(id, signal) {
  return json('GET', `/v1/workflows/${encodeURIComponent(id)}/auditRecords`, { signal });
}

/**
 * The policy set being served, with its coverage by its test cases.
 * @param {AbortSignal} [signal]
 * @returns {Promise<{policySet?: object}>}
 */
export function getPolicySet(signal) {
  return json('GET', '/v1/policySet', { signal });
}
