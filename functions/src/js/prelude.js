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
  // The way out to the execution's host: kept here, out of function code's reach.
  const hostCall = globalThis.__hookyardHost;
  delete globalThis.__hookyardHost;
  // URL, Buffer and the rest of globals.js are set up the first time one is read (most
  // functions never do); one the function sets before that stays its own.
  const loadGlobals = globalThis.__hookyardLoadGlobals;
  delete globalThis.__hookyardLoadGlobals;
  let globalsLoaded = false;
  const lazyGlobal = (name, settable) => {
    const get = () => {
      if (!globalsLoaded) {
        globalsLoaded = true;
        loadGlobals();
      }
      return Object.getOwnPropertyDescriptor(globalThis, name)?.value;
    };
    const set = (value) => Object.defineProperty(globalThis, name, { value, writable: true, configurable: true });
    Object.defineProperty(globalThis, name, { get, set: settable ? set : undefined, configurable: true });
  };
  for (const name of ['URL', 'URLSearchParams', 'Buffer', 'TextEncoder', 'TextDecoder', 'atob', 'btoa']) lazyGlobal(name, true);
  lazyGlobal('__hookyardNode', false);
  const host = (op, args) => {
    const answer = hostCall(op, typeof args === 'string' ? args : JSON.stringify(args ?? null));
    return answer === '' ? undefined : JSON.parse(answer);
  };

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

  // Timers run while the execution waits for them, never past its deadline, and never
  // before their time: `Date.now()` counts whole milliseconds, so a delay waits one more
  // than asked (a zero delay stays zero).
  let timers = [];
  let timerSeq = 0;
  globalThis.setTimeout = (fn, ms, ...args) => {
    if (typeof fn !== 'function') throw new TypeError('setTimeout needs a function');
    const id = ++timerSeq;
    const delay = Math.max(0, Number(ms) || 0);
    timers.push({ id, at: Date.now() + (delay > 0 ? delay + 1 : 0), fn, args });
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

  // Nango's `nango.ActionError`: an error whose payload the caller is meant to see. Its
  // message is the payload's (Nango leaves it empty), so a failure report says it.
  // A zod issue as `path: message` (`whole` when it is about the value itself).
  const issueText = (issue, whole) => {
    const { path = [], message = 'invalid' } = issue ?? {};
    return `${path.length > 0 ? path.join('.') : whole}: ${message}`;
  };
  const shown = (value) => {
    try {
      return JSON.stringify(value) ?? '';
    } catch {
      return String(value);
    }
  };
  class ActionError extends Error {
    constructor(payload) {
      super(typeof payload?.message === 'string' ? payload.message : shown(payload));
      this.name = 'ActionError';
      this.type = 'action_script_runtime_error';
      if (payload) this.payload = payload;
    }
  }

  const makeNango = (input, effects, hosted) => {
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
    // batchSave's records against their model, when it is a zod schema: as Nango does, a
    // warning in the log, or (validation 'fail') the call throws.
    const validated = (records, model, call) => {
      const schema = input.validation === 'off' || !isObject(input.schemas) ? undefined : input.schemas[model];
      if (typeof schema?.safeParse !== 'function') return;
      let invalid = 0;
      let first;
      for (const record of records) {
        const result = schema.safeParse(record);
        if (!result.success) {
          invalid += 1;
          first ??= { id: record.id, issue: result.error.issues[0] };
        }
      }
      if (invalid === 0) return;
      const message = `${call}: ${invalid} of ${records.length} record(s) do not match the ${model} model; ` +
        `the first, id ${JSON.stringify(first.id)}: ${issueText(first.issue, 'the record')}`;
      if (input.validation === 'fail') throw new TypeError(message);
      log('warn', message);
    };
    let strategy = 'ignore_if_modified_after';
    const write = (kind, call) => async (records, model) => {
      const json = `{"kind":"${kind}","model":${JSON.stringify(model)},"records":${checked(records, model, call)}}`;
      if (kind === 'save') validated(records, model, call);
      if (hosted) {
        // Applied now, as Nango's batchSave does: a long exec does not hold its records.
        host('write', `{"strategy":"${strategy}",${json.slice(1)}`);
      } else {
        effects.writes.push(json);
      }
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
      if (hosted) host('metadata', { how, value: written });
      else effects.metadata.push({ how, value: written });
    };
    const nango = {
      connectionId: input.connectionId,
      providerConfigKey: input.providerConfigKey,
      // The integration's provider (`github`, …), as Nango's; read from the connection when asked.
      get provider() {
        return JSON.parse(input.connection).provider;
      },
      ActionError,
      batchSave: write('save', 'batchSave'),
      batchUpdate: write('update', 'batchUpdate'),
      batchDelete: write('delete', 'batchDelete'),
      // Nango's deprecated name of batchSave.
      batchSend: write('save', 'batchSend'),
      getMetadata: async () => copy(currentMetadata()),
      // Nango's: input against a zod schema; each issue logged, then an ActionError.
      zodValidateInput: async ({ zodSchema, input: given }) => {
        const parsed = zodSchema.safeParse(given);
        if (parsed.success) return;
        for (const issue of parsed.error.issues) log('error', `Invalid input: ${issue.message} at path ${issue.path.join('.')}`);
        throw new ActionError({ message: 'Invalid input provided' });
      },
      // Nango's, deprecated there for getMetadata: the metadata's `fieldMapping`.
      getFieldMapping: async () => copy(currentMetadata().fieldMapping) ?? {},
      setMetadata: metadataWrite('replace', 'setMetadata'),
      updateMetadata: metadataWrite('merge', 'updateMetadata'),
      getConnection: async () => JSON.parse(input.connection),
      // Nango's: [{ name, value }], set through PUT /environment-variables. Exec asks its
      // host instead (below), for them as they are now.
      getEnvironmentVariables: async () => JSON.parse(input.environmentVariables),
      log: async (message, payload, options) => {
        const level = (options && options.level) || (isObject(payload) && payload.level) || 'info';
        log(String(level), message, isObject(payload) && 'level' in payload ? undefined : payload);
      },
    };
    if (hosted) {
      Object.assign(nango, execApi((s) => { strategy = s; }));
      // Nango's: a Date, or undefined before the first successful run. Asked for once.
      let lastSyncDate = null;
      Object.defineProperty(nango, 'lastSyncDate', {
        enumerable: true,
        get: () => {
          if (lastSyncDate === null) lastSyncDate = host('lastSyncDate', {}) ?? undefined;
          return lastSyncDate === undefined ? undefined : new Date(lastSyncDate);
        },
      });
      return nango;
    }
    // onWebhook's has the provider API too, and the rest of exec's calls, which throw
    // saying they are for exec (made once, shared).
    return Object.setPrototypeOf(nango, webhookApi);
  };

  // The most ids one getRecordsByIds host call takes (host.rs's IDS_PER_CALL).
  const IDS_PER_CALL = 100;

  // The provider's API, with the connection's credentials: exec's and onWebhook's.
  const proxy = async (config) => {
    if (!isObject(config) || typeof config.endpoint !== 'string') {
      throw new TypeError('proxy: give it an object with an endpoint');
    }
    const method = String(config.method || 'GET').toUpperCase();
    const response = host('proxy', {
      method,
      endpoint: config.endpoint,
      params: config.params ?? null,
      data: config.data === undefined ? null : config.data,
      headers: config.headers ?? null,
      retries: config.retries ?? null,
      retryOn: config.retryOn ?? null,
      retryHeader: config.retryHeader ?? null,
    });
    if (response.status >= 400) {
      const error = new Error(`${method} ${config.endpoint} answered ${response.status}`);
      error.status = response.status;
      error.response = response;
      // What an action's caller is shown when the function lets it through.
      error.type = 'script_http_error';
      error.payload = { status: response.status, data: response.data };
      throw error;
    }
    return response;
  };
  const verb = (method) => (config) => proxy({ ...config, method });
  const at = (value, path) => {
    if (!path) return value;
    return String(path).split('.').reduce((v, key) => (v === null || v === undefined ? undefined : v[key]), value);
  };
  const nextLink = (header, rel) => {
    if (typeof header !== 'string') return undefined;
    for (const part of header.split(',')) {
      const match = part.match(/<([^>]*)>\s*;(.*)/);
      if (match && new RegExp(`rel="?${rel}"?`).test(match[2])) return match[1];
    }
    return undefined;
  };
  // Nango's paginate: cursor, link and offset styles; each page's items are yielded.
  async function* paginate(config) {
    if (!isObject(config) || typeof config.endpoint !== 'string') {
      throw new TypeError('paginate: give it an object with an endpoint');
    }
    const rules = { ...(host('pagination', {}) ?? {}), ...(config.paginate ?? {}) };
    const method = config.method || 'GET';
    const params = { ...(config.params ?? {}) };
    if (rules.limit !== undefined && rules.limit_name_in_request) params[rules.limit_name_in_request] = rules.limit;
    let endpoint = config.endpoint;
    let offset = Number(rules.offset_start_value ?? 0);
    for (let page = 0; ; page++) {
      if (rules.type === 'offset') params[rules.offset_name_in_request || 'offset'] = offset;
      const response = await proxy({ ...config, method, endpoint, params });
      const items = at(response.data, rules.response_path);
      if (!Array.isArray(items)) {
        throw new TypeError(`paginate: the response ${rules.response_path ? `at ${rules.response_path} ` : ''}is not an array`);
      }
      if (items.length > 0) yield items;
      if (items.length === 0 || !rules.type) return;
      if (rules.type === 'cursor') {
        const cursor = at(response.data, rules.cursor_path_in_response);
        if (cursor === undefined || cursor === null || cursor === '') return;
        params[rules.cursor_name_in_request || 'cursor'] = cursor;
      } else if (rules.type === 'link') {
        const link = rules.link_path_in_response_body
          ? at(response.data, rules.link_path_in_response_body)
          : nextLink(response.headers.link, rules.link_rel_in_response_header || 'next');
        if (!link) return;
        endpoint = link;
        for (const key of Object.keys(params)) delete params[key];
      } else if (rules.type === 'offset') {
        if (rules.limit !== undefined && items.length < Number(rules.limit)) return;
        offset += rules.offset_calculation_method === 'per-page' ? 1 : items.length;
      } else {
        throw new TypeError(`paginate: type ${JSON.stringify(rules.type)} is not cursor, link or offset`);
      }
    }
  }
  // The models of the run under way: a call about another is refused.
  let runModels = new Set();
  const modelChecked = (model, call) => {
    if (typeof model !== 'string' || (runModels.size > 0 && !runModels.has(model))) {
      throw new TypeError(`${call}: model ${JSON.stringify(model)} is not one of this sync's models`);
    }
    return model;
  };
  // Reads of the records cache, as it is committed: keyed by the ids as given (Nango's
  // Map), in their order; asked for a hundred at a time.
  const getRecordsByIds = async (ids, model) => {
    if (!Array.isArray(ids)) throw new TypeError('getRecordsByIds: the ids must be an array');
    modelChecked(model, 'getRecordsByIds');
    const given = new Map(ids.map((id) => [String(id), id]));
    const texts = [...given.keys()];
    const records = new Map();
    for (let i = 0; i < texts.length; i += IDS_PER_CALL) {
      for (const record of host('getRecordsByIds', { model, ids: texts.slice(i, i + IDS_PER_CALL) })) {
        records.set(record.id, record);
      }
    }
    return new Map(texts.filter((text) => records.has(text)).map((text) => [given.get(text), records.get(text)]));
  };
  const providerApi = {
    proxy,
    get: verb('GET'),
    post: verb('POST'),
    put: verb('PUT'),
    patch: verb('PATCH'),
    delete: verb('DELETE'),
    paginate,
    getToken: async () => host('getToken', {}),
  };

  // What exec adds to `nango` besides: delete tracking, checkpoints, actions, syncs and
  // locks.
  const execApi = (setStrategy) => {
    return {
      ...providerApi,
      getRecordsByIds,
      trackDeletesStart: async (model) => { host('trackDeletesStart', { model: modelChecked(model, 'trackDeletesStart') }); },
      trackDeletesEnd: async (model) => host('trackDeletesEnd', { model: modelChecked(model, 'trackDeletesEnd') }),
      setMergingStrategy: async (merging, model) => {
        const chosen = isObject(merging) ? merging.strategy : undefined;
        if (chosen !== 'ignore_if_modified_after' && chosen !== 'override') {
          throw new TypeError("setMergingStrategy: strategy must be 'ignore_if_modified_after' or 'override'");
        }
        if (model !== undefined) modelChecked(model, 'setMergingStrategy');
        setStrategy(chosen);
      },
      getCheckpoint: async () => host('getCheckpoint', {}) ?? null,
      saveCheckpoint: async (checkpoint) => {
        if (!isObject(checkpoint)) throw new TypeError('saveCheckpoint: the checkpoint must be an object');
        host('saveCheckpoint', checkpoint);
      },
      clearCheckpoint: async () => { host('clearCheckpoint', {}); },
      getEnvironmentVariables: async () => host('getEnvironmentVariables', {}),
      getWebhookURL: async () => host('getWebhookURL', {}),
      // Nango's: the integration; `include: ['webhook']` adds its webhook_url.
      getIntegration: async (config) => host('getIntegration', { include: config?.include ?? [] }),
      // Nango's: asks for a run of a sync (with an exec) for a connection; `fullResync` resets it.
      triggerSync: async (providerConfigKey, connectionId, syncName, fullResync) => {
        host('triggerSync', { providerConfigKey, connectionId, syncName, fullResync: fullResync === true });
      },
      // Nango's locks, per environment and key: held by this run until released, until
      // the run ends, or for ttlMs.
      tryAcquireLock: async (options) => host('tryAcquireLock', { key: options?.key, ttlMs: options?.ttlMs }),
      releaseLock: async (options) => host('releaseLock', { key: options?.key }),
      releaseAllLocks: async () => { host('releaseAllLocks', {}); },
      // Nango's: runs an action of this environment for a connection; its output.
      triggerAction: async (providerConfigKey, connectionId, actionName, input) =>
        host('triggerAction', { providerConfigKey, connectionId, actionName, input: input ?? null }),
    };
  };

  // onWebhook's `nango` beyond its own: the provider API, record reads, and exec's other
  // calls, which throw. Its writes are committed with the event, after it returns, so
  // checkpoints and delete tracking would not see them, and locks, actions and syncs
  // would outlive a run that is retried.
  const webhookApi = Object.freeze({
    ...providerApi,
    getRecordsByIds,
    ...Object.fromEntries(
      ['trackDeletesStart', 'trackDeletesEnd', 'setMergingStrategy', 'getCheckpoint', 'saveCheckpoint',
        'clearCheckpoint', 'getWebhookURL', 'getIntegration', 'triggerAction', 'triggerSync',
        'tryAcquireLock', 'releaseLock', 'releaseAllLocks'].map((name) => [
        name,
        () => {
          throw new Error(`${name}: checkpoints, delete tracking, actions, syncs and locks are only available in exec, not in onWebhook`);
        },
      ]),
    ),
  });

  // An action's input or output against its zod schema, when it has one: the issues, or
  // undefined when it matches.
  const schemaIssues = (schema, value) => {
    if (typeof schema?.safeParse !== 'function') return undefined;
    const result = schema.safeParse(value);
    return result.success ? undefined : result.error.issues;
  };
  const mismatch = (what, issues) => {
    const error = new Error(`the ${what} does not match the action's ${what} schema: ${issueText(issues[0], 'it')}`);
    error.name = 'ValidationError';
    error.type = `invalid_action_${what}`;
    error.payload = { issues: copy(issues) };
    return error;
  };
  // An action: its input is refused when its schema refuses it; its output, as records
  // are (`validation`: a warning, or with 'fail' an error).
  const runAction = async (handler, nango, definition, payload, validation) => {
    const given = JSON.parse(payload);
    const refused = schemaIssues(definition.input, given);
    if (refused) throw mismatch('input', refused);
    const output = await handler(nango, given);
    const issues = validation === 'off' ? undefined : schemaIssues(definition.output, output);
    if (issues && validation === 'fail') throw mismatch('output', issues);
    if (issues) log('warn', mismatch('output', issues).message);
    return JSON.stringify(output) ?? 'null';
  };

  const engine = {
    run: async (handler, payload, connectionId, providerConfigKey, metadata, connection, models, mode, definition, validation,
      environmentVariables, trackDeletes) => {
      const effects = { writes: [], metadata: [], logs: [] };
      current = effects;
      timers = [];
      runModels = modelsOf(models);
      const input = {
        connectionId, providerConfigKey, metadata, connection, models: runModels, schemas: definition.models, validation,
        environmentVariables,
      };
      const hosted = mode !== 'webhook';
      const nango = makeNango(input, effects, hosted);
      let output = '';
      if (mode === 'action') {
        output = `,"output":${await runAction(handler, nango, definition, payload, validation)}`;
      } else if (hosted) {
        // Nango's older `trackDeletes: true`: records of any model not saved by a run that
        // succeeds are deleted at its end, as trackDeletesStart/End around it would.
        const tracked = trackDeletes ? [...input.models] : [];
        for (const model of tracked) host('trackDeletesStart', { model });
        await handler(nango);
        for (const model of tracked) host('trackDeletesEnd', { model });
      } else {
        await handler(nango, JSON.parse(payload));
      }
      // The writes are JSON already.
      return `{"writes":[${effects.writes.join(',')}],"metadata":${JSON.stringify(effects.metadata)},"logs":${JSON.stringify(effects.logs)}${output}}`;
    },
    logs: () => JSON.stringify(current.logs),
    nextTimer,
    fireTimers,
  };
  Object.defineProperty(globalThis, '__hookyard', { value: Object.freeze(engine) });
})();
