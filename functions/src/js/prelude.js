// Runs once in every function context, before any function code: takes away code
// generation from strings, adds console and timers, and defines the runner the engine
// calls for each execution (which builds the `nango` object and collects its effects).
(() => {
  'use strict';
  const noCode = function () {
    throw new EvalError('code generation from strings is not available to webhook functions');
  };
  Object.defineProperty(noCode, 'prototype', { value: Function.prototype });
  for (const f of [function () {}, async function () {}, function* () {}, async function* () {}]) {
    Object.defineProperty(Object.getPrototypeOf(f), 'constructor', { value: noCode });
  }
  delete globalThis.eval;
  globalThis.Function = noCode;

  const copy = (value) => (value === undefined ? undefined : JSON.parse(JSON.stringify(value)));
  const isObject = (value) => value !== null && typeof value === 'object' && !Array.isArray(value);
  let current = { logs: [] };

  const log = (level, message, payload) => {
    const line = { level, message: typeof message === 'string' ? message : JSON.stringify(message) };
    if (payload !== undefined) line.payload = copy(payload);
    if (current.logs.length < 1000) current.logs.push(line);
  };
  const consoleAt = (level) => (...args) =>
    log(level, args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' '));
  globalThis.console = Object.freeze({
    log: consoleAt('info'), info: consoleAt('info'), debug: consoleAt('debug'),
    warn: consoleAt('warn'), error: consoleAt('error'),
  });

  // Timers run while the execution waits for them, never past its deadline.
  let timers = [];
  let timerSeq = 0;
  globalThis.setTimeout = (fn, ms, ...args) => {
    if (typeof fn !== 'function') throw new TypeError('setTimeout needs a function');
    const id = ++timerSeq;
    timers.push({ id, at: Date.now() + Math.max(0, Number(ms) || 0), fn, args });
    return id;
  };
  globalThis.clearTimeout = (id) => {
    timers = timers.filter((t) => t.id !== id);
  };
  const nextTimer = () => (timers.length === 0 ? -1 : Math.min(...timers.map((t) => t.at)));
  const fireTimers = () => {
    const now = Date.now();
    const due = timers.filter((t) => t.at <= now).sort((a, b) => a.at - b.at || a.id - b.id);
    timers = timers.filter((t) => t.at > now);
    for (const t of due) t.fn(...t.args);
  };

  // Model names by the JSON text the engine passes: parsed once per sync, not per run.
  const modelSets = new Map();
  const modelsOf = (json) => {
    let models = modelSets.get(json);
    if (models === undefined) {
      models = new Set(JSON.parse(json));
      modelSets.set(json, models);
    }
    return models;
  };

  const makeNango = (input, effects) => {
    const models = input.models;
    const checked = (records, model, call) => {
      if (!Array.isArray(records)) throw new TypeError(`${call}: the records must be an array`);
      if (typeof model !== 'string' || (models.size > 0 && !models.has(model))) {
        throw new TypeError(`${call}: model ${JSON.stringify(model)} is not one of this sync's models (${[...models].join(', ')})`);
      }
      for (const record of records) {
        const id = record === null || typeof record !== 'object' ? undefined : record.id;
        if (!((typeof id === 'string' && id !== '') || (typeof id === 'number' && Number.isFinite(id)))) {
          throw new TypeError(`${call}: every record needs an id (a non-empty string or a number)`);
        }
      }
      // Serialised now: what the call saw is what is written, whatever the function
      // does with its objects afterwards.
      return JSON.stringify(records);
    };
    const write = (kind, call) => async (records, model) => {
      effects.writes.push(`{"kind":"${kind}","model":${JSON.stringify(model)},"records":${checked(records, model, call)}}`);
      return true;
    };
    // Parsed when first asked for: most handlers never read them.
    let metadata;
    const currentMetadata = () => {
      if (metadata === undefined) metadata = JSON.parse(input.metadata);
      return metadata;
    };
    const metadataWrite = (how, call) => async (value) => {
      if (!isObject(value)) throw new TypeError(`${call}: the metadata must be an object`);
      const written = copy(value);
      metadata = how === 'replace' ? written : { ...currentMetadata(), ...written };
      effects.metadata.push({ how, value: written });
    };
    return {
      connectionId: input.connectionId,
      providerConfigKey: input.providerConfigKey,
      batchSave: write('save', 'batchSave'),
      batchUpdate: write('update', 'batchUpdate'),
      batchDelete: write('delete', 'batchDelete'),
      getMetadata: async () => copy(currentMetadata()),
      setMetadata: metadataWrite('replace', 'setMetadata'),
      updateMetadata: metadataWrite('merge', 'updateMetadata'),
      getConnection: async () => JSON.parse(input.connection),
      log: async (message, payload, options) => {
        const level = (options && options.level) || (isObject(payload) && payload.level) || 'info';
        log(String(level), message, isObject(payload) && 'level' in payload ? undefined : payload);
      },
    };
  };

  const engine = {
    run: async (handler, payload, connectionId, providerConfigKey, metadata, connection, models) => {
      const effects = { writes: [], metadata: [], logs: [] };
      current = effects;
      timers = [];
      const input = { connectionId, providerConfigKey, metadata, connection, models: modelsOf(models) };
      await handler(makeNango(input, effects), JSON.parse(payload));
      // The writes are JSON already.
      return `{"writes":[${effects.writes.join(',')}],"metadata":${JSON.stringify(effects.metadata)},"logs":${JSON.stringify(effects.logs)}}`;
    },
    logs: () => JSON.stringify(current.logs),
    nextTimer,
    fireTimers,
  };
  Object.defineProperty(globalThis, '__hookyard', { value: Object.freeze(engine) });
})();
