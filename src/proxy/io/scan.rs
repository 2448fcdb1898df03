//! The HTTP/1 bytes a client sent, followed as hyper reads them. [`Scanner`] does two things with
//! every byte read:
//!
//! - **Header lines anywhere.** It finds `Content-Length` and `Transfer-Encoding` lines within one
//!   run of lines (no blank line between them), body bytes too: a run with both marks the
//!   connection (hyper drops the length of such a request and reads it as chunked, so the handler
//!   could not tell). A body that looks like such a head can only cause a refusal.
//! - **Message framing, exactly.** A head ends at its blank line (blank lines between messages
//!   are skipped, as hyper skips them); its body is what its `Content-Length` counts, or the chunks
//!   of `Transfer-Encoding: chunked` as hyper's decoder reads them: a size line of hex digits, then
//!   optional whitespace and `;` extensions, CRLF, that many bytes, CRLF; the last chunk `0`, then
//!   trailer lines and a blank line. Chunk sizes are counted, never guessed from lines.
//!   [`Scanner::at_message_end`] is true only when the bytes so far end exactly where a message
//!   ends.
//!
//! Whatever it cannot follow (a chunk size that is no hex or overflows, a length that is no
//! number, too large for hyper or given twice with different values, a byte hyper's decoder
//! refuses) leaves the framing lost for the connection's life: it never claims a message end
//! again. hyper refuses those bytes and closes the connection in any case.
//!
//! Must never: say a message ended where hyper could still be reading one.

/// The largest body length hyper accepts (it keeps the top two values for itself).
const MAX_LENGTH: u64 = u64::MAX - 2;
const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";

/// What a head's `Content-Length` lines say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Length {
    /// No `Content-Length` line.
    #[default]
    Absent,
    Bytes(u64),
    /// Not a decimal number (`5, 5`, `0x10`, nothing), or lines that disagree: hyper answers 400.
    Invalid,
    /// More than hyper can represent: hyper answers 400 (past u64) or 431 (its top two values).
    TooLarge,
}

impl Length {
    /// The head's length after one more `Content-Length` line: the first failure stands, and a
    /// second value must repeat the first, as hyper reads them.
    fn and(self, line: Length) -> Length {
        match (self, line) {
            (Length::Absent, line) => line,
            (Length::Bytes(a), Length::Bytes(b)) if a == b => self,
            (Length::Bytes(_), _) => Length::Invalid,
            (failed, _) => failed,
        }
    }
}

/// A `Content-Length` value being read: whitespace, decimal digits, whitespace (then CR LF).
#[derive(Debug, Clone, Copy)]
enum Value {
    Before,
    /// The digits so far (`None` once past u64).
    Digits(Option<u64>),
    After(Option<u64>),
    Invalid,
}

impl Value {
    fn push(self, b: u8) -> Value {
        match (self, b) {
            (Value::Before, b' ' | b'\t') => Value::Before,
            (Value::Before, b'0'..=b'9') => Value::Digits(Some(u64::from(b - b'0'))),
            (Value::Digits(v), b'0'..=b'9') => {
                Value::Digits(v.and_then(|v| v.checked_mul(10)?.checked_add(u64::from(b - b'0'))))
            }
            (Value::Digits(v) | Value::After(v), b' ' | b'\t' | b'\r') => Value::After(v),
            _ => Value::Invalid,
        }
    }

    fn end(self) -> Length {
        match self {
            Value::Digits(Some(n)) | Value::After(Some(n)) if n <= MAX_LENGTH => Length::Bytes(n),
            Value::Digits(_) | Value::After(_) => Length::TooLarge,
            Value::Before | Value::Invalid => Length::Invalid,
        }
    }
}

/// The lines of interest in a run of lines (up to a blank line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    /// A `Content-Length` line began.
    pub content_length: bool,
    /// The `Content-Length` lines' value, once their line ended.
    pub length: Length,
    pub transfer_encoding: bool,
}

/// Header lines as bytes arrive.
#[derive(Debug, Default)]
struct Lines {
    /// The first bytes of the current line, lower-cased.
    start: [u8; 18],
    /// Length of the current line so far (it stops counting at `start.len()`, and jumps there
    /// once the line can be neither name).
    len: usize,
    /// Inside a `Content-Length` value.
    value: Option<Value>,
    /// The current run so far.
    run: Run,
}

