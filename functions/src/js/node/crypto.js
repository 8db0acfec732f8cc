// The built-in module `crypto` (also `node:crypto`); made by globals.js.
const crypto = globalThis.__hookyardNode.crypto;
export const { createHash, createHmac, hash, getHashes, randomBytes, randomUUID, getRandomValues, timingSafeEqual } = crypto;
export default crypto;
