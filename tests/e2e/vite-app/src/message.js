// The end-to-end suite rewrites this line in its copy of the project and expects the page
// to show the new text through an HMR update, without a full reload.
export const message = "Hello from Vite through the gateway";
