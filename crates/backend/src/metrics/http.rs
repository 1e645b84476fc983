//! The HTTP side of the metrics endpoint: one request per connection (`Connection:
//! close`), `GET` or `HEAD /metrics` only. A request's head must arrive within
//! [`REQUEST_TIMEOUT`] and fit in [`MAX_REQUEST_BYTES`]; anything else gets an error
//! status and the connection is closed. Request bodies are not read.

use blocklayer::nbd_stream::Stream;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

/// The most bytes of a request's head (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client may take to send its request, and each write of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After an error answer, what the client still sends is read and dropped (up to this
/// much, for this long) before the connection is closed, so that the close does not
/// reset the connection before the client has read the answer.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request head is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("the request did not arrive within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("the client closed the connection")]
    Closed,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("HTTP version not supported")]
    Version,
}

impl RequestError {
    /// The status line's code and reason, if the client should get one.
    fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            RequestError::TooLarge => Some((431, "Request Header Fields Too Large")),
            RequestError::Timeout => Some((408, "Request Timeout")),
            RequestError::Closed => None,
            RequestError::Malformed(_) => Some((400, "Bad Request")),
            RequestError::Version => Some((505, "HTTP Version Not Supported")),
        }
    }
}

/// A parsed request line (headers are checked for form only).
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The target's path, without a query.
    pub path: String,
}

/// Where the request head ends (after its empty line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Reads a request head, by `deadline`.
fn read_head(stream: &mut Stream, deadline: Instant) -> Result<Vec<u8>, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout);
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(RequestError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RequestError::Timeout)
            }
            Err(_) => return Err(RequestError::Closed),
        };
        // Only the new bytes (and the three before them) can complete the end.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(buf);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge);
        }
    }
}

/// A token (RFC 9110 `tchar`s).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a request head.
pub fn parse(head: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(head).map_err(|_| RequestError::Malformed("not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(
            "the request line is not METHOD TARGET VERSION",
        ));
    };
    if !is_token(method) {
        return Err(RequestError::Malformed("bad method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(RequestError::Malformed("bad target"));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(RequestError::Version),
        _ => return Err(RequestError::Malformed("bad version")),
    }
    for header in lines.take_while(|l| !l.is_empty()) {
        match header.split_once(':') {
            Some((name, _)) if is_token(name) => {}
            _ => return Err(RequestError::Malformed("bad header line")),
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// An answer to send.
struct Response {
    status: (u16, &'static str),
    content_type: &'static str,
    extra: &'static str,
    body: String,
    /// `HEAD`: the headers only.
    head_only: bool,
}

impl Response {
    fn text(status: (u16, &'static str), body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: body.into(),
            head_only: false,
        }
    }

    fn send(&self, stream: &mut Stream) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: \
             close\r\n\r\n",
            self.status.0,
            self.status.1,
            self.content_type,
            self.body.len(),
            self.extra
        );
        stream.write_all(head.as_bytes())?;
        if !self.head_only {
            stream.write_all(self.body.as_bytes())?;
        }
        Ok(())
    }
}

/// Reads and drops what the client still sends (bounded), then closes.
fn drain_and_close(mut stream: Stream) {
    stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + DRAIN_TIME;
    let mut left = DRAIN_BYTES;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let t = deadline.saturating_duration_since(Instant::now());
        if t.is_zero() || stream.set_read_timeout(Some(t)).is_err() {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Serves one connection: reads its request and answers it, `scrape` giving the
/// metrics text (or why there is none now).
pub fn serve(mut stream: Stream, scrape: impl FnOnce() -> Result<String, String>) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let request = read_head(&mut stream, deadline).and_then(|h| parse(&h));
    let response = match request {
        Err(e) => match e.status() {
            Some(status) => {
                log::debug!("metrics: {e}");
                Response::text(status, format!("{e}\n"))
            }
            None => return,
        },
        Ok(r) if r.path != "/metrics" => {
            Response::text((404, "Not Found"), "only /metrics is served here\n")
        }
        Ok(r) if r.method != "GET" && r.method != "HEAD" => Response {
            extra: "Allow: GET, HEAD\r\n",
            ..Response::text((405, "Method Not Allowed"), "only GET and HEAD\n")
        },
        Ok(r) => match scrape() {
            Ok(body) => Response {
                content_type: super::exposition::CONTENT_TYPE,
                head_only: r.method == "HEAD",
                ..Response::text((200, "OK"), body)
            },
            Err(why) => Response::text((503, "Service Unavailable"), format!("{why}\n")),
        },
    };
    if response.send(&mut stream).is_ok() {
        let _ = stream.flush();
    }
    drain_and_close(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines_and_headers() {
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"),
            Ok(Request {
                method: "GET".into(),
                path: "/metrics".into()
            })
        );
        assert_eq!(
            parse(b"HEAD / HTTP/1.0\n\n").map(|r| r.path),
            Ok("/".to_string())
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(RequestError::Malformed(_))),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"GET /metrics HTTP/2.0\r\n\r\n"),
            Err(RequestError::Version)
        );
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
