// The built-in module `nango`: what a function imports to declare itself.
export function createSync(config) {
  return { ...config, type: 'sync' };
}
export function createAction(config) {
  return { ...config, type: 'action' };
}
export function createOnEvent(config) {
  return { ...config, type: 'on-event' };
}
export default { createSync, createAction, createOnEvent };
