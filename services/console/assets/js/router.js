/**
 * Hash routing: #/login, #/inbox, #/workflows?…, #/workflows/<id>, #/agents, #/policies.
 * Each mounted view gets an AbortSignal that aborts when the next view mounts.
 * @module router
 */

/**
 * @typedef {object} Route
 * @property {'login' | 'inbox' | 'workflows' | 'workflow' | 'agents' | 'policies'} name
 * @property {Record<string, string>} params
 * @property {URLSearchParams} query
 * @property {boolean} known false when the hash named no page (the default is used)
 */

/**
 * Whether a hash belongs to the router (an in-page anchor such as "#main" does not).
 * @param {string} hash
 * @returns {boolean}
 */
export function isRouteHash(hash) {
  return hash === '' || hash === '#' || hash.startsWith('#/');
}

function decode(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

/**
 * Parse a location hash into a route.
 * @param {string} hash e.g. "#/workflows?state=WORKFLOW_STATE_RUNNING"
 * @returns {Route}
 */
export function parseRoute(hash) {
  const raw = hash.replace(/^#\/?/, '');
  const mark = raw.indexOf('?');
  const path = mark >= 0 ? raw.slice(0, mark) : raw;
  const query = new URLSearchParams(mark >= 0 ? raw.slice(mark + 1) : '');
  const segments = path.split('/').filter(Boolean).map(decode);
  const [first, second, ...rest] = segments;
  const route = (name, params = {}, known = true) => ({ name, params, query, known });
  if (rest.length) return route('inbox', {}, false);
  if (first === 'login' && !second) return route('login');
  if (first === 'inbox' && !second) return route('inbox');
  if (first === 'agents' && !second) return route('agents');
  if (first === 'policies' && !second) return route('policies');
  if (first === 'workflows') return second ? route('workflow', { id: second }) : route('workflows');
  return route('inbox', {}, !first);
}

/**
 * Replace the current hash without a hashchange event (and without a history entry).
 * @param {string} hash
 */
export function replaceHash(hash) {
  if (location.hash !== hash) history.replaceState(null, '', hash);
}

/**
 * Mounts one view at a time into a container.
 */
export class ViewHost {
  /** @param {HTMLElement} root */
  constructor(root) {
    this.root = root;
    this.controller = null;
    this.key = '';
  }

  /**
   * Abort the current view, clear the container and render the next one.
   * @param {string} key identifies the page; when it changes, focus moves to the new
   *   page's [data-autofocus] element or its h1 (which should have tabindex="-1")
   * @param {(context: {root: HTMLElement, signal: AbortSignal}) => void} render
   */
  mount(key, render) {
    this.controller?.abort();
    this.controller = new AbortController();
    this.root.replaceChildren();
    this.root.removeAttribute('aria-busy');
    const changed = key !== this.key;
    this.key = key;
    render({ root: this.root, signal: this.controller.signal });
    if (changed) (this.root.querySelector('[data-autofocus]') || this.root.querySelector('h1'))?.focus();
  }

  /** Abort the current view and clear the container. */
  unmount() {
    this.controller?.abort();
    this.controller = null;
    this.key = '';
    this.root.replaceChildren();
  }
}
