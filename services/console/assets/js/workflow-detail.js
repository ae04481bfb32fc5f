/**
 * The workflow detail page (#/workflows/<id>): summary, plan graph, live timeline and
 * the sections derived from the workflow. Each event from :watch triggers a re-fetch
 * (at most one in flight, one queued) and a redraw.
 * @module workflow-detail
 */

import { getWorkflow } from './api.js';
import { auditSection } from './audit.js';
import {
  blackboardView, budgetView, compensationView, gatesView, summaryView, tasksView,
} from './detail-sections.js';
import { el, errorBox, refreshRelativeTimes, scrollRegion, titledSection } from './dom.js';
import { toNumber } from './format.js';
import { createPlanGraph, drawPlanGraph, graphLegend } from './graph.js';
import { blackboardWriters, eventItem, guardrailItem, runtimeEdges } from './timeline.js';
import { coalesce, every, isQuiet } from './util.js';
import { eventKind, watchWorkflow } from './watch.js';

const WATCH_TEXT = {
  connecting: 'Connecting to the live timeline…',
  live: 'Live: new events appear as they happen.',
  reconnecting: 'Connection lost; reconnecting…',
  ended: 'The workflow has ended; the timeline is complete.',
};

function skeleton(id) {
  const graph = createPlanGraph();
  const parts = {
    graph,
    problem: el('div', { class: 'problems' }),
    summary: el('div', { class: 'summary-body' }, el('p', { class: 'muted' }, 'Loading…')),
    watchStatus: el('p', { class: 'muted', role: 'status', 'aria-live': 'polite' }),
    timeline: el('ol', { class: 'timeline', 'data-testid': 'timeline' }),
    timelineEmpty: el('p', { class: 'empty' }, 'No events yet.'),
    guardrails: el('ul', { class: 'guardrails', 'data-testid': 'guardrails' }),
    guardrailsEmpty: el('p', { class: 'empty' }, 'No guardrail tripped.'),
  };
  const plan = titledSection('Plan');
  plan.body.append(scrollRegion(graph, 'Plan graph'), graphLegend());
  const timeline = titledSection('Timeline');
  timeline.body.append(parts.watchStatus, parts.timelineEmpty, parts.timeline);
  const guardrails = titledSection('Guardrail trips');
  guardrails.body.append(parts.guardrailsEmpty, parts.guardrails);
  const sections = {
    tasks: titledSection('Tasks'),
    gates: titledSection('Gates'),
    blackboard: titledSection('Blackboard', { 'data-testid': 'blackboard' }),
    budget: titledSection('Budget', { 'data-testid': 'budget' }),
    compensation: titledSection('Compensation'),
  };
  const content = el('div', { class: 'detail' },
    el('section', { class: 'panel', 'aria-label': 'Summary' }, parts.summary),
    plan.section, timeline.section, sections.tasks.section, sections.gates.section,
    sections.blackboard.section, sections.budget.section, guardrails.section, sections.compensation.section);
  const page = [
    el('p', { class: 'back' }, el('a', { href: '#/workflows' }, '← All workflows')),
    el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, 'Workflow ', el('span', { class: 'mono' }, id))),
    parts.problem,
    content,
  ];
  return { page, content, parts, sections };
}

/**
 * Render the detail page of one workflow.
 * @param {{root: HTMLElement, signal: AbortSignal, params: {id: string}}} context
 */
export function renderWorkflowDetail({ root, signal, params }) {
  const { id } = params;
  const { page, content, parts, sections } = skeleton(id);
  root.append(...page);

  const local = new AbortController();
  signal.addEventListener('abort', () => local.abort(), { once: true });
  const audit = auditSection(id, local.signal);
  content.append(audit.section);
  /** @type {object | null} */
  let workflow = null;
  const events = [];
  const sequences = new Set();
  let drawn = '';
  let drawQueued = false;

  function draw() {
    drawQueued = false;
    if (local.signal.aborted || !workflow) return;
    const key = `${JSON.stringify(workflow)}#${events.length}`;
    if (key === drawn) return;
    drawn = key;
    parts.summary.replaceChildren(...summaryView(workflow));
    drawPlanGraph(parts.graph, workflow, runtimeEdges(events));
    sections.tasks.body.replaceChildren(tasksView(workflow));
    sections.gates.body.replaceChildren(gatesView(workflow));
    sections.blackboard.body.replaceChildren(...blackboardView(workflow, blackboardWriters(events)));
    sections.budget.body.replaceChildren(...budgetView(workflow, events));
    sections.compensation.body.replaceChildren(...compensationView(workflow));
  }

  function scheduleDraw() {
    if (drawQueued) return;
    drawQueued = true;
    setTimeout(draw, 0);
  }

  function showFatal(error) {
    const notFound = error?.status === 404;
    content.hidden = true;
    local.abort();
    parts.problem.replaceChildren(errorBox(notFound
      ? `Workflow ${id} was not found.`
      : `Could not load workflow ${id}: ${error?.message || 'unknown error'}`));
  }

  const refetch = coalesce(async () => {
    const response = await getWorkflow(id, local.signal);
    if (local.signal.aborted) return;
    workflow = response.workflow || {};
    parts.problem.replaceChildren();
    scheduleDraw();
  }, (error) => {
    if (isQuiet(error, local.signal)) return;
    if (!workflow && [400, 403, 404].includes(error?.status)) {
      showFatal(error);
      return;
    }
    parts.problem.replaceChildren(errorBox(workflow
      ? `Could not refresh the workflow: ${error?.message || 'unknown error'}`
      : `Could not load workflow ${id}: ${error?.message || 'unknown error'}`, () => refetch()));
  });

  function onEvent(event) {
    const sequence = toNumber(event.sequence);
    if (sequences.has(sequence)) return;
    sequences.add(sequence);
    events.push(event);
    parts.timelineEmpty.hidden = true;
    parts.timeline.append(eventItem(event));
    if (eventKind(event) === 'guardrailTripped') {
      parts.guardrailsEmpty.hidden = true;
      parts.guardrails.append(guardrailItem(event));
    }
    if (['workflowCompleted', 'workflowFailed', 'workflowCancelled'].includes(eventKind(event))) {
      audit.load(); // the whole trail of an ended workflow
    }
    refetch();
    scheduleDraw();
  }

  function onStatus(status, error) {
    parts.watchStatus.textContent = status === 'failed'
      ? `The live timeline is unavailable: ${error?.message || 'unknown error'}`
      : WATCH_TEXT[status] || '';
  }

  refetch();
  audit.load();
  watchWorkflow(id, { signal: local.signal, onEvent, onStatus, startSequence: 1 });
  every(() => refreshRelativeTimes(content), 30000, local.signal);
}
