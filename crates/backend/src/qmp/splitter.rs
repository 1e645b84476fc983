//! Splitting a client's input stream into JSON texts, the way QEMU's JSON streamer
//! does (qobject/json-streamer.c): by counting braces and brackets outside strings.
//! Each complete text is parsed into a value; a text that is not valid JSON yields a
//! parse error and the stream goes on.
//!
//! The input is untrusted, so the splitter keeps QEMU's limits, only smaller, since
//! QMP commands are small (see [`MAX_TEXT_BYTES`], [`MAX_TOKENS`], [`MAX_NESTING`]).
//! A text that breaks one gets a single error, and the rest of it is skipped without
//! being stored: the splitter goes on tracking strings and nesting to find where the
//! text ends, in constant memory. A byte that can never occur in JSON (a control
//! character other than tab, CR and LF; inside strings any control character, or
//! 0xFE/0xFF; outside strings any byte above 0x7F) is a lexical error that ends the
//! text at once, as in QEMU: clients use such a byte to bring the parser back into a
//! known state (QMP specification, "Forcing the JSON parser into known-good state").

use super::wire::QmpError;
use serde_json::Value;
use std::borrow::Cow;

/// Largest JSON text accepted, in bytes (QEMU's streamer: 64 MiB).
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// Most tokens (strings, numbers, keywords, structural characters) in one text (QEMU:
/// 2 Mi). It bounds the parsed value as `MAX_TEXT_BYTES` bounds the text: a text of
/// one-byte numbers would otherwise parse into a value some 40 times its size.
pub const MAX_TOKENS: usize = 1 << 16;

/// Deepest nesting of objects and arrays (QEMU: 1024). serde_json refuses 128 levels
/// (its recursion limit), so the splitter stops a text first, with QEMU's message and
/// before storing the rest of it.
pub const MAX_NESTING: u64 = 127;

/// At most this much of a string is quoted in a "stray" error.
const STRAY_QUOTE_MAX: usize = 64;

/// The splitter's state between reads.
#[derive(Default)]
pub struct Splitter {
    /// The text read so far (empty while skipping).
    buf: Vec<u8>,
    /// Open objects and arrays.
    depth: u64,
    tokens: usize,
    /// The quote character of the string being read (QEMU's JSON also takes
    /// single-quoted strings), and where the string starts in `buf`.
    quote: Option<u8>,
    string_start: usize,
    escaped: bool,
    /// Inside a number or keyword (which counts as one token).
    in_word: bool,
    /// The text broke a limit and has had its error: the rest is skipped.
    skipping: bool,
    /// The last byte was a lexical error: a run of them gets one reply.
    after_stray: bool,
}

