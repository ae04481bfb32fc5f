/**
 * The plan as an SVG graph, left to right by dependency depth (layer = longest path
 * from a root), tasks of a layer stacked vertically; dependencies are solid arrows,
 * handoffs and compensations added at run time dashed arrows.
 * @module graph
 */

import { el, svg } from './dom.js';
import { enumWords, stateClass, taskState } from './format.js';

const NODE_W = 188;
const NODE_H = 66;
const GAP_X = 64;
const GAP_Y = 22;
const PAD = 14;
const MAX_CHARS = 24;

const LEGEND_STATES = ['PENDING', 'RUNNING', 'WAITING_APPROVAL', 'SUCCEEDED', 'FAILED', 'SKIPPED'];

/**
 * @typedef {object} GraphNode
 * @property {string} id
 * @property {string} capability
 * @property {boolean} optional
 * @property {string} state full TaskState enum name
 * @property {string[]} dependsOn
 */

function truncate(text) {
  return text.length > MAX_CHARS ? `${text.slice(0, MAX_CHARS - 1)}…` : text;
}

/**
 * Nodes and edges from the plan, the task statuses and the run-time edges.
 * @param {{plan?: object, tasks?: object[]}} workflow
 * @param {Array<{from: string, to: string, capability: string, kind: string}>} runtime
 * @returns {{nodes: Map<string, GraphNode>, edges: Array<{from: string, to: string, kind: string}>}}
 */
export function buildGraph(workflow, runtime) {
  /** @type {Map<string, GraphNode>} */
  const nodes = new Map();
  const add = (id, capability, extra = {}) => {
    if (!id || nodes.has(id)) return;
    nodes.set(id, { id, capability: capability || '', optional: false, state: '', dependsOn: [], ...extra });
  };
  for (const spec of workflow.plan?.tasks || []) {
    const gate = spec.kind === 'TASK_KIND_APPROVAL_GATE';
    add(spec.id, spec.capability || (gate ? 'approval gate' : ''), {
      optional: Boolean(spec.optional), dependsOn: spec.dependsOn || [],
    });
  }
  for (const status of workflow.tasks || []) add(status.taskId, status.capability);
  for (const edge of runtime) add(edge.to || `${edge.from}→${edge.capability}`, edge.capability);
  for (const status of workflow.tasks || []) {
    const node = nodes.get(status.taskId);
    if (node) node.state = status.state || 'TASK_STATE_UNSPECIFIED';
  }
  for (const node of nodes.values()) if (!node.state) node.state = 'TASK_STATE_PENDING';

  const edges = [];
  for (const node of nodes.values()) {
    for (const dep of node.dependsOn) if (nodes.has(dep)) edges.push({ from: dep, to: node.id, kind: 'dependency' });
  }
  for (const edge of runtime) {
    const to = edge.to || `${edge.from}→${edge.capability}`;
    if (nodes.has(edge.from)) edges.push({ from: edge.from, to, kind: edge.kind });
  }
  return { nodes, edges };
}

/**
 * Layer of every node: the longest path from a root (cycles are cut).
 * @param {Map<string, GraphNode>} nodes
 * @param {Array<{from: string, to: string}>} edges
 * @returns {Map<string, number>}
 */
export function layerOf(nodes, edges) {
  const preds = new Map([...nodes.keys()].map((id) => [id, []]));
  for (const edge of edges) preds.get(edge.to)?.push(edge.from);
  const memo = new Map();
  const visiting = new Set();
  const depth = (id) => {
    if (memo.has(id)) return memo.get(id);
    if (visiting.has(id)) return 0;
    visiting.add(id);
    let layer = 0;
    for (const pred of preds.get(id) || []) layer = Math.max(layer, depth(pred) + 1);
    visiting.delete(id);
    memo.set(id, layer);
    return layer;
  };
  for (const id of nodes.keys()) depth(id);
  return memo;
}

function positions(nodes, edges) {
  const layers = layerOf(nodes, edges);
  const columns = [];
  for (const id of nodes.keys()) {
    const layer = layers.get(id) || 0;
    (columns[layer] ||= []).push(id);
  }
  const row = new Map();
  columns.forEach((ids, layer) => {
    if (layer > 0) {
      const mean = (id) => {
        const ys = edges.filter((e) => e.to === id && row.has(e.from)).map((e) => row.get(e.from));
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
      };
      const order = new Map(ids.map((id, index) => [id, index]));
      ids.sort((a, b) => mean(a) - mean(b) || order.get(a) - order.get(b));
    }
    ids.forEach((id, index) => row.set(id, index));
  });
  const place = new Map();
  for (const [id, index] of row) {
    place.set(id, { x: PAD + (layers.get(id) || 0) * (NODE_W + GAP_X), y: PAD + index * (NODE_H + GAP_Y) });
  }
  const rows = Math.max(1, ...Array.from(columns, (ids) => ids?.length || 0));
  return {
    place,
    width: PAD * 2 + Math.max(1, columns.length) * NODE_W + Math.max(0, columns.length - 1) * GAP_X,
    height: PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y,
  };
}

