import { message } from "./message.js";

const heading = document.getElementById("message");

function render(text) {
  heading.textContent = text;
}

render(message);

if (import.meta.hot) {
  // Accepting the dependency makes an edit of message.js a hot update of this module's
  // view, not a full page reload (which would lose window state such as window.__marker).
  import.meta.hot.accept("./message.js", (next) => {
    if (next) {
      render(next.message);
      window.__hmrUpdates = (window.__hmrUpdates || 0) + 1;
    }
  });
}