/// A byte that cannot occur at this place in JSON text (QEMU's lexer: a "stray" one).
fn is_stray(b: u8, in_string: bool) -> bool {
    if in_string {
        b < 0x20 || b == 0xfe || b == 0xff
    } else {
        (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b >= 0x80
    }
}

impl Splitter {
    /// Consumes bytes from the front of `input` up to the end of the next complete
    /// text, and returns that text's value (or its error). Returns `None` once `input`
    /// is used up without completing a text; the bytes stay buffered for the next call.
    pub fn next(&mut self, input: &mut &[u8]) -> Option<Result<Value, QmpError>> {
        let bytes = *input;
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(out) = self.byte(b) {
                *input = &bytes[i + 1..];
                return Some(out);
            }
        }
        *input = &[];
        None
    }

    /// Bytes held for the text in progress (bounded by [`MAX_TEXT_BYTES`]).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn byte(&mut self, b: u8) -> Option<Result<Value, QmpError>> {
        if is_stray(b, self.quote.is_some()) {
            if self.after_stray {
                return None;
            }
            let reply = (!self.skipping).then(|| {
                Err(QmpError::generic(format!(
                    "JSON parse error, stray '{}'",
                    self.stray_token(b)
                )))
            });
            self.reset();
            self.after_stray = true;
            return reply;
        }
        self.after_stray = false;
        if !self.skipping {
            if self.buf.is_empty() && self.depth == 0 && b.is_ascii_whitespace() {
                return None;
            }
            self.buf.push(b);
        }
        let (end, unbalanced) = self.track(b);
        if self.skipping {
            if end {
                self.reset();
            }
            return None;
        }
        if unbalanced {
            // QEMU's text for a closing bracket with nothing open.
            self.reset();
            return Some(Err(QmpError::generic("JSON parse error, expecting value")));
        }
        if let Some(desc) = self.broken_limit() {
            if end {
                self.reset();
            } else {
                self.buf = Vec::new();
                self.skipping = true;
            }
            return Some(Err(QmpError::generic(desc)));
        }
        end.then(|| self.take())
    }

    /// Follows strings, nesting and tokens through one byte. Returns whether the byte
    /// ends the text, and whether it closed a bracket that was never opened.
    fn track(&mut self, b: u8) -> (bool, bool) {
        if let Some(q) = self.quote {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == q {
                self.quote = None;
            }
            return (false, false);
        }
        let word = !matches!(
            b,
            b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"' | b'\'' | b' ' | b'\t' | b'\r' | b'\n'
        );
        if word && !self.in_word {
            self.tokens += 1;
        }
        self.in_word = word;
        match b {
            b'"' | b'\'' => {
                self.quote = Some(b);
                self.string_start = self.buf.len().saturating_sub(1);
                self.tokens += 1;
                (false, false)
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.tokens += 1;
                (false, false)
            }
            b'}' | b']' => {
                self.tokens += 1;
                if self.depth == 0 {
                    return (true, true);
                }
                self.depth -= 1;
                (self.depth == 0, false)
            }
            b',' | b':' => {
                self.tokens += 1;
                (false, false)
            }
            // A scalar or stray text at the top level ends at a line end.
            b'\n' => (self.depth == 0, false),
            _ => (false, false),
        }
    }

    /// QEMU's message for the first limit the text in progress breaks.
    fn broken_limit(&self) -> Option<&'static str> {
        if self.depth > MAX_NESTING {
            Some("JSON nesting depth limit exceeded")
        } else if self.buf.len() > MAX_TEXT_BYTES {
            Some("JSON token size limit exceeded")
        } else if self.tokens > MAX_TOKENS {
            Some("JSON token count limit exceeded")
        } else {
            None
        }
    }

    /// The token a stray byte spoils, as QEMU quotes it: inside a string, the string
    /// so far (shortened if long) and the byte; elsewhere the byte alone.
    fn stray_token(&self, b: u8) -> String {
        let mut token = Vec::new();
        if self.quote.is_some() && !self.skipping {
            let string = &self.buf[self.string_start.min(self.buf.len())..];
            if string.len() <= STRAY_QUOTE_MAX {
                token.extend_from_slice(string);
            } else {
                token.extend_from_slice(&string[..STRAY_QUOTE_MAX]);
                token.extend_from_slice(b"...");
            }
        }
        token.push(b);
        String::from_utf8_lossy(&token).into_owned()
    }

    /// Forgets the text in progress.
    fn reset(&mut self) {
        *self = Splitter::default();
    }

    fn take(&mut self) -> Result<Value, QmpError> {
        let text = std::mem::take(&mut self.buf);
        self.reset();
        parse_text(&text)
    }
}

/// Parses one complete JSON text (QEMU's extensions included).
fn parse_text(text: &[u8]) -> Result<Value, QmpError> {
    // Bytes above 0x7F outside strings are stray ones, so invalid UTF-8 that gets this
    // far is inside a string.
    if std::str::from_utf8(text).is_err() {
        return Err(QmpError::generic(
            "JSON parse error, invalid UTF-8 sequence in string",
        ));
    }
    serde_json::from_slice(&single_quotes_to_double(text))
        .map_err(|e| QmpError::generic(format!("JSON parse error, {}", parse_reason(&e))))
}

