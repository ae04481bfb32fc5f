/**
 * Entry point of the review console: session check, header, routing.
 * Nothing but the login form is shown until GET /v1/sessions/current succeeds.
 * @module app
 */

import { currentSession, logout, onUnauthorized } from './js/api.js';
import { el } from './js/dom.js';
import { isRouteHash, parseRoute, replaceHash, ViewHost } from './js/router.js';
import { renderLogin } from './js/login.js';
import { renderInbox } from './js/inbox.js';
import { renderWorkflows } from './js/workflows.js';
import { renderWorkflowDetail } from './js/workflow-detail.js';
import { renderAgents } from './js/agents.js';
import { renderPolicies } from './js/policies.js';

const EXPIRED = 'Your session has expired. Log in again.';
const TITLE = 'Tessera review console';

const VIEWS = {
  inbox: { title: 'Approvals', render: renderInbox },
  workflows: { title: 'Workflows', render: renderWorkflows },
  workflow: { title: 'Workflow', render: renderWorkflowDetail },
  agents: { title: 'Agents', render: renderAgents },
  policies: { title: 'Policies', render: renderPolicies },
};

const NAV = [
  { href: '#/inbox', label: 'Inbox', routes: ['inbox'] },
  { href: '#/workflows', label: 'Workflows', routes: ['workflows', 'workflow'] },
  { href: '#/agents', label: 'Agents', routes: ['agents'] },
  { href: '#/policies', label: 'Policies', routes: ['policies'] },
];

const state = {
  /** @type {{user: string, groups?: string[]} | null} */
  session: null,
  /** Hash to return to after logging in. */
  intended: '',
  /** Message for the login page (session expired). */
  flash: '',
};

const header = /** @type {HTMLElement} */ (document.getElementById('site-header'));
const main = /** @type {HTMLElement} */ (document.getElementById('main'));
const host = new ViewHost(main);

function renderHeader(session) {
  const nav = el('nav', { class: 'site-nav', 'aria-label': 'Main' },
    el('ul', {}, NAV.map((item) => el('li', {}, el('a', { href: item.href }, item.label)))));
  const groups = session.groups?.length ? session.groups.join(', ') : 'no groups';
  const logoutButton = el('button', { type: 'button', class: 'button', 'data-testid': 'logout' }, 'Log out');
  logoutButton.addEventListener('click', () => onLogout(logoutButton));
  header.replaceChildren(
    el('a', { class: 'brand', href: '#/inbox' }, 'Tessera', el('span', { class: 'brand-sub' }, 'review console')),
    nav,
    el('div', { class: 'whoami' },
      el('span', { class: 'visually-hidden' }, 'Logged in as '),
      el('span', { 'data-testid': 'whoami', class: 'user' }, session.user || ''),
      el('span', { class: 'groups', 'data-testid': 'groups', title: 'Your groups' }, groups),
      logoutButton),
  );
  header.hidden = false;
}

function markCurrentNav(routeName) {
  for (const link of header.querySelectorAll('.site-nav a')) {
    const item = NAV.find((entry) => entry.href === link.getAttribute('href'));
    if (item?.routes.includes(routeName)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function showLogin() {
  header.hidden = true;
  header.replaceChildren();
  replaceHash('#/login');
  document.title = `Log in · ${TITLE}`;
  const message = state.flash;
  host.mount('login', ({ root, signal }) => renderLogin({ root, signal, message, onLoggedIn }));
}

function onLoggedIn(session) {
  state.session = session;
  state.flash = '';
  const target = state.intended || '#/inbox';
  state.intended = '';
  renderHeader(session);
  replaceHash(target);
  route();
}

async function onLogout(button) {
  button.disabled = true;
  try {
    await logout();
  } catch {
    // The session may already be gone; the login page is shown either way.
  }
  state.session = null;
  state.flash = '';
  state.intended = '';
  showLogin();
}

function onSessionLost() {
  if (!state.session) return;
  state.session = null;
  state.flash = EXPIRED;
  const here = location.hash;
  state.intended = isRouteHash(here) && parseRoute(here).name !== 'login' ? here : '';
  showLogin();
}

function route() {
  const hash = location.hash;
  if (!isRouteHash(hash)) return;
  const target = parseRoute(hash);
  if (!state.session) {
    if (target.name !== 'login' && target.known && hash.length > 2) state.intended = hash;
    showLogin();
    return;
  }
  if (target.name === 'login' || !target.known || hash.length <= 2) {
    replaceHash('#/inbox');
    route();
    return;
  }
  const view = VIEWS[target.name];
  const key = target.name === 'workflow' ? `workflow:${target.params.id}` : target.name;
  document.title = `${view.title}${target.params.id ? ` ${target.params.id}` : ''} · ${TITLE}`;
  markCurrentNav(target.name);
  host.mount(key, ({ root, signal }) => view.render({
    root, signal, params: target.params, query: target.query, session: state.session,
  }));
}

function wireSkipLink() {
  document.querySelector('.skip-link')?.addEventListener('click', (event) => {
    event.preventDefault();
    main.focus();
  });
}

async function start() {
  wireSkipLink();
  onUnauthorized(onSessionLost);
  main.setAttribute('aria-busy', 'true');
  try {
    state.session = await currentSession();
    renderHeader(state.session);
  } catch (error) {
    state.session = null;
    if (error?.status !== 401) state.flash = `Could not check your session: ${error?.message || 'unknown error'}`;
    // The cookie is out of reach of scripts; the front door says why it refused it.
    else if (/expired/i.test(error.message)) state.flash = EXPIRED;
  }
  main.removeAttribute('aria-busy');
  window.addEventListener('hashchange', route);
  route();
}

start();
