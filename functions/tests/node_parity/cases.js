// Cases run by Node.js and by hookyard's sandbox (functions/tests/node_parity.rs), which
// must answer alike: URL, URLSearchParams, Buffer, the text codecs, atob/btoa and the
// `crypto`, `url` and `buffer` modules as Nango's functions use them. Only what both run
// deterministically; each case is a value or the error's name and code.
import crypto, { createHash, createHmac, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import url, { URL as ImportedURL } from 'url';
import { Buffer } from 'buffer';

const attempt = (f) => {
  try {
    return { ok: f() };
  } catch (e) {
    return { error: [e.name, e.code ?? null] };
  }
};
const PARTS = ['href', 'origin', 'protocol', 'username', 'password', 'host', 'hostname', 'port', 'pathname', 'search', 'hash'];
const partsOf = (u) => Object.fromEntries(PARTS.map((p) => [p, u[p]]));
const hex = (bytes) => Buffer.from(bytes).toString('hex');
const SAMPLE = 'héllo wörld ✓ 😀';
const ENCODINGS = ['utf8', 'hex', 'base64', 'base64url', 'latin1', 'binary', 'ascii', 'ucs2', 'utf16le'];

const urls = () => ({
  parsed: [
    'https://user:pa%20ss@EXAMPLE.com:443/a/../b/./c?x=1&y=%zz#frag',
    'HTTP://example.com:80/',
    'https://例え.jp/パス?q=値',
    'http://[::1]:8080/x',
    'http://0x7f.1/',
    'file:///C:/x/../y',
    'mailto:someone@example.com',
    'https://example.com/a b?c d#e f',
    'https://example.com/%7euser?q=\uD800',
    'https://exa mple.com',
    'http://a:b@/x',
    '//x',
    'https://example.com:99999',
    '  https://trim.example/\t',
  ].map((input) => attempt(() => partsOf(new URL(input)))),
  relative: [
    ['../c?d', 'https://a.com/x/y/z'],
    ['//other.org/p', 'https://a.com'],
    ['?q', 'https://a.com/p?old#h'],
    ['#h2', 'https://a.com/p?q'],
    ['', 'https://a.com/p?q#h'],
    ['/x', 'mailto:a@b'],
    ['x', 'not a url'],
  ].map(([input, base]) => attempt(() => new URL(input, base).href)),
  setters: [
    ['protocol', 'http'], ['protocol', 'mailto'], ['host', 'other.org:8080'], ['hostname', 'h.io'],
    ['port', '8443'], ['port', 'abc'], ['port', '443'], ['pathname', '/a b'], ['search', 'x=1 2'],
    ['search', ''], ['hash', 'top'], ['hash', ''], ['username', 'u'], ['password', 'p w'],
    ['href', 'https://new.example/'], ['href', 'bad'],
  ].map(([part, value]) =>
    attempt(() => {
      const u = new URL('https://example.com/p?q=1#h');
      u[part] = value;
      return u.href;
    }),
  ),
  searchParams: (() => {
    const u = new URL('https://a.com/?b=2&a=1&a=3');
    const sp = u.searchParams;
    const seen = [];
    sp.append('c', 'x y');
    sp.sort();
    seen.push(u.href);
    sp.delete('a');
    seen.push(u.href);
    u.search = '?z=9&z=8';
    seen.push(sp.get('z'), sp.getAll('z'), [...sp], sp === u.searchParams);
    sp.delete('z');
    seen.push(u.href, u.search);
    u.href = 'https://b.com/?n=1';
    seen.push(sp.get('n'));
    return seen;
  })(),
  params: (() => {
    const p = new URLSearchParams('?a=1&a=2&b=%20x+y&c&=d&e=%zz&f=%C3%A9&g=%FF');
    const q = new URLSearchParams({ x: '1', y: 'é ✓', z: "*-._~!'()+ \uD800" });
    const r = new URLSearchParams([['a', 'b'], ['c', 'd'], ['a', 'e']]);
    const seen = [p.toString(), [...p.entries()], q.toString(), r.toString(), new URLSearchParams(r).toString()];
    seen.push(p.get('zz'), p.has('a', '2'), p.has('a', '3'), p.size);
    r.set('a', 'z');
    seen.push(r.toString());
    r.delete('c', 'nope');
    r.delete('c', 'd');
    seen.push(r.toString(), [...r.keys()], [...r.values()]);
    const each = [];
    p.forEach((value, name) => each.push(`${name}=${value}`));
    seen.push(each);
    seen.push(attempt(() => new URLSearchParams([['only one']])));
    seen.push(attempt(() => p.append('x')));
    return seen;
  })(),
  misc: [
    URL.canParse('https://a.com'),
    URL.canParse('a', 'https://b.com/'),
    URL.canParse('nope'),
    JSON.stringify({ u: new URL('https://a.com/x') }),
    String(new URL('https://a.com/y')),
    Object.prototype.toString.call(new URL('https://a.com')),
    Object.prototype.toString.call(new URLSearchParams()),
    JSON.stringify(new URLSearchParams('a=1')),
    (() => {
      try {
        new URL('nope', undefined);
      } catch (e) {
        return [e.name, e.code, e.message, e.input];
      }
    })(),
  ],
});

const buffers = () => {
  const sample = Buffer.from(SAMPLE);
  const shared = new Uint8Array([1, 2, 3, 4]);
  const view = Buffer.from(shared.buffer, 1, 2);
  shared[1] = 9;
  const sliced = Buffer.from('abc');
  sliced.slice(1)[0] = 0x7a;
  const written = Buffer.alloc(6);
  const numbers = Buffer.alloc(16);
  numbers.writeUInt32BE(0xdeadbeef, 0);
  numbers.writeInt16LE(-2, 4);
  numbers.writeUint16BE(513, 6);
  numbers.writeDoubleLE(1.5, 8);
  const abc = Buffer.from('abcabc');
  return {
    to: ENCODINGS.map((e) => sample.toString(e)),
    from: ENCODINGS.map((e) => hex(Buffer.from(SAMPLE, e))),
    base64: ['YQ==YQ==', 'Y Q\n=\t=', 'YW*Jj', '-_-_', 'YWJjZ', 'YWJjZA', 'Y=Q', '=YQ', 'éYQ'].map((s) => hex(Buffer.from(s, 'base64'))),
    hexes: ['abzz12', 'abc', 'zzab', 'ABcd', ' ab'].map((s) => hex(Buffer.from(s, 'hex'))),
    badUtf8: Buffer.from([0xff, 0x61, 0xe2, 0x82, 0x62, 0xf0, 0x9f, 0x98, 0xc0, 0x80, 0xed, 0xa0, 0x80, 0xf4, 0x90, 0x80, 0x80, 0x63]).toString(),
    loneSurrogate: hex(Buffer.from('\uD800x\uDC00')),
    arrays: [
      Buffer.from([256, -1, 1.5, 'a', '7']).toJSON(),
      Buffer.from(Uint16Array.of(258, 3)).toJSON(),
      hex(view),
      Buffer.from({ type: 'Buffer', data: [1, 2] }).toJSON(),
      Buffer.from(new String('abc')).toString(),
      hex(new Buffer('hi')),
    ],
    fromErrors: [null, undefined, 5, {}, Symbol.iterator].map((v) => attempt(() => Buffer.from(v))),
    alloc: [
      [5, 'ab'], [4, 0x101], [6, 'aGk=', 'base64'], [3, ''], [3, 'zz', 'hex'], [-1], ['5'], [2, true],
    ].map((args) => attempt(() => hex(Buffer.alloc(...args)))),
    byteLength: [['héllo', 'utf8'], ['aGk=', 'base64'], ['abcd', 'hex'], ['aé', 'ucs2'], [new Uint16Array(3)], [new ArrayBuffer(5)]].map(
      (args) => Buffer.byteLength(...args),
    ),
    concat: [
      hex(Buffer.concat([Buffer.from('ab'), new Uint8Array([0x63])])),
      hex(Buffer.concat([Buffer.from('ab'), Buffer.from('cd')], 3)),
      hex(Buffer.concat([Buffer.from('ab')], 4)),
      attempt(() => Buffer.concat(['x'])),
      attempt(() => Buffer.concat('x')),
    ],
    compare: [
      Buffer.compare(Buffer.from('a'), Buffer.from('b')),
      Buffer.compare(Buffer.from('b'), Buffer.from('a')),
      Buffer.compare(Buffer.from('ab'), Buffer.from('a')),
      Buffer.from('x').equals(Buffer.from('x')),
      Buffer.from('x').equals(new Uint8Array([1])),
      [Buffer.from('c'), Buffer.from('a'), Buffer.from('b')].sort(Buffer.compare).map(String),
      Buffer.from('abcd').compare(Buffer.from('xbcx'), 1, 3, 1, 3),
    ],
    views: [
      sliced.toString(),
      Buffer.isBuffer(sliced.subarray(1)),
      Buffer.isBuffer(sliced.map((x) => x)),
      Buffer.isBuffer(new Uint8Array(1)),
      Buffer.isEncoding('UTF-8'),
      Buffer.isEncoding('nope'),
      JSON.stringify(Buffer.from('hi')),
      String(Buffer.from('hi')),
    ],
    write: [
      written.write('héllo', 1),
      hex(written),
      written.write('✓✓', 0, 4),
      hex(written),
      written.write('6869', 4, 'hex'),
      hex(written),
      written.write('zz', 'latin1'),
      hex(written),
      attempt(() => written.write('a', 7)),
    ],
    copy: (() => {
      const target = Buffer.alloc(4);
      return [Buffer.from('abcdef').copy(target, 1, 2), hex(target), Buffer.from('ab').copy(target), hex(target)];
    })(),
    fill: [
      hex(Buffer.alloc(5).fill('ab', 1)),
      hex(Buffer.alloc(5).fill(0x41, 1, 3)),
      hex(Buffer.alloc(4).fill('6162', 'hex')),
      hex(Buffer.alloc(3).fill(Buffer.from('xy'))),
    ],
    search: [
      abc.indexOf('c'), abc.indexOf('c', 3), abc.indexOf(98), abc.indexOf(98 + 256), abc.indexOf(Buffer.from('ca')),
      abc.lastIndexOf('b'), abc.lastIndexOf('b', 3), abc.indexOf('b', -2), abc.includes('x'), abc.indexOf('6263', 0, 'hex'),
      abc.indexOf(''), abc.lastIndexOf(99),
    ],
    numbers: [
      hex(numbers),
      numbers.readUInt32LE(0), numbers.readUint32BE(0), numbers.readInt16LE(4), numbers.readUInt16BE(6),
      numbers.readDoubleLE(8), numbers.readUInt8(0), numbers.readInt8(0), numbers.readBigUInt64BE(8).toString(),
      numbers.readFloatBE(0),
      attempt(() => numbers.readUInt32LE(14)),
      attempt(() => numbers.writeUInt8(300)),
      attempt(() => numbers.readUInt8(1.5)),
      attempt(() => Buffer.alloc(1).readUInt16LE()),
      numbers.writeInt32BE(-1, 12),
      hex(numbers.subarray(12)),
    ],
    ranges: [
      Buffer.from('hello').toString('utf8', 1, 3),
      Buffer.from('hello').toString('hex', -2),
      Buffer.from('hello').toString('utf8', 3, 1),
      Buffer.from('hello').toString(undefined, 2, 99),
    ],
    errors: [
      attempt(() => Buffer.from('x', 'nope')),
      attempt(() => Buffer.alloc(1).toString('nope')),
    ],
  };
};

const text = () => {
  const stream = new TextDecoder();
  const smile = new TextEncoder().encode('😀');
  const target = new Uint8Array(4);
  return [
    hex(new TextEncoder().encode('é😀\uD800')),
    new TextEncoder().encodeInto('aé😀', target),
    hex(target),
    new TextEncoder().encoding,
    new TextDecoder().decode(Uint8Array.of(0xef, 0xbb, 0xbf, 0x68, 0x69)),
    new TextDecoder('utf-8', { ignoreBOM: true }).decode(Uint8Array.of(0xef, 0xbb, 0xbf, 0x68)).length,
    attempt(() => new TextDecoder('utf-8', { fatal: true }).decode(Uint8Array.of(0xff))),
    new TextDecoder().decode(Uint8Array.of(0xff, 0x61)),
    stream.decode(smile.subarray(0, 1), { stream: true }),
    stream.decode(smile.subarray(1, 3), { stream: true }),
    stream.decode(smile.subarray(3)),
    new TextDecoder().decode(new Uint8Array([0xf0, 0x9f]), { stream: false }),
    new TextDecoder().decode(Uint8Array.of(0x68, 0x69).buffer),
    new TextDecoder().decode(new DataView(Uint8Array.of(0x6f, 0x6b).buffer)),
    new TextDecoder().decode(),
    new TextDecoder('UTF8').encoding,
    attempt(() => new TextDecoder('klingon')),
    btoa('hi\xff'),
    attempt(() => btoa('✓')),
    atob(' aGk= '),
    atob('aGk'),
    attempt(() => atob('a')),
    attempt(() => atob('a===')),
    attempt(() => atob('a*bc')),
  ];
};

const ALGORITHMS = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512'];
const digests = () => {
  const partial = createHash('sha256').update('a');
  const forked = partial.copy().update('b');
  const done = createHash('md5');
  done.digest();
  const longKey = Buffer.alloc(200, 7);
  return {
    hashes: ALGORITHMS.map((a) => createHash(a).update(SAMPLE).digest('hex')),
    encodings: ['base64', 'base64url', 'latin1'].map((e) => createHash('sha1').update('x').digest(e)),
    buffer: hex(createHash('sha256').update('x').digest()),
    chained: createHash('sha256').update('6869', 'hex').update(Buffer.from('!')).update(new Uint8Array([1])).digest('hex'),
    copied: [partial.digest('hex'), forked.digest('hex')],
    upper: createHash('SHA256').update('').digest('hex'),
    afterDigest: [attempt(() => done.update('x')), attempt(() => done.digest())],
    unknown: attempt(() => createHash('nope')),
    hmacs: ALGORITHMS.map((a) => createHmac(a, 'key').update('data').digest('hex')),
    hmacKeys: [
      createHmac('sha256', Buffer.from('6b6579', 'hex')).update('data').digest('base64'),
      createHmac('sha256', longKey).update('data').digest('hex'),
      createHmac('sha512', '').update('').digest('hex'),
    ],
    hmacUnknown: attempt(() => createHmac('nope', 'k')),
    timingSafe: [
      timingSafeEqual(Buffer.from('abc'), Buffer.from('abc')),
      timingSafeEqual(Buffer.from('abc'), Buffer.from('abd')),
      attempt(() => timingSafeEqual(Buffer.from('a'), Buffer.from('ab'))),
    ],
    hashes_listed: crypto.getHashes().includes('sha256'),
    random: [
      randomBytes(8).length,
      Buffer.isBuffer(randomBytes(2)),
      randomBytes(16).equals(randomBytes(16)),
      /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(randomUUID()),
      randomUUID() === randomUUID(),
      crypto.getRandomValues(new Uint32Array(4)).length,
      attempt(() => crypto.getRandomValues(new Uint8Array(65537))),
      attempt(() => crypto.getRandomValues(new Float64Array(1))),
      attempt(() => randomBytes(-1)),
    ],
  };
};

export function cases() {
  return {
    globals: ['URL', 'URLSearchParams', 'Buffer', 'TextEncoder', 'TextDecoder', 'atob', 'btoa'].map((n) => typeof globalThis[n]),
    modules: [ImportedURL === globalThis.URL, url.URLSearchParams === globalThis.URLSearchParams, Buffer === globalThis.Buffer, crypto.createHash === createHash],
    urls: urls(),
    buffers: buffers(),
    text: text(),
    digests: digests(),
  };
}
