/**
 * DOM building helpers. Everything on the page is built with createElement /
 * createElementNS and textContent: never innerHTML, never inline styles (CSP).
 * @module dom
 */

import { formatTime, relativeTime } from './format.js';

const SVG_NS = 'http://www.w3.org/2000/svg';
let idCounter = 0;

/**
 * Apply attributes to an element. `on` is a map of event listeners; boolean true
 * becomes an empty attribute; null, undefined and false are skipped.
 * @param {Element} node
 * @param {Record<string, unknown>} attrs
 */
function applyAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'style') throw new Error('Inline style attributes are not allowed (CSP).');
    if (key === 'on') {
      for (const [type, handler] of Object.entries(value)) node.addEventListener(type, handler);
      continue;
    }
    node.setAttribute(key, value === true ? '' : String(value));
  }
}

/**
 * Append children: strings and numbers become text nodes, arrays are flattened,
 * null / undefined / false are skipped.
 * @param {Node} node
 * @param {unknown[]} children
 */
function appendChildren(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) appendChildren(node, child);
    else if (child instanceof Node) node.append(child);
    else node.append(document.createTextNode(String(child)));
  }
}

/**
 * Create an HTML element.
 * @param {string} tag
 * @param {Record<string, unknown>} [attrs]
 * @param {...unknown} children
 * @returns {HTMLElement}
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  applyAttrs(node, attrs);
  appendChildren(node, children);
  return node;
}

/**
 * Create an SVG element.
 * @param {string} tag
 * @param {Record<string, unknown>} [attrs]
 * @param {...unknown} children
 * @returns {SVGElement}
 */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  applyAttrs(node, attrs);
  appendChildren(node, children);
  return node;
}

/**
 * A page-unique id for label/aria wiring.
 * @param {string} prefix
 * @returns {string}
 */
export function uniqueId(prefix) {
  idCounter += 1;
  return `${prefix}-${idCounter}`;
}

/**
 * A <time> element showing relative and absolute time ("in 5 min (1/2/2025, 10:00:00)").
 * Relative parts are refreshed by {@link refreshRelativeTimes}.
 * @param {string | undefined} iso RFC 3339 timestamp
 * @param {{relative?: boolean, absolute?: boolean, empty?: string}} [options]
 * @returns {HTMLElement | Text}
 */
export function timeView(iso, { relative = true, absolute = true, empty = '—' } = {}) {
  if (!iso || Number.isNaN(Date.parse(iso))) return document.createTextNode(empty);
  const node = el('time', { datetime: iso, title: formatTime(iso) });
  if (relative) node.dataset.rel = absolute ? 'both' : 'only';
  node.textContent = timeText(iso, relative, absolute);
  return node;
}

function timeText(iso, relative, absolute) {
  if (relative && absolute) return `${relativeTime(iso)} (${formatTime(iso)})`;
  return relative ? relativeTime(iso) : formatTime(iso);
}

/**
 * Update the text of every relative <time> below root.
 * @param {ParentNode} root
 */
export function refreshRelativeTimes(root) {
  for (const node of root.querySelectorAll('time[data-rel]')) {
    const iso = node.getAttribute('datetime');
    node.textContent = timeText(iso, true, node.dataset.rel === 'both');
  }
}

/**
 * A <dl> of label/value pairs; pairs whose value is empty are left out.
 * @param {Array<[string, unknown]>} pairs
 * @param {string} [className]
 * @returns {HTMLDListElement}
 */
export function definitionList(pairs, className = 'facts') {
  const list = el('dl', { class: className });
  for (const [label, value] of pairs) {
    if (value === undefined || value === null || value === '' || (Array.isArray(value) && !value.length)) continue;
    list.append(el('div', {}, el('dt', {}, label), el('dd', {}, value)));
  }
  return list;
}

/**
 * A horizontally scrollable, keyboard-focusable wrapper for wide content.
 * @param {Node} content
 * @param {string} label accessible name of the region
 * @returns {HTMLElement}
 */
export function scrollRegion(content, label) {
  return el('div', { class: 'scroll-x', role: 'region', 'aria-label': label, tabindex: '0' }, content);
}

/**
 * A <pre> with pretty-printed JSON.
 * @param {unknown} value
 * @returns {HTMLElement}
 */
export function jsonBlock(value) {
  return el('pre', { class: 'json' }, el('code', {}, JSON.stringify(value ?? null, null, 2)));
}

/**
 * An error message with an optional "Try again" button.
 * @param {string} message
 * @param {() => void} [retry]
 * @returns {HTMLElement}
 */
export function errorBox(message, retry) {
  return el('div', { class: 'notice error', role: 'alert' },
    el('p', {}, message),
    retry ? el('button', { type: 'button', class: 'button', on: { click: retry } }, 'Try again') : null);
}

/**
 * Section with a heading (h2) wired up with aria-labelledby.
 * @param {string} title
 * @param {Record<string, unknown>} [attrs]
 * @returns {{section: HTMLElement, body: HTMLElement}}
 */
export function titledSection(title, attrs = {}) {
  const headingId = uniqueId('section');
  const body = el('div', { class: 'section-body' });
  const section = el('section', { class: 'panel', 'aria-labelledby': headingId, ...attrs },
    el('h2', { id: headingId }, title), body);
  return { section, body };
}
