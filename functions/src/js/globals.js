// Runs in a function context the first time its code reads one of these globals (the
// prelude's lazyGlobal): what Nango's runtime gives its functions beyond the language, as
// Node.js has it. Globals URL, URLSearchParams and Buffer (plus TextEncoder, TextDecoder,
// atob, btoa), and the modules `crypto`, `url` and `buffer` (also as `node:…`), which
// import what this leaves in `__hookyardNode`. The native half (URL parsing, codecs,
// digests, random bytes) is globals.rs; the behaviour is checked against Node.js itself
// (functions/tests/node_parity/cases.js).
(() => {
  'use strict';
  const natives = globalThis.__hookyardNatives;
  delete globalThis.__hookyardNatives;

  // Strings as WebIDL's USVString: lone surrogates become U+FFFD (natives take UTF-8).
  const usv = (value) => String(value).toWellFormed();
  const nodeError = (Type, code, message, extra) => {
    const error = new Type(message);
    Object.defineProperty(error, 'code', { value: code, writable: true, configurable: true });
    return Object.assign(error, extra);
  };
  const argType = (message) => nodeError(TypeError, 'ERR_INVALID_ARG_TYPE', message);
  const outOfRange = (name, range, received) =>
    nodeError(RangeError, 'ERR_OUT_OF_RANGE', `The value of "${name}" is out of range. It must be ${range}. Received ${received}`);
  const required = (count, args, names) => {
    if (args.length < count) {
      throw nodeError(TypeError, 'ERR_MISSING_ARGS', `The ${names} argument${count > 1 ? 's' : ''} must be specified`);
    }
  };
  const global = (name, value) => {
    // Set by the function before it first read one of these: its own, kept.
    if (Object.getOwnPropertyDescriptor(globalThis, name)?.get === undefined) return;
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: false });
  };

  // ---- URLSearchParams and URL (WHATWG URL, as in Node.js and browsers)

  let paramsLink; // (params, url) => void: tie a URL's searchParams to it
  let paramsList; // (params, list) => void: replace the pairs (the URL's query changed)
  let urlSearchSet; // (url, query) => void: the params changed the URL's query

  class URLSearchParams {
    #list = [];
    #url = null;
    static {
      paramsLink = (params, url) => { params.#url = url; };
      paramsList = (params, list) => { params.#list = list; };
    }

    constructor(init = '') {
      if (init !== null && (typeof init === 'object' || typeof init === 'function')) {
        if (typeof init[Symbol.iterator] === 'function') {
          for (const pair of init) {
            const entry = pair !== null && typeof pair === 'object' && typeof pair[Symbol.iterator] === 'function' ? [...pair] : [];
            if (entry.length !== 2) {
              throw nodeError(TypeError, 'ERR_INVALID_TUPLE', 'Each query pair must be an iterable [name, value] tuple');
            }
            this.#list.push([usv(entry[0]), usv(entry[1])]);
          }
        } else {
          for (const key of Object.keys(init)) this.#list.push([usv(key), usv(init[key])]);
        }
      } else {
        const query = usv(init);
        this.#list = natives.formParse(query.startsWith('?') ? query.slice(1) : query);
      }
    }

    #update() {
      if (this.#url !== null) urlSearchSet(this.#url, natives.formSerialize(this.#list));
    }

    get size() {
      return this.#list.length;
    }

    append(name, value) {
      required(2, arguments, '"name" and "value"');
      this.#list.push([usv(name), usv(value)]);
      this.#update();
    }

    delete(name, value) {
      required(1, arguments, '"name"');
      const n = usv(name);
      const v = value === undefined ? undefined : usv(value);
      this.#list = this.#list.filter(([k, x]) => k !== n || (v !== undefined && x !== v));
      this.#update();
    }

    get(name) {
      required(1, arguments, '"name"');
      const n = usv(name);
      const pair = this.#list.find(([k]) => k === n);
      return pair === undefined ? null : pair[1];
    }

    getAll(name) {
      required(1, arguments, '"name"');
      const n = usv(name);
      return this.#list.filter(([k]) => k === n).map(([, v]) => v);
    }

    has(name, value) {
      required(1, arguments, '"name"');
      const n = usv(name);
      const v = value === undefined ? undefined : usv(value);
      return this.#list.some(([k, x]) => k === n && (v === undefined || x === v));
    }

    set(name, value) {
      required(2, arguments, '"name" and "value"');
      const n = usv(name);
      const v = usv(value);
      const first = this.#list.findIndex(([k]) => k === n);
      if (first < 0) {
        this.#list.push([n, v]);
      } else {
        this.#list[first] = [n, v];
        this.#list = this.#list.filter(([k], i) => i <= first || k !== n);
      }
      this.#update();
    }

    sort() {
      // Array.prototype.sort is stable; < compares UTF-16 code units, as the standard says.
      this.#list.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      this.#update();
    }

    forEach(callback, thisArg = undefined) {
      if (typeof callback !== 'function') throw argType('The "callback" argument must be of type function');
      for (let i = 0; i < this.#list.length; i++) {
        const [name, value] = this.#list[i];
        callback.call(thisArg, value, name, this);
      }
    }

    *entries() {
      for (let i = 0; i < this.#list.length; i++) yield [...this.#list[i]];
    }

    *keys() {
      for (let i = 0; i < this.#list.length; i++) yield this.#list[i][0];
    }

    *values() {
      for (let i = 0; i < this.#list.length; i++) yield this.#list[i][1];
    }

    [Symbol.iterator]() {
      return this.entries();
    }

    toString() {
      return natives.formSerialize(this.#list);
    }

    get [Symbol.toStringTag]() {
      return 'URLSearchParams';
    }
  }

  // The parts natives.urlParse and natives.urlSet give, in this order.
  const PARTS = ['href', 'origin', 'protocol', 'username', 'password', 'host', 'hostname', 'port', 'pathname', 'search', 'hash'];
  const SEARCH = PARTS.indexOf('search');
  const invalidUrl = (input, base) =>
    nodeError(TypeError, 'ERR_INVALID_URL', 'Invalid URL', base === undefined ? { input: String(input) } : { input: String(input), base: String(base) });
  const parse = (input, base) => (base === undefined ? natives.urlParse(usv(input)) : natives.urlParse(usv(input), usv(base)));
  let urlParts;
  let urlSet;

  class URL {
    #parts;
    #params = null;
    static {
      urlParts = (url) => url.#parts;
      urlSet = (url, part, value) => {
        const parts = natives.urlSet(url.#parts[0], part, usv(value));
        if (parts === undefined) throw invalidUrl(value);
        const searchChanged = parts[SEARCH] !== url.#parts[SEARCH];
        url.#parts = parts;
        if (searchChanged && url.#params !== null) paramsList(url.#params, natives.formParse(parts[SEARCH].slice(1)));
      };
      urlSearchSet = (url, query) => {
        url.#parts = natives.urlSet(url.#parts[0], 'search', query);
      };
    }

    constructor(url, base = undefined) {
      required(1, arguments, '"url"');
      const parts = parse(url, base);
      if (parts === undefined) throw invalidUrl(url, base);
      this.#parts = parts;
    }

    static canParse(url, base = undefined) {
      required(1, arguments, '"url"');
      return parse(url, base) !== undefined;
    }

    static parse(url, base = undefined) {
      required(1, arguments, '"url"');
      return parse(url, base) === undefined ? null : new URL(url, base);
    }

    get searchParams() {
      if (this.#params === null) {
        this.#params = new URLSearchParams(this.#parts[SEARCH]);
        paramsLink(this.#params, this);
      }
      return this.#params;
    }

    toString() {
      return this.#parts[0];
    }

    toJSON() {
      return this.#parts[0];
    }

    get [Symbol.toStringTag]() {
      return 'URL';
    }
  }
  PARTS.forEach((part, i) => {
    const descriptor = {
      get() {
        return urlParts(this)[i];
      },
      enumerable: true,
      configurable: true,
    };
    if (part !== 'origin') {
      descriptor.set = function (value) {
        urlSet(this, part, value);
      };
    }
    Object.defineProperty(URL.prototype, part, descriptor);
  });

  // ---- Buffer (Node.js's, on Uint8Array) and the text codecs

  const ENCODINGS = {
    utf8: 'utf8', 'utf-8': 'utf8', hex: 'hex', base64: 'base64', base64url: 'base64url',
    latin1: 'latin1', binary: 'latin1', ascii: 'ascii',
    ucs2: 'utf16le', 'ucs-2': 'utf16le', utf16le: 'utf16le', 'utf-16le': 'utf16le',
  };
  const encodingOf = (encoding) => {
    if (encoding === undefined || encoding === null) return 'utf8';
    const found = Object.hasOwn(ENCODINGS, String(encoding).toLowerCase()) ? ENCODINGS[String(encoding).toLowerCase()] : undefined;
    if (found === undefined) throw nodeError(TypeError, 'ERR_UNKNOWN_ENCODING', `Unknown encoding: ${encoding}`);
    return found;
  };

  /** A string's bytes in an encoding (a name encodingOf gave). */
  const encode = (string, encoding) => {
    switch (encoding) {
      case 'utf8':
        return new Uint8Array(natives.utf8Encode(string.toWellFormed()));
      case 'hex':
        return new Uint8Array(natives.hexDecode(string.toWellFormed()));
      case 'base64':
      case 'base64url':
        return new Uint8Array(natives.base64Decode(string.toWellFormed()));
      case 'utf16le': {
        const out = new Uint8Array(string.length * 2);
        for (let i = 0; i < string.length; i++) {
          const unit = string.charCodeAt(i);
          out[2 * i] = unit & 0xff;
          out[2 * i + 1] = unit >> 8;
        }
        return out;
      }
      default: {
        // latin1 and ascii: the low byte of each UTF-16 unit.
        const out = new Uint8Array(string.length);
        for (let i = 0; i < string.length; i++) out[i] = string.charCodeAt(i) & 0xff;
        return out;
      }
    }
  };

  const fromUnits = (units) => {
    let text = '';
    for (let i = 0; i < units.length; i += 8192) text += String.fromCharCode(...units.subarray(i, i + 8192));
    return text;
  };

  /** Bytes (a Uint8Array) as text in an encoding (a name encodingOf gave). */
  const decode = (bytes, encoding) => {
    switch (encoding) {
      case 'utf8':
        return natives.utf8Decode(bytes, false);
      case 'hex':
        return natives.hexEncode(bytes);
      case 'base64':
        return natives.base64Encode(bytes, false);
      case 'base64url':
        return natives.base64Encode(bytes, true);
      case 'latin1':
        return fromUnits(bytes);
      case 'ascii':
        return fromUnits(bytes.map((b) => b & 0x7f));
      default: {
        const units = new Uint16Array(bytes.length >> 1);
        for (let i = 0; i < units.length; i++) units[i] = bytes[2 * i] | (bytes[2 * i + 1] << 8);
        return fromUnits(units);
      }
    }
  };

  const isView = (value) => ArrayBuffer.isView(value);
  const bytesOf = (view) => new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  // toString's range: Node.js does not count a negative start from the end.
  const clamp = (value, fallback, length) => (value === undefined ? fallback : Math.min(Math.max(Math.trunc(Number(value)) || 0, 0), length));
  const checkSize = (size) => {
    if (typeof size !== 'number') throw argType(`The "size" argument must be of type number. Received ${typeof size}`);
    if (!(size >= 0 && size <= 2 ** 32)) throw outOfRange('size', '>= 0 && <= 4294967296', size);
  };

  class Buffer extends Uint8Array {
    // `new Buffer(…)` is deprecated in Node.js and kept working; subarray, map and the
    // other inherited methods construct through here as they do for Uint8Array.
    constructor(value, encodingOrOffset, length) {
      if (typeof value === 'string') return Buffer.from(value, encodingOrOffset);
      super(value, encodingOrOffset, length);
    }

    static from(value, encodingOrOffset, length) {
      if (typeof value === 'string') return bufferOf(encode(value, encodingOf(encodingOrOffset)));
      if (value instanceof ArrayBuffer) return new Buffer(value, encodingOrOffset ?? 0, length);
      if (isView(value) && !(value instanceof DataView)) return new Buffer(value);
      if (value !== null && typeof value === 'object') {
        if (value.type === 'Buffer' && Array.isArray(value.data)) return new Buffer(value.data);
        const primitive = typeof value.valueOf === 'function' ? value.valueOf() : value;
        if (primitive !== value && primitive !== null && primitive !== undefined) return Buffer.from(primitive, encodingOrOffset, length);
        if (Array.isArray(value) || typeof value.length === 'number') return new Buffer(value);
      }
      throw argType(
        'The first argument must be of type string or an instance of Buffer, ArrayBuffer, or Array or an Array-like Object.' +
          ` Received ${value === null ? 'null' : typeof value}`,
      );
    }

    static alloc(size, fill, encoding) {
      checkSize(size);
      const buffer = new Buffer(size);
      return fill === undefined || fill === 0 ? buffer : buffer.fill(fill, 0, buffer.length, encoding);
    }

    // Zeroed all the same: a sandbox has no pool of old memory to hand out.
    static allocUnsafe(size) {
      return Buffer.alloc(size);
    }

    static allocUnsafeSlow(size) {
      return Buffer.alloc(size);
    }

    static byteLength(value, encoding) {
      if (typeof value === 'string') return encode(value, encodingOf(encoding)).length;
      if (isView(value) || value instanceof ArrayBuffer) return value.byteLength;
      throw argType('The "string" argument must be of type string or an instance of Buffer or ArrayBuffer.');
    }

    static isBuffer(value) {
      return value instanceof Buffer;
    }

    static isEncoding(encoding) {
      return typeof encoding === 'string' && Object.hasOwn(ENCODINGS, encoding.toLowerCase());
    }

    static concat(list, totalLength) {
      if (!Array.isArray(list)) throw argType('The "list" argument must be an instance of Array.');
      list.forEach((item, i) => {
        if (!(item instanceof Uint8Array)) throw argType(`The "list[${i}]" argument must be an instance of Buffer or Uint8Array.`);
      });
      const total = totalLength ?? list.reduce((sum, item) => sum + item.length, 0);
      const out = Buffer.alloc(total);
      let at = 0;
      for (const item of list) {
        if (at >= total) break;
        out.set(item.subarray(0, total - at), at);
        at += Math.min(item.length, total - at);
      }
      return out;
    }

    static compare(a, b) {
      return Buffer.prototype.compare.call(a, b);
    }

    toString(encoding, start, end) {
      const from = clamp(start, 0, this.length);
      const to = clamp(end, this.length, this.length);
      return to <= from ? '' : decode(Uint8Array.prototype.subarray.call(this, from, to), encodingOf(encoding));
    }

    toJSON() {
      return { type: 'Buffer', data: Array.from(this) };
    }

    equals(other) {
      if (!(other instanceof Uint8Array)) throw argType('The "otherBuffer" argument must be an instance of Buffer or Uint8Array.');
      return this.compare(other) === 0;
    }

    compare(target, targetStart = 0, targetEnd = target?.length, sourceStart = 0, sourceEnd = this.length) {
      if (!(target instanceof Uint8Array)) throw argType('The "target" argument must be an instance of Buffer or Uint8Array.');
      const a = this.subarray(sourceStart, sourceEnd);
      const b = target.subarray(targetStart, targetEnd);
      for (let i = 0; i < Math.min(a.length, b.length); i++) {
        if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
      }
      return Math.sign(a.length - b.length);
    }

    // As in Node.js, a view of the same memory (Uint8Array's slice copies).
    slice(start, end) {
      return this.subarray(start, end);
    }

    write(string, offset, length, encoding) {
      if (typeof offset === 'string') [offset, length, encoding] = [0, undefined, offset];
      else if (typeof length === 'string') [length, encoding] = [undefined, length];
      const at = offset === undefined ? 0 : Number(offset);
      if (!(at >= 0 && at <= this.length)) throw outOfRange('offset', `>= 0 && <= ${this.length}`, offset);
      const bytes = encode(String(string), encodingOf(encoding));
      let count = Math.min(bytes.length, this.length - at, length === undefined ? Infinity : Number(length));
      // A character that does not fit whole is not written at all.
      if (encodingOf(encoding) === 'utf8') while (count > 0 && count < bytes.length && (bytes[count] & 0xc0) === 0x80) count--;
      this.set(bytes.subarray(0, count), at);
      return count;
    }

    copy(target, targetStart = 0, sourceStart = 0, sourceEnd = this.length) {
      if (!(target instanceof Uint8Array)) throw argType('The "target" argument must be an instance of Buffer or Uint8Array.');
      const count = Math.max(0, Math.min(sourceEnd - sourceStart, target.length - targetStart, this.length - sourceStart));
      target.set(Uint8Array.prototype.subarray.call(this, sourceStart, sourceStart + count), targetStart);
      return count;
    }

    fill(value, offset = 0, end = this.length, encoding = undefined) {
      if (typeof offset === 'string') [offset, end, encoding] = [0, this.length, offset];
      else if (typeof end === 'string') [end, encoding] = [this.length, end];
      if (typeof value === 'number' || typeof value === 'boolean') return Uint8Array.prototype.fill.call(this, Number(value) & 0xff, offset, end);
      const pattern = typeof value === 'string' ? encode(value, encodingOf(encoding)) : isView(value) ? bytesOf(value) : null;
      if (pattern === null) throw argType('The "value" argument must be of type string, number, Buffer or Uint8Array.');
      if (pattern.length === 0) {
        if (typeof value === 'string' && value !== '') {
          throw nodeError(TypeError, 'ERR_INVALID_ARG_VALUE', `The argument 'value' is invalid. Received '${value}'`);
        }
        return Uint8Array.prototype.fill.call(this, 0, offset, end);
      }
      for (let i = offset; i < end; i++) this[i] = pattern[(i - offset) % pattern.length];
      return this;
    }

    indexOf(value, byteOffset, encoding) {
      return search(this, value, byteOffset, encoding, false);
    }

    lastIndexOf(value, byteOffset, encoding) {
      return search(this, value, byteOffset, encoding, true);
    }

    includes(value, byteOffset, encoding) {
      return this.indexOf(value, byteOffset, encoding) !== -1;
    }
  }
  const bufferOf = (bytes) => new Buffer(bytes.buffer, bytes.byteOffset, bytes.length);

  /** indexOf / lastIndexOf for a byte, a string or bytes, as Node.js's Buffer has them. */
  const search = (buffer, value, byteOffset, encoding, backwards) => {
    if (typeof byteOffset === 'string') [byteOffset, encoding] = [undefined, byteOffset];
    const needle =
      typeof value === 'number' ? Uint8Array.of(value & 0xff)
        : typeof value === 'string' ? encode(value, encodingOf(encoding))
          : isView(value) ? bytesOf(value) : null;
    if (needle === null) throw argType('The "value" argument must be one of type number or string or an instance of Buffer or Uint8Array.');
    const last = buffer.length - needle.length;
    let from = byteOffset === undefined ? (backwards ? last : 0) : Math.trunc(Number(byteOffset)) || 0;
    if (from < 0) from += buffer.length;
    const matches = (at) => needle.every((b, j) => buffer[at + j] === b);
    if (backwards) {
      for (let at = Math.min(from, last); at >= 0; at--) if (matches(at)) return at;
    } else {
      for (let at = Math.max(from, 0); at <= last; at++) if (matches(at)) return at;
    }
    return -1;
  };

  // readUInt16LE, writeInt32BE, readDoubleLE, … (and Node.js's lower-case `Uint` aliases).
  const NUMBERS = [
    ['UInt8', 'Uint8', 1, 0, 2 ** 8 - 1], ['Int8', 'Int8', 1, -(2 ** 7), 2 ** 7 - 1],
    ['UInt16', 'Uint16', 2, 0, 2 ** 16 - 1], ['Int16', 'Int16', 2, -(2 ** 15), 2 ** 15 - 1],
    ['UInt32', 'Uint32', 4, 0, 2 ** 32 - 1], ['Int32', 'Int32', 4, -(2 ** 31), 2 ** 31 - 1],
    ['Float', 'Float32', 4], ['Double', 'Float64', 8], ['BigUInt64', 'BigUint64', 8], ['BigInt64', 'BigInt64', 8],
  ];
  const checkOffset = (buffer, offset, size) => {
    if (typeof offset !== 'number') throw argType(`The "offset" argument must be of type number. Received ${typeof offset}`);
    if (buffer.length < size) throw nodeError(RangeError, 'ERR_BUFFER_OUT_OF_BOUNDS', 'Attempt to access memory outside buffer bounds');
    if (!(Number.isInteger(offset) && offset >= 0 && offset <= buffer.length - size)) {
      throw outOfRange('offset', `>= 0 and <= ${buffer.length - size}`, offset);
    }
  };
  const viewOf = (buffer) => new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  for (const [name, view, size, min, max] of NUMBERS) {
    for (const [suffix, little] of size === 1 ? [['', false]] : [['LE', true], ['BE', false]]) {
      const read = function (offset = 0) {
        checkOffset(this, offset, size);
        return viewOf(this)[`get${view}`](offset, little);
      };
      const write = function (value, offset = 0) {
        checkOffset(this, offset, size);
        if (min !== undefined && !(value >= min && value <= max)) throw outOfRange('value', `>= ${min} and <= ${max}`, value);
        viewOf(this)[`set${view}`](offset, value, little);
        return offset + size;
      };
      for (const alias of new Set([name, name.replace('UInt', 'Uint')])) {
        Buffer.prototype[`read${alias}${suffix}`] = read;
        Buffer.prototype[`write${alias}${suffix}`] = write;
      }
    }
  }

  const utf8 = (label) => {
    const name = String(label).trim().toLowerCase();
    if (!['utf-8', 'utf8', 'unicode-1-1-utf-8'].includes(name)) {
      throw nodeError(RangeError, 'ERR_ENCODING_NOT_SUPPORTED', `The "${label}" encoding is not supported`);
    }
  };

  class TextEncoder {
    get encoding() {
      return 'utf-8';
    }

    encode(input = '') {
      return new Uint8Array(natives.utf8Encode(usv(input)));
    }

    encodeInto(source, destination) {
      let read = 0;
      let written = 0;
      for (const char of usv(source)) {
        const bytes = natives.utf8Encode(char);
        if (written + bytes.byteLength > destination.length) break;
        destination.set(new Uint8Array(bytes), written);
        read += char.length;
        written += bytes.byteLength;
      }
      return { read, written };
    }
  }

  /** Where the bytes stop being whole UTF-8 characters: the rest waits for more. */
  const wholeUtf8 = (bytes) => {
    for (let i = bytes.length - 1; i >= Math.max(0, bytes.length - 3); i--) {
      if ((bytes[i] & 0xc0) === 0x80) continue;
      const needs = bytes[i] >= 0xf0 ? 4 : bytes[i] >= 0xe0 ? 3 : bytes[i] >= 0xc0 ? 2 : 1;
      return bytes.length - i < needs ? i : bytes.length;
    }
    return bytes.length;
  };

  class TextDecoder {
    #fatal;
    #ignoreBOM;
    #pending = new Uint8Array(0);
    #started = false;

    constructor(label = 'utf-8', options = undefined) {
      utf8(label);
      this.#fatal = Boolean(options?.fatal);
      this.#ignoreBOM = Boolean(options?.ignoreBOM);
    }

    get encoding() {
      return 'utf-8';
    }

    get fatal() {
      return this.#fatal;
    }

    get ignoreBOM() {
      return this.#ignoreBOM;
    }

    decode(input = undefined, options = undefined) {
      let bytes = new Uint8Array(0);
      if (input instanceof ArrayBuffer) bytes = new Uint8Array(input);
      else if (isView(input)) bytes = bytesOf(input);
      else if (input !== undefined) throw argType('The "input" argument must be an instance of ArrayBuffer or ArrayBufferView.');
      if (this.#pending.length > 0) bytes = Buffer.concat([this.#pending, bytes]);
      const stream = Boolean(options?.stream);
      const whole = stream ? wholeUtf8(bytes) : bytes.length;
      this.#pending = bytes.slice(whole);
      let text = natives.utf8Decode(bytes.subarray(0, whole), this.#fatal);
      if (text === undefined) {
        this.#pending = new Uint8Array(0);
        this.#started = false;
        throw nodeError(TypeError, 'ERR_ENCODING_INVALID_ENCODED_DATA', 'The encoded data was not valid for encoding utf-8');
      }
      if (!this.#started && !this.#ignoreBOM && text.startsWith('\uFEFF')) text = text.slice(1);
      this.#started = stream && (this.#started || text.length > 0);
      return text;
    }
  }

  const invalidCharacter = (message) => new DOMException(message, 'InvalidCharacterError');

  function btoa(data) {
    required(1, arguments, '"data"');
    const text = String(data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) {
      const unit = text.charCodeAt(i);
      if (unit > 0xff) throw invalidCharacter('Invalid character');
      bytes[i] = unit;
    }
    return natives.base64Encode(bytes, false);
  }

  function atob(data) {
    required(1, arguments, '"data"');
    let text = String(data).replace(/[\t\n\f\r ]/g, '');
    if (text.length % 4 === 0) text = text.replace(/==?$/, '');
    if (text.length % 4 === 1 || /[^A-Za-z0-9+/]/.test(text)) {
      throw invalidCharacter('The string to be decoded is not correctly encoded.');
    }
    return fromUnits(new Uint8Array(natives.base64Decode(text)));
  }

  // ---- crypto (the parts of Node.js's module that run without a key store)

  const bytesFrom = (data, encoding, name) => {
    if (typeof data === 'string') return encode(data, encodingOf(encoding));
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (isView(data)) return bytesOf(data);
    throw argType(`The "${name}" argument must be of type string or an instance of Buffer, TypedArray, or DataView.`);
  };
  const output = (bytes, encoding) => {
    const buffer = new Buffer(bytes);
    return encoding === undefined || encoding === 'buffer' ? buffer : buffer.toString(encoding);
  };
  const EMPTY = new Uint8Array(0);

  /** A Hash (key null) or an Hmac: takes updates, digests once. */
  class Digest {
    #algorithm;
    #key;
    #chunks = [];
    #done = false;

    constructor(algorithm, key) {
      this.#algorithm = String(algorithm);
      this.#key = key;
    }

    #check() {
      if (this.#done) throw nodeError(Error, 'ERR_CRYPTO_HASH_FINALIZED', 'Digest already called');
    }

    update(data, inputEncoding) {
      this.#check();
      // A copy: the caller's buffer may change before the digest.
      this.#chunks.push(bytesFrom(data, inputEncoding, 'data').slice());
      return this;
    }

    digest(outputEncoding) {
      this.#check();
      this.#done = true;
      const data = Buffer.concat(this.#chunks);
      this.#chunks = [];
      const out = this.#key === null ? natives.digest(this.#algorithm, data) : natives.digest(this.#algorithm, data, this.#key);
      return output(out, outputEncoding);
    }

    copy() {
      this.#check();
      if (this.#key !== null) throw new TypeError('hmac.copy is not a function');
      const copy = new Digest(this.#algorithm, null);
      copy.#chunks = [...this.#chunks];
      return copy;
    }
  }

  const HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512'];
  const crypto = {
    createHash(algorithm) {
      if (natives.digest(String(algorithm), EMPTY) === undefined) throw new Error('Digest method not supported');
      return new Digest(algorithm, null);
    },
    createHmac(algorithm, key) {
      if (natives.digest(String(algorithm), EMPTY) === undefined) {
        throw nodeError(TypeError, 'ERR_CRYPTO_INVALID_DIGEST', `Invalid digest: ${algorithm}`);
      }
      return new Digest(algorithm, bytesFrom(key, undefined, 'key').slice());
    },
    hash(algorithm, data, outputEncoding = 'hex') {
      return crypto.createHash(algorithm).update(data).digest(outputEncoding);
    },
    getHashes() {
      return [...HASHES];
    },
    randomBytes(size, callback) {
      checkSize(size);
      const buffer = Buffer.alloc(size);
      natives.randomFill(buffer);
      if (typeof callback !== 'function') return buffer;
      setTimeout(() => callback(null, buffer), 0);
      return undefined;
    },
    randomUUID() {
      const bytes = crypto.randomBytes(16);
      bytes[6] = (bytes[6] & 0x0f) | 0x40;
      bytes[8] = (bytes[8] & 0x3f) | 0x80;
      const hex = bytes.toString('hex');
      return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
    },
    getRandomValues(array) {
      if (!isView(array) || array instanceof DataView || array instanceof Float32Array || array instanceof Float64Array) {
        throw new DOMException('The data argument must be an integer-type TypedArray', 'TypeMismatchError');
      }
      if (array.byteLength > 65536) {
        const message = `The ArrayBufferView's byte length (${array.byteLength}) exceeds the number of bytes of entropy available via this API (65536)`;
        throw new DOMException(message, 'QuotaExceededError');
      }
      natives.randomFill(bytesOf(array));
      return array;
    },
    timingSafeEqual(a, b) {
      if (!isView(a) && !(a instanceof ArrayBuffer)) throw argType('The "buf1" argument must be an instance of ArrayBuffer, Buffer, TypedArray, or DataView.');
      if (!isView(b) && !(b instanceof ArrayBuffer)) throw argType('The "buf2" argument must be an instance of ArrayBuffer, Buffer, TypedArray, or DataView.');
      const x = bytesFrom(a);
      const y = bytesFrom(b);
      if (x.length !== y.length) {
        throw nodeError(RangeError, 'ERR_CRYPTO_TIMING_SAFE_EQUAL_LENGTH', 'Input buffers must have the same byte length');
      }
      let difference = 0;
      for (let i = 0; i < x.length; i++) difference |= x[i] ^ y[i];
      return difference === 0;
    },
  };

  global('URL', URL);
  global('URLSearchParams', URLSearchParams);
  global('Buffer', Buffer);
  global('TextEncoder', TextEncoder);
  global('TextDecoder', TextDecoder);
  global('atob', atob);
  global('btoa', btoa);
  // What the built-in modules `crypto`, `url` and `buffer` export (js/node/*.js).
  Object.defineProperty(globalThis, '__hookyardNode', {
    configurable: false,
    value: Object.freeze({
      crypto: Object.freeze(crypto),
      url: Object.freeze({ URL, URLSearchParams }),
      buffer: Object.freeze({ Buffer, atob, btoa }),
    }),
  });
})();
