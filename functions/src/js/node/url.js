// The built-in module `url` (also `node:url`); made by globals.js.
const url = globalThis.__hookyardNode.url;
export const { URL, URLSearchParams } = url;
export default url;
