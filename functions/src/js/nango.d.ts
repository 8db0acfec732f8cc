// Types of `nango`, the module hookyard's webhook functions import: what the sandbox
// gives a function (functions/src/js/nango.js and prelude.js), no more. For `tsc --noEmit`
// and editors: `hookyard types > nango.d.ts` in a functions project. hookyard itself
// erases types when it deploys and does not check them.

// The globals the sandbox adds to the language's own: no DOM and no Node.js, but what
// Nango's runtime gives its functions of them (URL, URLSearchParams, Buffer and the
// modules `crypto`, `url` and `buffer`, below), plus TextEncoder, TextDecoder, atob, btoa.
declare var console: {
  log(...args: unknown[]): void;
  info(...args: unknown[]): void;
  debug(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
};
/** Runs while the execution waits for it, never past its deadline. */
declare function setTimeout<A extends unknown[]>(fn: (...args: A) => void, ms?: number, ...args: A): number;
declare function clearTimeout(id: number): void;

/** A URL as WHATWG parses it (as Node.js and browsers do). */
declare class URL {
  constructor(url: string | URL, base?: string | URL);
  static canParse(url: string | URL, base?: string | URL): boolean;
  static parse(url: string | URL, base?: string | URL): URL | null;
  href: string;
  readonly origin: string;
  protocol: string;
  username: string;
  password: string;
  host: string;
  hostname: string;
  port: string;
  pathname: string;
  search: string;
  hash: string;
  /** Live: changing it changes the URL's query. */
  readonly searchParams: URLSearchParams;
  toString(): string;
  toJSON(): string;
}
declare class URLSearchParams implements Iterable<[string, string]> {
  constructor(init?: string | Iterable<readonly [string, string]> | Record<string, string> | URLSearchParams);
  readonly size: number;
  append(name: string, value: string): void;
  delete(name: string, value?: string): void;
  get(name: string): string | null;
  getAll(name: string): string[];
  has(name: string, value?: string): boolean;
  set(name: string, value: string): void;
  sort(): void;
  forEach(callback: (value: string, name: string, params: URLSearchParams) => void, thisArg?: unknown): void;
  entries(): IterableIterator<[string, string]>;
  keys(): IterableIterator<string>;
  values(): IterableIterator<string>;
  [Symbol.iterator](): IterableIterator<[string, string]>;
  toString(): string;
}

type BufferEncoding = 'utf8' | 'utf-8' | 'hex' | 'base64' | 'base64url' | 'latin1' | 'binary' | 'ascii' | 'ucs2' | 'ucs-2' | 'utf16le' | 'utf-16le';
/** Node.js's Buffer: a Uint8Array with its encodings and byte helpers. */
interface Buffer extends Uint8Array {
  toString(encoding?: BufferEncoding, start?: number, end?: number): string;
  toJSON(): { type: 'Buffer'; data: number[] };
  equals(other: Uint8Array): boolean;
  compare(target: Uint8Array, targetStart?: number, targetEnd?: number, sourceStart?: number, sourceEnd?: number): -1 | 0 | 1;
  /** A view of the same memory, as in Node.js. */
  slice(start?: number, end?: number): Buffer;
  subarray(start?: number, end?: number): Buffer;
  write(string: string, encoding?: BufferEncoding): number;
  write(string: string, offset: number, encoding?: BufferEncoding): number;
  write(string: string, offset: number, length: number, encoding?: BufferEncoding): number;
  copy(target: Uint8Array, targetStart?: number, sourceStart?: number, sourceEnd?: number): number;
  fill(value: string | number | Uint8Array, offset?: number, end?: number, encoding?: BufferEncoding): this;
  indexOf(value: string | number | Uint8Array, byteOffset?: number, encoding?: BufferEncoding): number;
  lastIndexOf(value: string | number | Uint8Array, byteOffset?: number, encoding?: BufferEncoding): number;
  includes(value: string | number | Uint8Array, byteOffset?: number, encoding?: BufferEncoding): boolean;
  readUInt8(offset?: number): number; readUint8(offset?: number): number; readInt8(offset?: number): number;
  readUInt16LE(offset?: number): number; readUInt16BE(offset?: number): number; readUint16LE(offset?: number): number; readUint16BE(offset?: number): number;
  readInt16LE(offset?: number): number; readInt16BE(offset?: number): number;
  readUInt32LE(offset?: number): number; readUInt32BE(offset?: number): number; readUint32LE(offset?: number): number; readUint32BE(offset?: number): number;
  readInt32LE(offset?: number): number; readInt32BE(offset?: number): number;
  readFloatLE(offset?: number): number; readFloatBE(offset?: number): number; readDoubleLE(offset?: number): number; readDoubleBE(offset?: number): number;
  readBigUInt64LE(offset?: number): bigint; readBigUInt64BE(offset?: number): bigint; readBigUint64LE(offset?: number): bigint; readBigUint64BE(offset?: number): bigint;
  readBigInt64LE(offset?: number): bigint; readBigInt64BE(offset?: number): bigint;
  writeUInt8(value: number, offset?: number): number; writeUint8(value: number, offset?: number): number; writeInt8(value: number, offset?: number): number;
  writeUInt16LE(value: number, offset?: number): number; writeUInt16BE(value: number, offset?: number): number; writeUint16LE(value: number, offset?: number): number; writeUint16BE(value: number, offset?: number): number;
  writeInt16LE(value: number, offset?: number): number; writeInt16BE(value: number, offset?: number): number;
  writeUInt32LE(value: number, offset?: number): number; writeUInt32BE(value: number, offset?: number): number; writeUint32LE(value: number, offset?: number): number; writeUint32BE(value: number, offset?: number): number;
  writeInt32LE(value: number, offset?: number): number; writeInt32BE(value: number, offset?: number): number;
  writeFloatLE(value: number, offset?: number): number; writeFloatBE(value: number, offset?: number): number; writeDoubleLE(value: number, offset?: number): number; writeDoubleBE(value: number, offset?: number): number;
  writeBigUInt64LE(value: bigint, offset?: number): number; writeBigUInt64BE(value: bigint, offset?: number): number; writeBigUint64LE(value: bigint, offset?: number): number; writeBigUint64BE(value: bigint, offset?: number): number;
  writeBigInt64LE(value: bigint, offset?: number): number; writeBigInt64BE(value: bigint, offset?: number): number;
}
declare var Buffer: {
  from(string: string, encoding?: BufferEncoding): Buffer;
  from(data: ArrayBuffer, byteOffset?: number, length?: number): Buffer;
  from(data: Uint8Array | ArrayLike<number> | { type: 'Buffer'; data: number[] }): Buffer;
  alloc(size: number, fill?: string | number | Uint8Array, encoding?: BufferEncoding): Buffer;
  /** Zeroed, as alloc. */
  allocUnsafe(size: number): Buffer;
  allocUnsafeSlow(size: number): Buffer;
  byteLength(value: string | ArrayBuffer | ArrayBufferView, encoding?: BufferEncoding): number;
  isBuffer(value: unknown): value is Buffer;
  isEncoding(encoding: string): encoding is BufferEncoding;
  concat(list: readonly Uint8Array[], totalLength?: number): Buffer;
  compare(a: Uint8Array, b: Uint8Array): -1 | 0 | 1;
};

declare class TextEncoder {
  readonly encoding: 'utf-8';
  encode(input?: string): Uint8Array;
  encodeInto(source: string, destination: Uint8Array): { read: number; written: number };
}
/** UTF-8 only. */
declare class TextDecoder {
  constructor(label?: 'utf-8' | 'utf8', options?: { fatal?: boolean; ignoreBOM?: boolean });
  readonly encoding: 'utf-8';
  readonly fatal: boolean;
  readonly ignoreBOM: boolean;
  decode(input?: ArrayBuffer | ArrayBufferView, options?: { stream?: boolean }): string;
}
declare function atob(data: string): string;
declare function btoa(data: string): string;

/** What `crypto` (and `node:crypto`) exports: hashing, HMACs and random values. */
interface HookyardCrypto {
  createHash(algorithm: HookyardCrypto.Algorithm): HookyardCrypto.Hash;
  createHmac(algorithm: HookyardCrypto.Algorithm, key: string | ArrayBuffer | ArrayBufferView): HookyardCrypto.Hash;
  /** `createHash(algorithm).update(data).digest(outputEncoding)`, hex by default. */
  hash(algorithm: HookyardCrypto.Algorithm, data: string | ArrayBuffer | ArrayBufferView, outputEncoding?: BufferEncoding): string;
  getHashes(): string[];
  randomBytes(size: number): Buffer;
  randomBytes(size: number, callback: (error: Error | null, bytes: Buffer) => void): void;
  randomUUID(): string;
  getRandomValues<T extends Int8Array | Uint8Array | Uint8ClampedArray | Int16Array | Uint16Array | Int32Array | Uint32Array | BigInt64Array | BigUint64Array>(array: T): T;
  timingSafeEqual(a: ArrayBuffer | ArrayBufferView, b: ArrayBuffer | ArrayBufferView): boolean;
}
declare namespace HookyardCrypto {
  /** Any case; `sha-256` as well as `sha256`. */
  type Algorithm = 'md5' | 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512' | (string & {});
  interface Hash {
    update(data: string | ArrayBuffer | ArrayBufferView, inputEncoding?: BufferEncoding): Hash;
    digest(): Buffer;
    digest(encoding: BufferEncoding): string;
    /** Hashes only (not HMACs). */
    copy(): Hash;
  }
}

declare module 'nango' {
  /** A record of a model: an `id` (a non-empty string or a number) and any fields. */
  export interface RecordWithId {
    id: string | number;
  }

  export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

  /** A connection as `getConnection()` gives it, with its credentials. */
  export interface Connection {
    connection_id: string;
    provider_config_key: string;
    provider: string;
    connection_config: Record<string, unknown>;
    metadata: Record<string, unknown>;
    tags: Record<string, unknown>;
    credentials:
      | { type: 'API_KEY'; apiKey: string }
      | { type: 'BASIC'; username: string; password: string }
      | { type: 'OAUTH2'; access_token: string; refresh_token?: string; expires_at?: string; raw?: unknown }
      | null;
    created_at: string;
    updated_at: string;
  }

  /** An integration as `getIntegration()` gives it. */
  export interface Integration {
    unique_key: string;
    provider: string;
    display_name: string | null;
    forward_webhooks: boolean;
    created_at: string;
    updated_at: string;
    webhook_url?: string;
  }

  /** Nango's: thrown as `throw new nango.ActionError({ message: '…' })`; reported as
   *  `ActionError: ` and the payload's message (or the payload as JSON). */
  class ActionErrorClass<P = Record<string, unknown>> extends Error {
    constructor(payload?: P);
    readonly type: 'action_script_runtime_error';
    readonly payload?: P;
  }
  /** A type, as in Nango: the class is `nango.ActionError`. */
  export type { ActionErrorClass as ActionError };

  /** What `onWebhook` gets: record writes (committed when it succeeds) and reads,
   *  metadata, logs, the provider's API (each call within the run's timeout). */
  export interface NangoWebhook {
    readonly connectionId: string;
    readonly providerConfigKey: string;
    /** The integration's provider (`github`, `hubspot`, …). */
    readonly provider: string;
    readonly ActionError: typeof ActionErrorClass;
    batchSave<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    batchUpdate<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    batchDelete<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    /** @deprecated As in Nango: batchSave's older name. */
    batchSend<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    /** Nango's: each issue `zodSchema` finds in `input` logged, then an `ActionError` thrown. */
    zodValidateInput(options: { zodSchema: { safeParse(value: unknown): unknown }; input: unknown }): Promise<void>;
    getMetadata<T extends object = Record<string, unknown>>(): Promise<T>;
    /** @deprecated As in Nango: the metadata's `fieldMapping` (`{}` when it has none); use getMetadata. */
    getFieldMapping(): Promise<Record<string, unknown>>;
    setMetadata(metadata: Record<string, unknown>): Promise<void>;
    updateMetadata(metadata: Record<string, unknown>): Promise<void>;
    getConnection(): Promise<Connection>;
    /** The environment's variables (`PUT /environment-variables`), by name; in onWebhook
     *  as the worker read them, at most a second before. */
    getEnvironmentVariables(): Promise<{ name: string; value: string }[]>;
    log(message: unknown, payload?: unknown, options?: { level?: LogLevel }): Promise<void>;
    /** A call to the provider's API with the connection's credentials; a non-2xx answer is
     *  thrown (`ProxyError`). */
    proxy<T = any>(config: ProxyConfiguration): Promise<ProxyResponse<T>>;
    get<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    post<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    put<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    patch<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    delete<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    /** Each page's items. */
    paginate<T = any>(config: ProxyConfiguration): AsyncGenerator<T[], void, undefined>;
    /** An OAuth2 connection's access token (refreshed when about to expire); the stored
     *  credentials of another kind (`{ type: 'API_KEY', apiKey }`, …). */
    getToken(): Promise<string | Record<string, unknown>>;
    /** The cached records of `model` with these ids (deleted ones are not), keyed by the
     *  ids as given, in their order; each with its `_nango_metadata`. As committed: in
     *  onWebhook, not this run's writes nor those of other events still being applied. */
    getRecordsByIds<K extends string | number = string, T = any>(ids: readonly K[], model: string): Promise<Map<K, T>>;
  }

  /** Nango's pagination rules; the integration's `settings.api.paginate` when a call gives none. */
  export interface Pagination {
    type?: 'cursor' | 'link' | 'offset';
    response_path?: string;
    limit?: number | string;
    limit_name_in_request?: string;
    cursor_path_in_response?: string;
    cursor_name_in_request?: string;
    link_path_in_response_body?: string;
    link_rel_in_response_header?: string;
    offset_name_in_request?: string;
    offset_start_value?: number;
    offset_calculation_method?: 'by-response-size' | 'per-page';
  }

  export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

  /** A call to the provider's API, with the connection's credentials. */
  export interface ProxyConfiguration {
    endpoint: string;
    method?: HttpMethod;
    params?: Record<string, string | number | boolean>;
    data?: unknown;
    headers?: Record<string, string>;
    retries?: number;
    /** Statuses retried besides 429 and 5xx. */
    retryOn?: number[] | null;
    /** Where the answer says how long to wait: `after` a header of seconds, `at` one of UTC epoch seconds. */
    retryHeader?: { at?: string; after?: string };
    paginate?: Pagination;
  }

  export interface ProxyResponse<T = any> {
    status: number;
    headers: Record<string, string>;
    data: T;
  }

  /** A non-2xx answer: what `proxy` and its verbs throw. */
  export interface ProxyError extends Error {
    status: number;
    response: ProxyResponse;
  }

  /** What `exec` (and an event function) gets: writes applied as they are made, and
   *  checkpoints, delete tracking, actions, syncs and locks. */
  export interface NangoSync extends NangoWebhook {
    /** When the last successful run started; undefined before the first and after a reset. */
    readonly lastSyncDate: Date | undefined;
    trackDeletesStart(model: string): Promise<void>;
    /** The count of records deleted (in a dry run: that would be). */
    trackDeletesEnd(model: string): Promise<number>;
    setMergingStrategy(
      merging: { strategy: 'ignore_if_modified_after' | 'override' },
      model?: string,
    ): Promise<void>;
    getCheckpoint<T extends object = Record<string, unknown>>(): Promise<T | null>;
    saveCheckpoint(checkpoint: Record<string, unknown>): Promise<void>;
    clearCheckpoint(): Promise<void>;
    /** Where the provider sends this integration's webhooks for this environment: to
     *  register them in a `post-connection-creation` event function. */
    getWebhookURL(): Promise<string>;
    /** The integration, in Nango's shape (no `logo`); `include: ['webhook']` adds
     *  `webhook_url`. `'credentials'` is refused: functions are not given the
     *  integration's OAuth client secret. */
    getIntegration(config?: { include?: ('webhook' | 'credentials')[] }): Promise<Integration>;
    /** Runs an action of this environment for a connection (as `POST /action/trigger`)
     *  and answers its output; its failure is thrown. Not in a dry run, nor from an action
     *  that another triggered (actions nest one level). */
    triggerAction<T = unknown>(providerConfigKey: string, connectionId: string, actionName: string, input?: unknown): Promise<T>;
    /** Asks for a run of a sync (one with an exec) for a connection, as `POST /sync/trigger`;
     *  `fullResync` resets it first. Not in a dry run. */
    triggerSync(providerConfigKey: string, connectionId: string, syncName: string, fullResync?: boolean): Promise<void>;
    /** Nango's: takes `key` (in this environment) for this run, for `ttlMs` at most; false
     *  when another run holds it. Its locks are released when the run ends. */
    tryAcquireLock(options: { key: string; ttlMs: number }): Promise<boolean>;
    /** Lets go of `key` if this run holds it; whether it did. */
    releaseLock(options: { key: string }): Promise<boolean>;
    releaseAllLocks(): Promise<void>;
  }

  /** A sync: `exec` on its `frequency`, `onWebhook` for its `webhookSubscriptions`. */
  export interface SyncConfig<Payload = any> {
    description?: string;
    version?: string;
    /** As in Nango: `every hour`, `every 5 minutes`, `30m`, … (at least 30 seconds). */
    frequency?: string;
    autoStart?: boolean;
    /** Model names, as an object keyed by name or an array. */
    models?: Record<string, unknown> | string[];
    /** Event types, or `'*'`. */
    webhookSubscriptions?: readonly string[];
    metadata?: unknown;
    /** Nango's older delete tracking: each run of a full sync deletes, at its end, the
     *  records it did not save (`trackDeletesStart/End` around the run, every model). */
    trackDeletes?: boolean;
    /** `incremental` turns `trackDeletes` off, as in Nango. */
    syncType?: 'full' | 'incremental';
    /** Nango's, accepted and not used here. */
    endpoints?: unknown[];
    scopes?: string[];
    exec?: (nango: NangoSync) => Promise<void>;
    onWebhook?: (nango: NangoWebhook, payload: Payload) => Promise<void>;
  }

  /** An event function: runs its `exec` when a connection is created or is about to be deleted. */
  export interface OnEventConfig {
    event: 'post-connection-creation' | 'pre-connection-deletion';
    description?: string;
    version?: string;
    exec: (nango: NangoSync) => Promise<void>;
  }

  /** Nango's name for what an action gets. */
  export type NangoAction = NangoSync;

  /** A Nango action, at `{integration}/actions/{name}.ts`: `POST /action/trigger` runs its
   *  `exec(nango, input)` for a connection and answers with what it returns. */
  export interface ActionConfig {
    description?: string;
    version?: string;
    /** A zod schema: input it refuses is answered 400 (`invalid_action_input`), unrun. */
    input?: unknown;
    /** A zod schema: output it refuses is logged (`worker.validate_records = "warn"`) or
     *  fails the run (`"fail"`). */
    output?: unknown;
    endpoint?: unknown;
    scopes?: string[];
    exec: (nango: NangoAction, input: any) => Promise<unknown>;
  }

  export function createSync<Payload = any>(config: SyncConfig<Payload>): SyncConfig<Payload> & { type: 'sync' };
  export function createOnEvent(config: OnEventConfig): OnEventConfig & { type: 'on-event' };
  export function createAction(config: ActionConfig): ActionConfig & { type: 'action' };

  const nango: { createSync: typeof createSync; createOnEvent: typeof createOnEvent; createAction: typeof createAction };
  export default nango;
}

declare module 'crypto' {
  const crypto: HookyardCrypto;
  export default crypto;
  export const createHash: HookyardCrypto['createHash'];
  export const createHmac: HookyardCrypto['createHmac'];
  export const hash: HookyardCrypto['hash'];
  export const getHashes: HookyardCrypto['getHashes'];
  export const randomBytes: HookyardCrypto['randomBytes'];
  export const randomUUID: HookyardCrypto['randomUUID'];
  export const getRandomValues: HookyardCrypto['getRandomValues'];
  export const timingSafeEqual: HookyardCrypto['timingSafeEqual'];
}
declare module 'node:crypto' {
  export * from 'crypto';
  export { default } from 'crypto';
}
declare module 'url' {
  const url: { URL: typeof URL; URLSearchParams: typeof URLSearchParams };
  export default url;
  const URLClass: typeof URL;
  const URLSearchParamsClass: typeof URLSearchParams;
  export { URLClass as URL, URLSearchParamsClass as URLSearchParams };
}
declare module 'node:url' {
  export * from 'url';
  export { default } from 'url';
}
declare module 'buffer' {
  const buffer: { Buffer: typeof Buffer; atob: typeof atob; btoa: typeof btoa };
  export default buffer;
  const BufferValue: typeof Buffer;
  type BufferValue = Buffer;
  const atobFunction: typeof atob;
  const btoaFunction: typeof btoa;
  export { BufferValue as Buffer, atobFunction as atob, btoaFunction as btoa };
}
declare module 'node:buffer' {
  export * from 'buffer';
  export { default } from 'buffer';
}
