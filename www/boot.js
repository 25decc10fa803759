// Starts the page's wasm (an external file: the Content-Security-Policy forbids inline scripts).
import init from './vlsm-web.js';

const boot = document.getElementById('boot');
try {
  await init();
  boot?.remove();
} catch (e) {
  if (boot) boot.textContent = `vlsm could not start in this browser: ${e}`;
  throw e;
}
