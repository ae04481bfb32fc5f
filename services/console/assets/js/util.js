/**
 * Small async helpers shared by the views.
 * @module util
 */

/**
 * Wait ms milliseconds; resolves early (never rejects) when the signal aborts.
 * @param {number} ms
 * @param {AbortSignal} [signal]
 * @returns {Promise<void>}
 */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/**
 * Wrap an async task so at most one run is in flight and at most one more is queued:
 * calls made while it runs collapse into a single follow-up run.
 * @param {() => Promise<void>} task
 * @param {(error: unknown) => void} [onError]
 * @returns {() => Promise<void>} trigger
 */
export function coalesce(task, onError = () => {}) {
  let running = false;
  let queued = false;
  return async function trigger() {
    if (running) {
      queued = true;
      return;
    }
    running = true;
    try {
      do {
        queued = false;
        try {
          await task();
        } catch (error) {
          onError(error);
        }
      } while (queued);
    } finally {
      running = false;
    }
  };
}

/**
 * True for errors a view should not display: the view was left (aborted) or the
 * session ended (401, the app is already showing the login page).
 * @param {unknown} error
 * @param {AbortSignal} [signal]
 * @returns {boolean}
 */
export function isQuiet(error, signal) {
  return Boolean(signal?.aborted || error?.name === 'AbortError' || error?.status === 401);
}

/**
 * Run fn every ms milliseconds until the signal aborts.
 * @param {() => void} fn
 * @param {number} ms
 * @param {AbortSignal} signal
 */
export function every(fn, ms, signal) {
  const timer = setInterval(fn, ms);
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });
}
