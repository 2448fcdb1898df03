//! Canonical forms of what a request names: its path and its authority. The proxy decides a
//! request's one view with these before routing; config checks route prefixes and hosts with the
//! same rules, so a route can only name what a request can match.
//!
//! Path, byte by byte (RFC 3986 section 6 normalization, and stricter where upstreams disagree):
//! - percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`) are decoded, so `/%61dmin`
//!   is `/admin`; every other escape is kept, with upper-case hex digits;
//! - refused: an escape that decodes to `/`, `\`, `;`, `%`, `?`, `#` or a control byte
//!   (upstreams split, re-parse or double-decode those), a malformed escape, escaped bytes that are
//!   not UTF-8 (overlong dots), raw `\`, raw `;` (path parameters, which some upstreams strip
//!   before matching), raw non-ASCII or control bytes, and `.` / `..` segments in any encoding;
//! - repeated slashes are merged (`//admin` is `/admin`), or refused when `merge_slashes` is off.
//!
//! A path that needs no change is borrowed, never copied.
//!
//! Authority: `host[:port]`. A host is a name of letters, digits, `-`, `.` and `_` (so an IPv4
//! address too), or an IPv6 address in brackets; a port is 1 to 5 digits up to 65535. Refused:
//! userinfo, a second port (`a:80:80`), a bracketed name (`[a.example]`), lists and other
//! sub-delimiters (`a,b`), percent-escapes.
//!
//! Must never: accept a path that an upstream could read as a different one than a route matched.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Why a path is refused, as a sentence for the caller (the proxy answers it with 400).
pub type Refusal = &'static str;

/// Whether `text` is a host name as an authority may hold one: letters, digits, `-`, `.` and `_`
/// (so an IPv4 address too), at least one. A route's `host` must be one.
pub fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The host part of `authority` when it is a `host[:port]` as the module doc says, else `None`.
/// Not `http::uri::Authority`: it accepts `a,b`, `[a.example]` and ports that are no number, and
/// building one from a `Host` header copies it into a new buffer, once per request.
pub fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let end = rest.find(']')?;
            rest[..end].parse::<Ipv6Addr>().ok()?;
            authority.split_at(end + 2)
        }
        None => {
            let (host, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            if !is_host_name(host) {
                return None;
            }
            (host, port)
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            (1..=5).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits.parse::<u16>().is_ok()
        }
    };
    port_ok.then_some(host)
}

/// The output of [`canonical_path`]: borrows the input until the first byte that differs.
struct Out<'a> {
    raw: &'a str,
    /// `None` while the output is `raw[..len]`.
    owned: Option<Vec<u8>>,
    len: usize,
}

impl<'a> Out<'a> {
    /// The raw byte at `at` goes out unchanged.
    fn keep(&mut self, at: usize) {
        match &mut self.owned {
            None if at == self.len => self.len += 1,
            _ => self.push(&[self.raw.as_bytes()[at]]),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let owned = self
            .owned
            .get_or_insert_with(|| self.raw.as_bytes()[..self.len].to_vec());
        owned.extend_from_slice(bytes);
    }

    /// The raw bytes from `at` on are dropped or replaced.
    fn diverge(&mut self) {
        if self.owned.is_none() {
            self.owned = Some(self.raw.as_bytes()[..self.len].to_vec());
        }
    }

    fn last(&self) -> Option<u8> {
        match &self.owned {
            None => self.len.checked_sub(1).map(|i| self.raw.as_bytes()[i]),
            Some(o) => o.last().copied(),
        }
    }

    fn finish(self) -> Cow<'a, str> {
        match self.owned {
            None => Cow::Borrowed(self.raw),
            // Every byte pushed is ASCII.
            Some(bytes) => Cow::Owned(String::from_utf8(bytes).expect("ASCII")),
        }
    }
}

/// The decoded content of the current segment, as far as dot segments are concerned.
#[derive(Default)]
struct Segment {
    dots: u8,
    other: bool,
}

