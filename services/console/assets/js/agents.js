/**
 * The agents page (#/agents): registered replicas grouped by agent name, with frozen
 * agents (which may have no replicas left).
 * @module agents
 */

import { listAgents } from './api.js';
import { el, scrollRegion, timeView } from './dom.js';
import { isQuiet } from './util.js';

/**
 * @typedef {object} AgentGroup
 * @property {string} name
 * @property {object[]} replicas AgentDescriptor per replica
 * @property {object | null} frozen FrozenAgent record, if frozen
 */

/**
 * Group replicas by agent name and attach freezes.
 * @param {object[]} agents AgentDescriptor list
 * @param {object[]} frozen FrozenAgent list
 * @returns {AgentGroup[]} sorted by name
 */
export function groupAgents(agents, frozen) {
  /** @type {Map<string, AgentGroup>} */
  const groups = new Map();
  const group = (name) => {
    if (!groups.has(name)) groups.set(name, { name, replicas: [], frozen: null });
    return groups.get(name);
  };
  for (const agent of agents) if (agent?.name) group(agent.name).replicas.push(agent);
  for (const record of frozen) if (record?.name) group(record.name).frozen = record;
  return [...groups.values()].sort((a, b) => a.name.localeCompare(b.name));
}

const unique = (values) => [...new Set(values.filter(Boolean))].sort();

function latestHeartbeat(replicas) {
  const times = replicas.map((r) => r.heartbeatTime).filter((t) => t && !Number.isNaN(Date.parse(t)));
  return times.sort((a, b) => Date.parse(b) - Date.parse(a))[0] || '';
}

function statusCell(frozen) {
  const isFrozen = Boolean(frozen);
  const cell = el('td', { 'data-frozen': String(isFrozen) },
    el('span', { class: `badge ${isFrozen ? 'state-frozen' : 'state-serving'}` }, isFrozen ? 'frozen' : 'serving'));
  if (isFrozen) {
    cell.append(el('div', { class: 'muted small' },
      `by ${frozen.frozenBy || 'unknown'}`, frozen.reason ? `: ${frozen.reason}` : '', ' · ',
      timeView(frozen.freezeTime)));
  }
  return cell;
}

function agentRow(group) {
  const versions = unique(group.replicas.map((r) => r.version));
  const capabilities = unique(group.replicas.flatMap((r) => (r.capabilities || [])
    .map((c) => (c.version ? `${c.name}@${c.version}` : c.name))));
  const heartbeat = latestHeartbeat(group.replicas);
  return el('tr', { 'data-testid': 'agent-row', 'data-agent': group.name, 'data-frozen': String(Boolean(group.frozen)) },
    el('th', { scope: 'row', class: 'mono' }, group.name),
    el('td', { class: 'num', 'data-testid': 'agent-replicas' }, String(group.replicas.length)),
    el('td', {}, versions.join(', ') || '—'),
    el('td', {}, capabilities.length
      ? el('ul', { class: 'chips' }, capabilities.map((c) => el('li', { class: 'mono' }, c)))
      : '—'),
    statusCell(group.frozen),
    el('td', {}, heartbeat ? timeView(heartbeat) : '—'));
}

/**
 * Render the agents page.
 * @param {{root: HTMLElement, signal: AbortSignal}} context
 */
export function renderAgents({ root, signal }) {
  const refreshButton = el('button', { type: 'button', class: 'button' }, 'Refresh');
  const status = el('p', { class: 'muted', role: 'status', 'aria-live': 'polite' }, 'Loading agents…');
  const problem = el('div');
  const body = el('tbody');
  const table = el('table', { class: 'data', 'data-testid': 'agents' },
    el('caption', { class: 'visually-hidden' }, 'Agents by name'),
    el('thead', {}, el('tr', {}, ['Agent', 'Replicas', 'Versions', 'Capabilities', 'Status', 'Last heartbeat']
      .map((title) => el('th', { scope: 'col' }, title)))),
    body);
  root.append(
    el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, 'Agents'), refreshButton),
    status, problem, scrollRegion(table, 'Agents table'),
  );
  let loading = false;

  async function load() {
    if (loading) return;
    loading = true;
    table.setAttribute('aria-busy', 'true');
    try {
      const response = await listAgents(signal);
      if (signal.aborted) return;
      const groups = groupAgents(response.agents || [], response.frozen || []);
      body.replaceChildren(...(groups.length ? groups.map(agentRow)
        : [el('tr', {}, el('td', { colspan: '6', class: 'empty', 'data-testid': 'agents-empty' }, 'No agents are registered.'))]));
      const frozen = groups.filter((g) => g.frozen).length;
      status.textContent = `${groups.length} agent${groups.length === 1 ? '' : 's'}${frozen ? `, ${frozen} frozen` : ''}.`;
      problem.replaceChildren();
    } catch (error) {
      if (isQuiet(error, signal)) return;
      status.textContent = '';
      problem.replaceChildren(el('p', { class: 'notice error', role: 'alert' },
        `Could not load agents: ${error?.message || 'unknown error'}`));
    } finally {
      loading = false;
      table.removeAttribute('aria-busy');
    }
  }

  refreshButton.addEventListener('click', load);
  load();
}
