import { message } from "./message.js";

const heading = document.getElementById("message");
const status = document.getElementById("hmr-status");

function render(text) {
  heading.textContent = text;
}

render(message);

if (import.meta.hot) {
  // Accepting the dependency here makes an edit of message.js a hot update of this module's
  // view, not a full page reload (which would lose window state).
  import.meta.hot.accept("./message.js", (next) => {
    if (next) {
      render(next.message);
      window.__hmrUpdates = (window.__hmrUpdates || 0) + 1;
    }
  });
  import.meta.hot.on("vite:ws:connect", () => {
    status.textContent = "hmr: connected";
    window.__hmrConnected = true;
  });
  import.meta.hot.on("vite:ws:disconnect", () => {
    status.textContent = "hmr: disconnected";
    window.__hmrConnected = false;
  });
}
