//! What function code gets beyond the language, as Nango's runtime (Node.js) has it:
//! URL, URLSearchParams, Buffer, TextEncoder, TextDecoder, atob, btoa and the modules
//! `crypto`, `url` and `buffer` (`js/globals.js`), set up in a sandbox on first use.
//!
//! The native half is here: URL parsing by the `url` crate (WHATWG's algorithm, as in
//! Node.js and browsers), the byte codecs, digests and HMACs, and random bytes. Pure
//! functions over their arguments: nothing here reaches outside the sandbox. Bytes come
//! back as `ArrayBuffer`s copied into the runtime's own (metered) memory.

use hmac::digest::core_api::BlockSizeUser;
use hmac::digest::InvalidLength;
use hmac::{Mac, SimpleHmac};
use rquickjs::function::Opt;
use rquickjs::{ArrayBuffer, CatchResultExt, Ctx, Function, Object, TypedArray};
use sha2::Digest;
use url::{quirks, Url};

const GLOBALS: &str = include_str!("js/globals.js");

/// Sets `__hookyardLoadGlobals` for the prelude, which takes it and calls it the first time
/// function code reads one of the globals. Most functions never do, and a sandbox without
/// them is made in a third of the time and 170 KB smaller.
pub(crate) fn install_loader(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let load = Function::new(ctx.clone(), |ctx: Ctx<'_>| -> rquickjs::Result<()> {
        install_natives(&ctx)?;
        ctx.eval::<(), _>(GLOBALS).catch(&ctx).map_err(|e| {
            rquickjs::Error::new_from_js_message("script", "globals", format!("setting up the globals: {e}"))
        })
    })?;
    ctx.globals().set("__hookyardLoadGlobals", load)
}

/// Sets `__hookyardNatives` on the global object, for `js/globals.js` to take and remove.
fn install_natives(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let natives = Object::new(ctx.clone())?;
    natives.set("urlParse", Function::new(ctx.clone(), url_parse)?)?;
    natives.set("urlSet", Function::new(ctx.clone(), url_set)?)?;
    natives.set("formParse", Function::new(ctx.clone(), form_parse)?)?;
    natives.set("formSerialize", Function::new(ctx.clone(), form_serialize)?)?;
    natives.set("utf8Encode", Function::new(ctx.clone(), utf8_encode)?)?;
    natives.set("utf8Decode", Function::new(ctx.clone(), utf8_decode)?)?;
    natives.set("base64Encode", Function::new(ctx.clone(), base64_encode)?)?;
    natives.set("base64Decode", Function::new(ctx.clone(), base64_decode)?)?;
    natives.set("hexEncode", Function::new(ctx.clone(), hex_encode)?)?;
    natives.set("hexDecode", Function::new(ctx.clone(), hex_decode)?)?;
    natives.set("digest", Function::new(ctx.clone(), digest)?)?;
    natives.set("randomFill", Function::new(ctx.clone(), random_fill)?)?;
    ctx.globals().set("__hookyardNatives", natives)
}

/// A URL's parts in the order `js/globals.js` reads them.
fn parts(url: &Url) -> Vec<String> {
    vec![
        quirks::href(url).into(),
        quirks::origin(url),
        quirks::protocol(url).into(),
        quirks::username(url).into(),
        quirks::password(url).into(),
        quirks::host(url).into(),
        quirks::hostname(url).into(),
        quirks::port(url).into(),
        quirks::pathname(url).into(),
        quirks::search(url).into(),
        quirks::hash(url).into(),
    ]
}

/// `new URL(input, base)`: the parts, or nothing when either does not parse.
fn url_parse(input: String, base: Opt<String>) -> Option<Vec<String>> {
    let url = match base.0 {
        Some(base) => Url::parse(&base).and_then(|base| base.join(&input)),
        None => Url::parse(&input),
    };
    url.ok().map(|url| parts(&url))
}

/// One of URL's setters on `href`: the parts after it; nothing when `href` is set to
/// what does not parse.
fn url_set(href: String, field: String, value: String) -> Option<Vec<String>> {
    let mut url = Url::parse(&href).ok()?;
    // Only href throws; another value that does not fit leaves the URL as it was.
    let fitted = match field.as_str() {
        "href" => quirks::set_href(&mut url, &value).map_err(|_| ()),
        "protocol" => quirks::set_protocol(&mut url, &value),
        "username" => quirks::set_username(&mut url, &value),
        "password" => quirks::set_password(&mut url, &value),
        "host" => quirks::set_host(&mut url, &value),
        "hostname" => quirks::set_hostname(&mut url, &value),
        "port" => quirks::set_port(&mut url, &value),
        "pathname" => {
            quirks::set_pathname(&mut url, &value);
            Ok(())
        }
        "search" => {
            quirks::set_search(&mut url, &value);
            Ok(())
        }
        "hash" => {
            quirks::set_hash(&mut url, &value);
            Ok(())
        }
        _ => return None,
    };
    if fitted.is_err() && field == "href" {
        return None;
    }
    Some(parts(&url))
}

/// `application/x-www-form-urlencoded` parsing, as `URLSearchParams` does it.
/// Pairs travel as two-element arrays.
fn form_parse(query: String) -> Vec<Vec<String>> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .map(|(k, v)| vec![k, v])
        .collect()
}

