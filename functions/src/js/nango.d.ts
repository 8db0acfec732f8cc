// Types of `nango`, the module hookyard's webhook functions import: what the sandbox
// gives a function (functions/src/js/nango.js and prelude.js), no more. For `tsc --noEmit`
// and editors: `hookyard types > nango.d.ts` in a functions project. hookyard itself
// erases types when it deploys and does not check them.

// The globals the sandbox adds to the language's own (it has no DOM and no Node.js).
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

  /** What `onWebhook` gets: record writes (committed when it succeeds), metadata, logs. */
  export interface NangoWebhook {
    readonly connectionId: string;
    readonly providerConfigKey: string;
    batchSave<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    batchUpdate<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    batchDelete<T extends RecordWithId>(records: T[], model: string): Promise<boolean>;
    getMetadata<T extends object = Record<string, unknown>>(): Promise<T>;
    setMetadata(metadata: Record<string, unknown>): Promise<void>;
    updateMetadata(metadata: Record<string, unknown>): Promise<void>;
    getConnection(): Promise<Connection>;
    log(message: unknown, payload?: unknown, options?: { level?: LogLevel }): Promise<void>;
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

  /** What `exec` (and an event function) gets: writes applied as they are made, the provider's API. */
  export interface NangoSync extends NangoWebhook {
    proxy<T = any>(config: ProxyConfiguration): Promise<ProxyResponse<T>>;
    get<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    post<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    put<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    patch<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    delete<T = any>(config: Omit<ProxyConfiguration, 'method'>): Promise<ProxyResponse<T>>;
    /** Each page's items. */
    paginate<T = any>(config: ProxyConfiguration): AsyncGenerator<T[], void, undefined>;
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

  export function createSync<Payload = any>(config: SyncConfig<Payload>): SyncConfig<Payload> & { type: 'sync' };
  export function createOnEvent(config: OnEventConfig): OnEventConfig & { type: 'on-event' };

  const nango: { createSync: typeof createSync; createOnEvent: typeof createOnEvent };
  export default nango;
}
