// The built-in module `buffer` (also `node:buffer`); made by globals.js.
const buffer = globalThis.__hookyardNode.buffer;
export const { Buffer, atob, btoa } = buffer;
export default buffer;