impl Segment {
    fn feed(&mut self, decoded: u8) {
        if decoded == b'.' && !self.other {
            self.dots = self.dots.saturating_add(1);
        } else {
            self.other = true;
        }
    }

    fn end(&mut self) -> Result<(), Refusal> {
        let dot_segment = !self.other && (1..=2).contains(&self.dots);
        *self = Segment::default();
        if dot_segment {
            return Err("the request path holds a dot segment");
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The escape at `at` (`%XY`), decoded.
fn escape(raw: &[u8], at: usize) -> Result<u8, Refusal> {
    match (
        raw.get(at + 1).and_then(|b| hex(*b)),
        raw.get(at + 2).and_then(|b| hex(*b)),
    ) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err("the request path holds a malformed percent-escape"),
    }
}

/// Checks that the run of escaped bytes >= 0x80 starting at `at` is UTF-8 (so no overlong or
/// stray bytes); returns where the run ends. Only paths with escaped non-ASCII get here.
fn utf8_run(raw: &[u8], mut at: usize) -> Result<usize, Refusal> {
    let mut decoded = Vec::new();
    while raw.get(at) == Some(&b'%') {
        let b = escape(raw, at)?;
        if b < 0x80 {
            break;
        }
        decoded.push(b);
        at += 3;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err("the request path holds escaped bytes that are not UTF-8");
    }
    Ok(at)
}

/// Whether `path` is canonical at a glance: no byte that could need a change or a refusal, no
/// repeated slash and no segment starting with a dot. Most paths are; the others take the full
/// pass (which also accepts `/.well-known`).
fn plainly_canonical(path: &[u8]) -> bool {
    let mut previous = 0u8;
    for &b in path {
        match b {
            b'%' | b';' | b'\\' | 0..=0x20 | 0x7f..=0xff => return false,
            b'/' | b'.' if previous == b'/' => return false,
            _ => previous = b,
        }
    }
    true
}

/// The canonical form of a request path (see the module doc). Borrowed when already canonical.
pub fn canonical_path(raw: &str, merge_slashes: bool) -> Result<Cow<'_, str>, Refusal> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("the request target must be an absolute path");
    }
    if plainly_canonical(bytes) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Out {
        raw,
        owned: None,
        len: 0,
    };
    let mut segment = Segment::default();
    // Escaped non-ASCII bytes before this index have been checked to be UTF-8.
    let mut utf8_checked = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' => {
                segment.end()?;
                if i > 0 && out.last() == Some(b'/') {
                    if !merge_slashes {
                        return Err("the request path holds repeated slashes");
                    }
                    out.diverge();
                } else {
                    out.keep(i);
                }
                i += 1;
            }
            b'%' => {
                let decoded = escape(bytes, i)?;
                match decoded {
                    b'/' | b'\\' => return Err("the request path holds an escaped slash"),
                    b';' | b'%' | b'?' | b'#' => {
                        return Err("the request path holds an escaped ';', '%', '?' or '#'")
                    }
                    0..=0x1f | 0x7f => return Err("the request path holds a control character"),
                    _ => {}
                }
                if decoded >= 0x80 && i >= utf8_checked {
                    utf8_checked = utf8_run(bytes, i)?;
                }
                segment.feed(decoded);
                if is_unreserved(decoded) {
                    out.diverge();
                    out.push(&[decoded]);
                } else if bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
                    out.diverge();
                    let upper = [
                        b'%',
                        bytes[i + 1].to_ascii_uppercase(),
                        bytes[i + 2].to_ascii_uppercase(),
                    ];
                    out.push(&upper);
                } else {
                    for at in i..i + 3 {
                        out.keep(at);
                    }
                }
                i += 3;
            }
            b';' => return Err("the request path holds a ';' (path parameters)"),
            b'\\' => return Err("the request path holds a backslash"),
            0x80..=0xff => return Err("the request path holds raw non-ASCII bytes"),
            0..=0x20 | 0x7f => return Err("the request path holds a control character"),
            _ => {
                segment.feed(b);
                out.keep(i);
                i += 1;
            }
        }
    }
    segment.end()?;
    Ok(out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(path: &str) -> Result<String, Refusal> {
        canonical_path(path, true).map(Cow::into_owned)
    }

    #[test]
    fn clean_paths_are_borrowed() {
        for clean in [
            "/",
            "/a/b",
            "/a/.well-known",
            "/a/..b",
            "/a/b..",
            "/x/%C3%A9",
            "/q%20r/",
        ] {
            assert!(
                matches!(canonical_path(clean, true), Ok(Cow::Borrowed(p)) if p == clean),
                "{clean}"
            );
        }
    }

    #[test]
    fn most_paths_are_canonical_at_a_glance() {
        for plain in [
            "/",
            "/api/v1/orders/12345",
            "/v1.2/x",
            "/a-b_c~d/e!f",
            "/a/b../c",
        ] {
            assert!(plainly_canonical(plain.as_bytes()), "{plain}");
        }
        // These take the full pass, which accepts them unchanged.
        for full in ["/.well-known", "/a/..b", "/x/%C3%A9"] {
            assert!(!plainly_canonical(full.as_bytes()), "{full}");
            assert!(matches!(canonical_path(full, false), Ok(Cow::Borrowed(_))));
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        for (raw, want) in [
            ("/%61dmin/x", "/admin/x"),
            ("/%41%7e%2D%5f", "/A~-_"),
            ("//admin//x/", "/admin/x/"),
            ("/a%2a/%c3%a9", "/a%2A/%C3%A9"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%F0%9F%98%80/x", "/%F0%9F%98%80/x"),
        ] {
            assert_eq!(canon(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn confusable_paths_are_refused() {
        for bad in [
            "*",
            "admin",
            "/a/../b",
            "/..",
            "/a/.",
            "/./a",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/%2e",
            "/%2e%2E/",
            "/admin%2fx",
            "/admin%2Fx",
            "/admin%5cx",
            "/admin\\x",
            "/admin;x",
            "/..;/admin",
            "/.;/admin",
            "/admin%3bx",
            "/%2561dmin",
            "/admin%3F",
            "/admin%23",
            "/a%00b",
            "/a%0a",
            "/a%7f",
            "/a%",
            "/a%4",
            "/a%zz",
            "/%c0%ae%c0%ae/x",
            "/%C3",
            "/%80",
            "/%C3%A9%A9",
            "/é",
        ] {
            assert!(canonical_path(bad, true).is_err(), "{bad}");
            assert!(
                !bad.starts_with('/') || !plainly_canonical(bad.as_bytes()),
                "{bad}"
            );
        }
        assert!(canonical_path("//admin", false).is_err());
        assert!(canonical_path("/a//b", false).is_err());
        assert_eq!(canonical_path("/a/b/", false).as_deref(), Ok("/a/b/"));
    }

    #[test]
    fn only_host_and_port_are_authorities() {
        for good in [
            "a.example",
            "A-b_c.example.",
            "a.example:0",
            "a.example:65535",
            "10.0.0.1:8080",
            "[::1]",
            "[2001:db8::7]:443",
        ] {
            assert!(host_of(good).is_some(), "{good}");
        }
        assert_eq!(host_of("[::1]:80"), Some("[::1]"));
        assert_eq!(host_of("a.example:80"), Some("a.example"));
        for bad in [
            "a.example:abc",
            "a.example:99999",
            "a.example:65536",
            "a.example:+80",
            "a.example:",
            "a.example:123456",
            "a.example:80:80",
            "[a.example]",
            "[a.example]:80",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[fe80::1%25eth0]",
            "a.example,other",
            "a.example;x",
            "a%2eexample",
            "u@a.example",
            ":80",
            "",
            "a example",
        ] {
            assert_eq!(host_of(bad), None, "{bad}");
        }
    }
}