fn form_serialize(pairs: Vec<Vec<String>>) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for pair in &pairs {
        if let [name, value] = pair.as_slice() {
            serializer.append_pair(name, value);
        }
    }
    serializer.finish()
}

fn copy<'js>(ctx: Ctx<'js>, bytes: impl AsRef<[u8]>) -> rquickjs::Result<ArrayBuffer<'js>> {
    ArrayBuffer::new_copy(ctx, bytes)
}

/// The bytes of `array`, read without running JavaScript while they are borrowed.
fn with_bytes<T>(array: &TypedArray<'_, u8>, f: impl FnOnce(&[u8]) -> T) -> T {
    // SAFETY: no JavaScript runs while the slice lives (f is Rust over plain bytes).
    f(unsafe { array.as_bytes() }.unwrap_or_default())
}

fn utf8_encode<'js>(ctx: Ctx<'js>, text: String) -> rquickjs::Result<ArrayBuffer<'js>> {
    copy(ctx, text)
}

/// UTF-8 to text, invalid sequences as U+FFFD; nothing for them when `fatal`.
fn utf8_decode(bytes: TypedArray<'_, u8>, fatal: bool) -> Option<String> {
    with_bytes(&bytes, |bytes| match std::str::from_utf8(bytes) {
        Ok(text) => Some(text.to_string()),
        Err(_) if fatal => None,
        Err(_) => Some(String::from_utf8_lossy(bytes).into_owned()),
    })
}

fn base64_encode(bytes: TypedArray<'_, u8>, url: bool) -> String {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    with_bytes(&bytes, |bytes| {
        if url {
            URL_SAFE_NO_PAD.encode(bytes)
        } else {
            STANDARD.encode(bytes)
        }
    })
}

/// Base64 as Node.js reads it: either alphabet, padding optional, anything else skipped,
/// ending at the first `=`; bits that do not make a whole byte are dropped.
fn base64_decode<'js>(ctx: Ctx<'js>, text: String) -> rquickjs::Result<ArrayBuffer<'js>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let (mut bits, mut count) = (0u32, 0u32);
    for byte in text.bytes().take_while(|&b| b != b'=') {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    copy(ctx, out)
}

fn hex_encode(bytes: TypedArray<'_, u8>) -> String {
    with_bytes(&bytes, |bytes| hex::encode(bytes))
}

/// Hex as Node.js reads it: pairs up to the first that is not hex.
fn hex_decode<'js>(ctx: Ctx<'js>, text: String) -> rquickjs::Result<ArrayBuffer<'js>> {
    let digit = |b: u8| (b as char).to_digit(16);
    let out: Vec<u8> = text
        .as_bytes()
        .chunks_exact(2)
        .map_while(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect();
    copy(ctx, out)
}

/// A digest algorithm by the names Node.js takes (either case; `sha-256` too).
#[derive(Clone, Copy)]
enum Algorithm {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    fn named(name: &str) -> Option<Algorithm> {
        Some(match name.to_ascii_lowercase().replace('-', "").as_str() {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha224" => Algorithm::Sha224,
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            _ => return None,
        })
    }
}

/// The digest of `data`, or its HMAC under `key`; nothing for an algorithm not known.
fn digest<'js>(
    ctx: Ctx<'js>,
    name: String,
    data: TypedArray<'js, u8>,
    key: Opt<TypedArray<'js, u8>>,
) -> rquickjs::Result<Option<ArrayBuffer<'js>>> {
    fn of<D: Digest + BlockSizeUser>(key: Option<&[u8]>, data: &[u8]) -> Result<Vec<u8>, InvalidLength> {
        Ok(match key {
            None => D::digest(data).to_vec(),
            Some(key) => SimpleHmac::<D>::new_from_slice(key)?
                .chain_update(data)
                .finalize()
                .into_bytes()
                .to_vec(),
        })
    }
    let Some(algorithm) = Algorithm::named(&name) else {
        return Ok(None);
    };
    let key = key.0.map(|key| with_bytes(&key, <[u8]>::to_vec));
    let key = key.as_deref();
    let out = with_bytes(&data, |data| match algorithm {
        Algorithm::Md5 => of::<md5::Md5>(key, data),
        Algorithm::Sha1 => of::<sha1::Sha1>(key, data),
        Algorithm::Sha224 => of::<sha2::Sha224>(key, data),
        Algorithm::Sha256 => of::<sha2::Sha256>(key, data),
        Algorithm::Sha384 => of::<sha2::Sha384>(key, data),
        Algorithm::Sha512 => of::<sha2::Sha512>(key, data),
    })
    .map_err(|e| rquickjs::Error::new_from_js_message("key", "HMAC key", e.to_string()))?;
    copy(ctx, out).map(Some)
}

/// Fills `array` (made in JavaScript, so in metered memory) from the OS's random source.
fn random_fill(array: TypedArray<'_, u8>) -> rquickjs::Result<()> {
    if let Some(raw) = array.as_raw() {
        // SAFETY: the array's own bytes, written while no JavaScript runs.
        let bytes = unsafe { &mut *raw.as_ptr() };
        getrandom::fill(bytes)
            .map_err(|e| rquickjs::Error::new_from_js_message("os", "random bytes", e.to_string()))?;
    }
    Ok(())
}
