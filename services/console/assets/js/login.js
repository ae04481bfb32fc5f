/**
 * The login page: the only thing shown without a session.
 * @module login
 */

import { login } from './api.js';
import { el } from './dom.js';

/**
 * Render the login form.
 * @param {{root: HTMLElement, signal: AbortSignal, message?: string,
 *   onLoggedIn: (session: {user: string, groups?: string[]}) => void}} options
 */
export function renderLogin({ root, signal, message = '', onLoggedIn }) {
  const alert = el('p', { class: 'notice login-message', role: 'alert', 'data-testid': 'login-message' });
  const user = el('input', {
    id: 'user', name: 'user', type: 'text', autocomplete: 'username', autocapitalize: 'none',
    spellcheck: 'false', required: true, 'data-autofocus': true,
  });
  const password = el('input', {
    id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true,
  });
  const submit = el('button', { type: 'submit', class: 'button primary' }, 'Log in');
  const form = el('form', { id: 'login', class: 'stack', novalidate: true },
    el('div', { class: 'field' }, el('label', { for: 'user' }, 'User name'), user),
    el('div', { class: 'field' }, el('label', { for: 'password' }, 'Password'), password),
    submit);

  function say(text) {
    alert.textContent = text;
    alert.classList.toggle('error', Boolean(text));
    alert.hidden = !text;
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (!user.value.trim() || !password.value) {
      say('Enter your user name and password.');
      (user.value.trim() ? password : user).focus();
      return;
    }
    submit.disabled = true;
    form.setAttribute('aria-busy', 'true');
    say('');
    try {
      const session = await login(user.value.trim(), password.value);
      if (!signal.aborted) onLoggedIn(session);
    } catch (error) {
      if (signal.aborted) return;
      const wrong = error?.status === 401 && error.generic;
      say(wrong ? 'Wrong user name or password.' : error?.message || 'Could not log in.');
      password.value = '';
      password.focus();
    } finally {
      submit.disabled = false;
      form.removeAttribute('aria-busy');
    }
  }

  form.addEventListener('submit', onSubmit);
  say(message);
  root.append(el('section', { class: 'login-card panel', 'aria-labelledby': 'login-title' },
    el('h1', { id: 'login-title', tabindex: '-1' }, 'Log in'),
    el('p', { class: 'muted' }, 'Tessera review console: approvals, workflows and agents.'),
    alert,
    form));
}