/// Rewrites QEMU's single-quoted strings (`'abc'`, where `\'` is a quote and `"`
/// needs no escape) as standard JSON strings; everything else is copied.
fn single_quotes_to_double(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.contains(&b'\'') {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for &b in text {
        match quote {
            None => {
                if b == b'"' || b == b'\'' {
                    quote = Some(b);
                    out.push(b'"');
                } else {
                    out.push(b);
                }
            }
            Some(q) => {
                if escaped {
                    escaped = false;
                    if q == b'\'' && b == b'\'' {
                        // `\'` inside a single-quoted string is a plain quote.
                        out.pop();
                    }
                    out.push(b);
                } else if b == b'\\' {
                    escaped = true;
                    out.push(b);
                } else if b == q {
                    quote = None;
                    out.push(b'"');
                } else if q == b'\'' && b == b'"' {
                    out.extend_from_slice(b"\\\"");
                } else {
                    out.push(b);
                }
            }
        }
    }
    Cow::Owned(out)
}

fn parse_reason(e: &serde_json::Error) -> String {
    let s = e.to_string();
    // serde_json appends " at line L column C"; keep only the reason.
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every text that `bytes` completes.
    fn feed(s: &mut Splitter, mut bytes: &[u8]) -> Vec<Result<Value, QmpError>> {
        let mut out = Vec::new();
        while let Some(v) = s.next(&mut bytes) {
            out.push(v);
        }
        out
    }

    fn err_desc(r: &Result<Value, QmpError>) -> &str {
        &r.as_ref().unwrap_err().desc
    }

    #[test]
    fn splits_and_recovers() {
        let mut s = Splitter::default();
        let out = feed(&mut s, b"{\"execute\": \"a\"}{\"execute\":\n \"b}\"}\n");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap()["execute"], "b}");
        let out = feed(&mut s, b"{\"execute\": }\n");
        assert!(err_desc(&out[0]).starts_with("JSON parse error"));
        let out = feed(&mut s, b"hello\n");
        assert!(out[0].is_err());
        let out = feed(&mut s, b"[1, 2]");
        assert_eq!(out[0].as_ref().unwrap(), &json!([1, 2]));
        let out = feed(&mut s, b"{'execute': 'it\\'s \"x\"', \"a\": ['b}']}");
        assert_eq!(out[0].as_ref().unwrap()["execute"], "it's \"x\"");
        assert_eq!(out[0].as_ref().unwrap()["a"][0], "b}");
        let out = feed(&mut s, b"{\"execute\": \"q\\\"x\"");
        assert!(out.is_empty());
        let out = feed(&mut s, b"}");
        assert_eq!(out[0].as_ref().unwrap()["execute"], "q\"x");
        let out = feed(&mut s, b"}\n{\"a\": 1}");
        assert_eq!(err_desc(&out[0]), "JSON parse error, expecting value");
        assert_eq!(out[1].as_ref().unwrap(), &json!({"a": 1}));
    }

    #[test]
    fn next_stops_after_each_text() {
        let mut s = Splitter::default();
        let mut input: &[u8] = b"{}[]{";
        assert!(s.next(&mut input).is_some());
        assert_eq!(input, b"[]{");
        assert!(s.next(&mut input).is_some());
        assert!(s.next(&mut input).is_none());
        assert!(input.is_empty());
        assert_eq!(s.buffered(), 1);
    }

    #[test]
    fn oversized_text_gets_one_error_and_is_skipped_unstored() {
        let mut s = Splitter::default();
        let out = feed(&mut s, b"{\"execute\": \"x\", \"arguments\": {\"s\": \"");
        assert!(out.is_empty());
        let chunk = vec![b'a'; 64 << 10];
        let mut errors = Vec::new();
        for _ in 0..(3 * MAX_TEXT_BYTES / chunk.len()) {
            errors.extend(feed(&mut s, &chunk));
            assert!(s.buffered() <= MAX_TEXT_BYTES);
        }
        assert_eq!(errors.len(), 1);
        assert_eq!(err_desc(&errors[0]), "JSON token size limit exceeded");
        assert_eq!(s.buffered(), 0);
        // Brackets and quotes inside the skipped string do not count; the text ends
        // where its outermost object does, and what follows is parsed afresh.
        let out = feed(&mut s, b"}]\\\"{\"}}\n{\"execute\": \"y\"}");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ref().unwrap()["execute"], "y");
    }

    #[test]
    fn junk_without_brackets_is_skipped_to_the_line_end() {
        let mut s = Splitter::default();
        let junk = vec![b'A'; MAX_TEXT_BYTES + 10];
        let out = feed(&mut s, &junk);
        assert_eq!(out.len(), 1);
        assert_eq!(err_desc(&out[0]), "JSON token size limit exceeded");
        let out = feed(&mut s, b"AAAA\n{\"execute\": \"y\"}");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ref().unwrap()["execute"], "y");
    }

    #[test]
    fn deep_nesting() {
        // The deepest text accepted parses (serde_json's own limit is not reached).
        let depth = MAX_NESTING as usize;
        let mut s = Splitter::default();
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let out = feed(&mut s, text.as_bytes());
        assert!(out[0].is_ok(), "{:?}", out[0]);
        // ...and serde_json would refuse one level more.
        let text = format!("{}{}", "[".repeat(depth + 1), "]".repeat(depth + 1));
        assert!(serde_json::from_str::<Value>(&text).is_err());
        // One level more gets QEMU's error, once, however deep the text goes.
        let n = 100_000;
        let text = format!("{{\"a\": {}{}}}\n", "[".repeat(n), "]".repeat(n));
        let out = feed(&mut s, text.as_bytes());
        assert_eq!(out.len(), 1);
        assert_eq!(err_desc(&out[0]), "JSON nesting depth limit exceeded");
        assert_eq!(s.buffered(), 0);
        let out = feed(&mut s, b"{\"execute\": \"y\"}");
        assert_eq!(out[0].as_ref().unwrap()["execute"], "y");
    }

    #[test]
    fn token_count() {
        let mut s = Splitter::default();
        let mut text = b"[".to_vec();
        text.extend(b"1,".repeat(MAX_TOKENS));
        text.extend(b"1]{}");
        let out = feed(&mut s, &text);
        assert_eq!(out.len(), 2);
        assert_eq!(err_desc(&out[0]), "JSON token count limit exceeded");
        assert_eq!(out[1].as_ref().unwrap(), &json!({}));
        // Numbers and keywords are one token each, whatever their length.
        let text = format!("[{}1]", "123456789, true, ".repeat(MAX_TOKENS / 5));
        let out = feed(&mut s, text.as_bytes());
        assert!(out[0].is_ok());
    }

    #[test]
    fn invalid_utf8() {
        let mut s = Splitter::default();
        // In a string: bytes a string may hold, but not valid UTF-8.
        for bad in [
            &b"\xe9"[..],
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
        ] {
            let mut text = b"{\"execute\": \"a".to_vec();
            text.extend_from_slice(bad);
            text.extend_from_slice(b"\"}");
            let out = feed(&mut s, &text);
            assert_eq!(out.len(), 1);
            assert_eq!(
                err_desc(&out[0]),
                "JSON parse error, invalid UTF-8 sequence in string"
            );
        }
        // Valid UTF-8 is fine.
        let out = feed(&mut s, "{\"execute\": \"é\"}".as_bytes());
        assert_eq!(out[0].as_ref().unwrap()["execute"], "é");
        // 0xFF in a string, and a byte above 0x7F outside one, are stray bytes. The
        // rest of the text is then read afresh (as QEMU does).
        let out = feed(&mut s, b"{\"execute\": \"ab\xff\"}\n");
        assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\"ab\u{fffd}'");
        let out = feed(&mut s, b"{\"execute\": 1\xc3\xa9}\n");
        assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\u{fffd}'");
        assert_eq!(err_desc(&out[1]), "JSON parse error, expecting value");
        assert_eq!(out.len(), 2);
        let out = feed(&mut s, b"\xff\xfe\xff{\"execute\": \"y\"}");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap()["execute"], "y");
    }

    #[test]
    fn control_characters_reset_the_parser() {
        let mut s = Splitter::default();
        // A text that never ends...
        assert!(feed(&mut s, b"{\"execute\": [[[").is_empty());
        // ...is ended by a control character, which gets one error.
        let out = feed(&mut s, b"\x01\x01{\"execute\": \"y\"}");
        assert_eq!(out.len(), 2);
        assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\u{1}'");
        assert_eq!(out[1].as_ref().unwrap()["execute"], "y");
        // Inside a string too (JSON strings hold no raw control characters).
        let out = feed(&mut s, b"{\"execute\": \"a\tb\"}\n");
        assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\"a\t'");
        // While a text over a limit is being skipped, such a byte ends the skipping
        // without a second reply.
        let mut text = vec![b'['; MAX_NESTING as usize + 1];
        text.push(0xff);
        text.extend_from_slice(b"{\"execute\": \"z\"}");
        let out = feed(&mut s, &text);
        assert_eq!(out.len(), 2);
        assert_eq!(err_desc(&out[0]), "JSON nesting depth limit exceeded");
        assert_eq!(out[1].as_ref().unwrap()["execute"], "z");
    }

    #[test]
    fn long_strings_are_shortened_in_stray_errors() {
        let mut s = Splitter::default();
        let mut text = b"[\"".to_vec();
        text.extend(vec![b'x'; 1000]);
        text.push(0x02);
        let out = feed(&mut s, &text);
        let desc = err_desc(&out[0]);
        assert!(desc.len() < 120, "{desc}");
        assert!(desc.ends_with("...\u{2}'"), "{desc}");
    }
}