impl Lines {
    /// Feeds bytes up to the end of the current run (its blank line) if that is among them:
    /// (bytes used, whether the run ended).
    fn feed(&mut self, bytes: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < bytes.len() {
            if let Some(value) = &mut self.value {
                if bytes[i] != b'\n' {
                    *value = value.push(bytes[i]);
                    i += 1;
                    continue;
                }
                self.run.length = self.run.length.and(value.end());
                self.value = None;
            }
            if self.len >= self.start.len() {
                // Past the interesting start of the line: skip to its end.
                match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(at) => i += at,
                    None => return (bytes.len(), false),
                }
            }
            let b = bytes[i];
            i += 1;
            if b == b'\n' {
                let blank = self.len == 0 || (self.len == 1 && self.start[0] == b'\r');
                self.len = 0;
                if blank {
                    return (i, true);
                }
                continue;
            }
            let lower = b.to_ascii_lowercase();
            self.start[self.len] = lower;
            self.len += 1;
            // The one name the line can still be: they differ in their first byte.
            let name = match self.start[0] {
                b'c' => CL,
                b't' => TE,
                _ => &[],
            };
            if name.get(self.len - 1) != Some(&lower) {
                // Neither: skip to the line's end, unless it may yet be a blank line (a CR).
                if !(self.len == 1 && lower == b'\r') {
                    self.len = self.start.len();
                }
                continue;
            }
            if self.len == CL.len() && name == CL {
                self.run.content_length = true;
                self.value = Some(Value::Before);
            }
            self.run.transfer_encoding |= self.len == TE.len() && name == TE;
        }
        (bytes.len(), false)
    }
}

/// Where a chunked body is, byte by byte (hyper's `ChunkedState`, with the size carried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a size line's first hex digit.
    Start,
    Size(u64),
    /// Whitespace after the size.
    SizeSpace(u64),
    /// A `;` extension, up to its CR.
    Extension(u64),
    /// The size line's CR was read.
    SizeLf(u64),
    /// Chunk data still to come (at least one byte).
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's size line: a trailer line or the final blank line.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// A byte hyper's chunk decoder refuses.
struct Refused;

