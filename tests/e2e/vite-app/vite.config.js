// Deliberately close to Vite's defaults: the suite checks what a stock dev server does
// behind the gateway. The HMR client follows the page's own host and port (no
// server.hmr.clientPort), so its WebSocket goes through the gateway like the page.
export default {
  clearScreen: false,
  logLevel: "info",
  // The suite runs a copy of this project whose node_modules is a symlink to this one;
  // keep Vite's cache inside the copy.
  cacheDir: ".vite-cache",
};
