// Deliberately close to Vite's defaults: the suite checks what a stock dev server does
// behind the gateway. The HMR client follows the page's own host and port (no
// server.hmr.clientPort), so its WebSocket goes through the gateway like the page.
export default {
  clearScreen: false,
  // The suite runs a copy of this project whose node_modules is a symlink to this one;
  // keep Vite's cache inside the copy.
  cacheDir: ".vite-cache",
  plugins: [
    {
      // GET /__e2e/headers answers the request headers Vite received, as JSON. Added
      // after Vite's own middlewares (the returned function), so its host check applies.
      name: "e2e-request-headers",
      configureServer(server) {
        return () => {
          server.middlewares.use("/__e2e/headers", (req, res) => {
            res.setHeader("Content-Type", "application/json");
            res.end(JSON.stringify(req.headers));
          });
        };
      },
    },
  ],
};