fn hex(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

impl Chunk {
    /// The state after one byte (`Data` is counted off in bulk by the caller); `Ok(None)` once
    /// the body's last byte was read.
    fn step(self, b: u8) -> Result<Option<Chunk>, Refused> {
        use Chunk::*;
        let next = match (self, b) {
            (Start, b) => Size(hex(b).ok_or(Refused)?),
            (Size(n), b) if hex(b).is_some() => Size(
                n.checked_mul(16)
                    .and_then(|n| n.checked_add(hex(b)?))
                    .ok_or(Refused)?,
            ),
            (Size(n) | SizeSpace(n), b' ' | b'\t') => SizeSpace(n),
            (Size(n) | SizeSpace(n), b';') => Extension(n),
            (Size(n) | SizeSpace(n) | Extension(n), b'\r') => SizeLf(n),
            (Extension(_), b'\n') => return Err(Refused),
            (Extension(n), _) => Extension(n),
            (SizeLf(0), b'\n') => EndCr,
            (SizeLf(n), b'\n') => Data(n),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Start,
            (EndCr, b'\r') => EndLf,
            (Trailer, b'\r') => TrailerLf,
            (EndCr | Trailer, _) => Trailer,
            (TrailerLf, b'\n') => EndCr,
            (EndLf, b'\n') => return Ok(None),
            _ => return Err(Refused),
        };
        Ok(Some(next))
    }
}

/// Where the client's byte stream is, message by message.
#[derive(Debug, Default)]
enum Framing {
    /// Between messages: the bytes so far end where a message ends.
    #[default]
    Idle,
    /// Between messages, a CR read: hyper wants its LF.
    IdleCr,
    Head(Lines),
    /// Bytes of a `Content-Length` body still to come (at least one).
    Body(u64),
    Chunked(Chunk),
    /// Bytes it could not follow: never at a message end again.
    Lost,
}

impl Framing {
    /// What follows a head that ended with `run`.
    fn after_head(run: Run) -> Framing {
        if run.transfer_encoding {
            // hyper reads chunked whatever the Content-Length, or refuses the head.
            return Framing::Chunked(Chunk::Start);
        }
        match run.length {
            Length::Absent | Length::Bytes(0) => Framing::Idle,
            Length::Bytes(n) => Framing::Body(n),
            Length::Invalid | Length::TooLarge => Framing::Lost,
        }
    }

    /// Follows `bytes`; the `Run` of each head that ends among them goes to `head_ended`.
    fn feed(&mut self, mut bytes: &[u8], mut head_ended: impl FnMut(Run)) {
        while let Some(&b) = bytes.first() {
            match self {
                Framing::Lost => return,
                Framing::Idle | Framing::IdleCr => {
                    *self = match (&*self, b) {
                        (Framing::Idle, b'\r') => Framing::IdleCr,
                        (_, b'\n') => Framing::Idle,
                        (Framing::IdleCr, _) => Framing::Lost,
                        // The head begins with this byte, read next as a head's.
                        (_, _) => {
                            *self = Framing::Head(Lines::default());
                            continue;
                        }
                    };
                    bytes = &bytes[1..];
                }
                Framing::Head(lines) => {
                    let (used, ended) = lines.feed(bytes);
                    bytes = &bytes[used..];
                    if ended {
                        let run = lines.run;
                        head_ended(run);
                        *self = Framing::after_head(run);
                    }
                }
                Framing::Body(left) | Framing::Chunked(Chunk::Data(left)) => {
                    let n = usize::try_from(*left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        *self = match self {
                            Framing::Body(_) => Framing::Idle,
                            _ => Framing::Chunked(Chunk::DataCr),
                        };
                    }
                }
                Framing::Chunked(chunk) => {
                    bytes = &bytes[1..];
                    *self = match chunk.step(b) {
                        Ok(Some(next)) => Framing::Chunked(next),
                        Ok(None) => Framing::Idle,
                        Err(Refused) => Framing::Lost,
                    };
                }
            }
        }
    }
}

/// Follows what a client sends over HTTP/1 (see the module docs).
#[derive(Debug, Default)]
pub struct Scanner {
    /// Over every byte, for ambiguous framing.
    lines: Lines,
    framing: Framing,
    /// The `Content-Length` of the last head that ended.
    last_length: Length,
}

impl Scanner {
    /// Feeds bytes read; true if a run of lines with both `Content-Length` and
    /// `Transfer-Encoding` was among them.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut found = false;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (used, ended) = self.lines.feed(rest);
            found |= self.lines.run.content_length && self.lines.run.transfer_encoding;
            if ended {
                self.lines.run = Run::default();
            }
            rest = &rest[used..];
        }
        let last_length = &mut self.last_length;
        self.framing.feed(bytes, |run| *last_length = run.length);
        found
    }

    /// Whether the bytes fed so far end exactly at the end of a message (or none were fed).
    pub fn at_message_end(&self) -> bool {
        matches!(self.framing, Framing::Idle)
    }

    /// Whether the head being read, or else the last one read, has a `Content-Length` hyper
    /// cannot represent.
    pub fn length_too_large(&self) -> bool {
        let length = match &self.framing {
            Framing::Head(lines) => lines.run.length,
            _ => self.last_length,
        };
        length == Length::TooLarge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a run of header lines says, read whole line by line (not byte by byte, as `Lines`
    /// reads them): bytes used up to and with its blank line, whether it ended, and the run.
    fn run_of(bytes: &[u8]) -> (usize, bool, Run) {
        let mut run = Run::default();
        let mut at = 0;
        while at < bytes.len() {
            let (line, next) = match memchr::memchr(b'\n', &bytes[at..]) {
                Some(end) => (&bytes[at..at + end], Some(at + end + 1)),
                None => (&bytes[at..], None),
            };
            let lower = line.to_ascii_lowercase();
            if next.is_some() && (lower.is_empty() || lower == b"\r") {
                return (next.unwrap_or_default(), true, run);
            }
            if lower.starts_with(CL) {
                run.content_length = true;
                if next.is_some() {
                    let value = line[CL.len()..]
                        .iter()
                        .fold(Value::Before, |v, &b| v.push(b));
                    run.length = run.length.and(value.end());
                }
            }
            run.transfer_encoding |= lower.starts_with(TE);
            match next {
                Some(next) => at = next,
                None => break,
            }
        }
        (bytes.len(), false, run)
    }

    #[test]
    fn lines_read_byte_by_byte_say_what_whole_lines_say() {
        const LINES: &[&str] = &[
            "GET / HTTP/1.1",
            "Host: x",
            "Content-Length: 5",
            "content-length:12 ",
            "CONTENT-LENGTH:\t7\t",
            "Content-Length: 5, 5",
            "Content-Length: 99999999999999999999999",
            "Content-Length:",
            "Content-Lengt: 1",
            "Content-Lengthy: 1",
            "Content-Type: text/plain",
            "Transfer-Encoding: chunked",
            "transfer-encodingx: chunked",
            "Transfer-Encodin: chunked",
            "TE: trailers",
            "te",
            "c",
            "t",
            " content-length: 4",
            "\rcontent-length: 3",
            "x-a-header-name-longer-than-eighteen-bytes: v",
            "",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..3000 {
            let mut input = Vec::new();
            for _ in 0..next(9) {
                input.extend_from_slice(LINES[next(LINES.len())].as_bytes());
                input.extend_from_slice([&b"\r\n"[..], b"\n"][next(2)]);
            }
            // a part of a line, or bytes after the blank line
            let tail = LINES[next(LINES.len())].as_bytes();
            input.extend_from_slice(&tail[..next(tail.len() + 1)]);
            let expected = run_of(&input);
            let mut lines = Lines::default();
            let (mut used, mut ended, mut rest) = (0, false, &input[..]);
            while !rest.is_empty() && !ended {
                let part = &rest[..1 + next(rest.len())];
                let (n, end) = lines.feed(part);
                (used, ended, rest) = (used + n, end, &rest[n..]);
            }
            assert_eq!(
                (used, ended, lines.run),
                expected,
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    fn scan(parts: &[&[u8]]) -> bool {
        let mut s = Scanner::default();
        parts.iter().fold(false, |found, p| s.feed(p) | found)
    }

    #[test]
    fn finds_both_headers_in_one_head() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        let reversed =
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n";
        assert!(scan(&[reversed]));
        let bare_lf = b"POST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n";
        assert!(scan(&[bare_lf]));
    }

    #[test]
    fn finds_them_across_read_boundaries() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nTransfer-Encoding: chunked\r\n\r\n";
        for split in 0..head.len() {
            assert!(scan(&[&head[..split], &head[split..]]), "split at {split}");
        }
        let bytewise: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytewise));
    }

    #[test]
    fn one_header_per_head_is_fine() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\
POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!scan(&[two]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[b"GET / HTTP/1.1\r\nContent-Length : 1\r\n\r\n"]));
    }

    #[test]
    fn lengths_hyper_cannot_represent_are_noticed() {
        let too_large = |value: &str| {
            let mut s = Scanner::default();
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            for b in head.as_bytes().chunks(3) {
                s.feed(b);
            }
            s.length_too_large()
        };
        for fine in ["0", "5", "18446744073709551613", " 12 ", "5, 5", "x"] {
            assert!(!too_large(fine), "{fine}");
        }
        for absurd in [
            "18446744073709551614",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999",
        ] {
            assert!(too_large(absurd), "{absurd}");
        }
        // Also while the head is still being read (hyper refuses a head over its buffer).
        let mut s = Scanner::default();
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\nX-Pad: aaaa");
        assert!(s.length_too_large());
    }

    /// Whether the scanner, fed `parts` in order, ends at the end of a message.
    fn ends_a_message(parts: &[&[u8]]) -> bool {
        let mut s = Scanner::default();
        for p in parts {
            s.feed(p);
        }
        s.at_message_end()
    }

    /// `message` ends a message only once whole, however it is split into two reads, or read
    /// byte by byte.
    fn ends_only_when_whole(message: &[u8]) {
        assert!(
            ends_a_message(&[message]),
            "{:?}",
            String::from_utf8_lossy(message)
        );
        for split in 1..message.len() {
            let (a, b) = message.split_at(split);
            assert!(!ends_a_message(&[a]), "cut at {split}: {a:?}");
            assert!(ends_a_message(&[a, b]), "split at {split}");
        }
        let mut s = Scanner::default();
        for (i, b) in message.iter().enumerate() {
            s.feed(&[*b]);
            assert_eq!(s.at_message_end(), i + 1 == message.len(), "byte {i}");
        }
    }

    #[test]
    fn follows_heads_and_lengths() {
        assert!(ends_a_message(&[]));
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        ends_only_when_whole(get);
        assert!(
            ends_a_message(&[get, b"\r\n"]),
            "blank lines between messages"
        );
        assert!(!ends_a_message(&[get, b"\r"]), "a CR waiting for its LF");
        ends_only_when_whole(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        ends_only_when_whole(b"POST / HTTP/1.1\nContent-Length:\t5 \n\nhello");
        ends_only_when_whole(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        let post = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert!(!ends_a_message(&[post, b"G"]), "the next head begun");
        let body_like_a_head = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n\r\n\r\n";
        assert!(ends_a_message(&[body_like_a_head, get]));
        let same_twice = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi";
        ends_only_when_whole(same_twice);
        let pipelined = [&get[..], &get[..], &get[..10]].concat();
        assert!(!ends_a_message(&[&pipelined]));
    }

    #[test]
    fn lengths_it_cannot_count_never_end() {
        for value in [
            "99999999999999999999999",
            "18446744073709551615",
            "5, 5",
            "+5",
            "0x10",
            "",
            "5 5",
        ] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            let then = b"GET / HTTP/1.1\r\n\r\n";
            assert!(!ends_a_message(&[head.as_bytes()]), "{value:?}");
            assert!(
                !ends_a_message(&[head.as_bytes(), then]),
                "{value:?}: lost for good"
            );
        }
        let differing = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi";
        assert!(!ends_a_message(&[differing, b"x"]));
    }

    const CHUNKED: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn chunked(body: &[u8]) -> Vec<u8> {
        [CHUNKED, body].concat()
    }

    #[test]
    fn counts_chunk_sizes_split_across_reads_at_every_byte() {
        ends_only_when_whole(&chunked(b"5\r\nhello\r\n0\r\n\r\n"));
        ends_only_when_whole(&chunked(
            b"1a\r\nabcdefghijkl\r\n\r\nmnopqrstuv\r\n0\r\n\r\n",
        ));
        ends_only_when_whole(&chunked(
            b"00000A\r\n0123456789\r\nB\r\n0123456789a\r\n0\r\n\r\n",
        ));
        ends_only_when_whole(&chunked(b"0\r\n\r\n"));
    }

    #[test]
    fn a_blank_line_inside_chunk_data_is_data() {
        // The bytes of the smuggling attempt: a 0x40-byte chunk of which 5 bytes arrived, the
        // last of them a blank line.
        let early = chunked(b"40\r\nx\r\n\r\n");
        assert!(!ends_a_message(&[&early]));
        let smuggled = b"GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!ends_a_message(&[&early, smuggled]), "still chunk data");
        let rest = vec![b'y'; 0x40 - 5 - smuggled.len()];
        assert!(!ends_a_message(&[&early, smuggled, &rest]));
        assert!(ends_a_message(&[&early, smuggled, &rest, b"\r\n0\r\n\r\n"]));
        ends_only_when_whole(&chunked(b"6\r\n\r\n\r\n\r\n\r\n0\r\n\r\n"));
        ends_only_when_whole(&chunked(b"5\r\n0\r\n\r\n\r\n0\r\n\r\n"));
    }

    #[test]
    fn chunk_extensions_and_whitespace_after_the_size() {
        ends_only_when_whole(&chunked(b"5;name=value\r\nhello\r\n0;last\r\n\r\n"));
        ends_only_when_whole(&chunked(b"5 ;a=\"b;c\"\r\nhello\r\n0\t\r\n\r\n"));
        ends_only_when_whole(&chunked(b"5;\r\nhello\r\n0\r\n\r\n"));
        // The size is still read past its extension: what follows is counted as data.
        ends_only_when_whole(&chunked(b"4;x=y\r\n\r\n\r\n\r\n0;z\r\n\r\n"));
    }

    #[test]
    fn trailers() {
        ends_only_when_whole(&chunked(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"));
        ends_only_when_whole(&chunked(b"0\r\nA: 1\r\nB: 2\r\n\r\n"));
        // hyper reads a bare LF inside a trailer section as part of the trailer line.
        ends_only_when_whole(&chunked(b"0\r\nA: 1\nB: 2\r\n\r\n"));
        // Trailers after a chunk of data that is itself a blank line.
        ends_only_when_whole(&chunked(b"2\r\n\r\n\r\n0\r\nX-Checksum: abc\r\n\r\n"));
    }

    #[test]
    fn chunks_it_cannot_parse_are_lost_for_good() {
        for body in [
            &b"g\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\n5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5;ext\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\nx\r\n0\r\n\r\n",
            b"0\r\n\rX",
            b"0\r\nA: 1\rB\r\n\r\n",
        ] {
            let then = [&chunked(body)[..], b"GET / HTTP/1.1\r\n\r\n0\r\n\r\n"].concat();
            assert!(
                !ends_a_message(&[&then]),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The largest size that fits is counted, not refused.
        assert!(!ends_a_message(&[&chunked(b"ffffffffffffffff\r\nx")]));
    }

    #[test]
    fn chunked_wins_over_a_length_as_in_hyper() {
        let both =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        ends_only_when_whole(both);
    }
}