function defs() {
  const arrow = (id) => svg('marker', {
    id, viewBox: '0 0 10 10', refX: '9', refY: '5', markerWidth: '7', markerHeight: '7', orient: 'auto-start-reverse',
  }, svg('path', { d: 'M0,0 L10,5 L0,10 z', class: `arrowhead ${id}` }));
  return svg('defs', {},
    arrow('plan-arrow'),
    arrow('plan-arrow-runtime'),
    svg('pattern', { id: 'plan-stripes', width: '8', height: '8', patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
      svg('rect', { width: '8', height: '8', class: 'stripe-bg' }),
      svg('line', { x1: '0', y1: '0', x2: '0', y2: '8', class: 'stripe' })));
}

function edgePath(edge, place) {
  const a = place.get(edge.from);
  const b = place.get(edge.to);
  const x1 = a.x + NODE_W;
  const y1 = a.y + NODE_H / 2;
  const x2 = b.x;
  const y2 = b.y + NODE_H / 2;
  const bend = Math.max(28, Math.abs(x2 - x1) / 2);
  const runtime = edge.kind !== 'dependency';
  return svg('path', {
    d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
    class: `edge edge-${edge.kind}`,
    'data-edge': `${edge.from}->${edge.to}`,
    'data-edge-kind': runtime ? edge.kind : null,
    'marker-end': runtime ? 'url(#plan-arrow-runtime)' : 'url(#plan-arrow)',
  }, svg('title', {}, `${edge.from} → ${edge.to} (${edge.kind})`));
}

function nodeGroup(node, point) {
  const state = taskState(node.state);
  const stateLine = `${enumWords(state)}${node.optional ? ' · optional' : ''}`;
  return svg('g', {
    class: `node ${stateClass(state)}${node.optional ? ' optional' : ''}`,
    'data-task': node.id,
    'data-state': node.state,
    transform: `translate(${point.x},${point.y})`,
  },
  svg('title', {}, `${node.id}: ${node.capability || 'no capability'}, ${enumWords(state).toLowerCase()}${node.optional ? ', optional' : ''}`),
  svg('rect', { width: String(NODE_W), height: String(NODE_H), rx: '8', ry: '8' }),
  svg('text', { x: '12', y: '21', class: 'node-id' }, truncate(node.id)),
  svg('text', { x: '12', y: '39', class: 'node-capability' }, truncate(node.capability || '—')),
  svg('text', { x: '12', y: '56', class: 'node-state' }, stateLine));
}

function describe(nodes, edges) {
  if (!nodes.size) return 'Plan graph: no tasks.';
  const tasks = [...nodes.values()]
    .map((n) => `${n.id} ${enumWords(taskState(n.state)).toLowerCase()}${n.optional ? ' (optional)' : ''}`);
  const deps = edges.filter((e) => e.kind === 'dependency').length;
  const runtime = edges.length - deps;
  return `Plan graph of ${nodes.size} task${nodes.size === 1 ? '' : 's'}, ${deps} dependenc${deps === 1 ? 'y' : 'ies'}`
    + `${runtime ? `, ${runtime} handoff or compensation edge${runtime === 1 ? '' : 's'}` : ''}: ${tasks.join('; ')}.`;
}

/**
 * The (empty) graph element; fill it with {@link drawPlanGraph}.
 * @returns {SVGSVGElement}
 */
export function createPlanGraph() {
  return /** @type {SVGSVGElement} */ (svg('svg', {
    'data-testid': 'plan-graph', role: 'img', 'aria-label': 'Plan graph: loading.', class: 'plan-graph',
  }));
}

/**
 * Redraw the graph in place.
 * @param {SVGSVGElement} root from {@link createPlanGraph}
 * @param {{plan?: object, tasks?: object[]}} workflow
 * @param {Array<{from: string, to: string, capability: string, kind: string}>} runtime run-time edges
 */
export function drawPlanGraph(root, workflow, runtime) {
  const { nodes, edges } = buildGraph(workflow, runtime);
  const { place, width, height } = positions(nodes, edges);
  root.setAttribute('viewBox', `0 0 ${width} ${height}`);
  root.setAttribute('width', String(width));
  root.setAttribute('height', String(height));
  root.setAttribute('aria-label', describe(nodes, edges));
  root.replaceChildren(
    defs(),
    svg('g', { class: 'edges' }, edges.map((edge) => edgePath(edge, place))),
    svg('g', { class: 'nodes' }, [...nodes.values()].map((node) => nodeGroup(node, place.get(node.id)))),
  );
}

/**
 * The legend: task states, optional tasks, edge kinds.
 * @returns {HTMLElement}
 */
export function graphLegend() {
  const item = (swatchClass, label) => el('li', {}, el('span', { class: `swatch ${swatchClass}`, 'aria-hidden': 'true' }), label);
  return el('ul', { class: 'legend', 'aria-label': 'Legend' },
    LEGEND_STATES.map((state) => item(stateClass(state), enumWords(state))),
    item('swatch-optional', 'Optional task (dashed border)'),
    item('line line-dependency', 'Depends on'),
    item('line line-handoff', 'Handoff / compensation (dashed)'));
}
