//! A minimal blocking HTTP/1.1 client for loopback servers (the daemon, Prometheus, Alertmanager), with
//! only `std`: tests must not depend on an HTTP stack of the code under test.

use std::io::{Error, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET path_and_query` from a loopback server; returns the status and the body (chunked bodies
/// reassembled: Prometheus chunks answers larger than its buffer). Any other address is refused.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    if !addr.ip().is_loopback() {
        return Err(Error::new(ErrorKind::InvalidInput, format!("{addr}: tests only contact loopback addresses")));
    }
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;

    let bad = |what: String| Error::new(ErrorKind::InvalidData, format!("GET {path_and_query} from {addr}: {what}"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("an answer without headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line in `{head}`")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body).map_err(bad)? } else { body.to_vec() };
    let body = String::from_utf8(body).map_err(|_| bad("a body that is not UTF-8".into()))?;
    Ok((status, body))
}

/// Decodes an HTTP/1.1 `Transfer-Encoding: chunked` body.
pub fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size `{size_text}`"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(format!("truncated chunk of {size} bytes"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters pass through).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_encoding_round_trips_promql_punctuation() {
        assert_eq!(percent_encode(r#"a{b=~".*"} / 2"#), "a%7Bb%3D~%22.%2A%22%7D%20%2F%202");
    }

    #[test]
    fn a_chunked_http_body_is_reassembled() {
        let body = b"4\r\n{\"a\"\r\n6;ext=1\r\n:true}\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).unwrap(), br#"{"a":true}"#);
        assert!(dechunk(b"9\r\nshort\r\n").is_err(), "a truncated chunk must be an error");
    }

    #[test]
    fn a_non_loopback_address_is_refused_before_connecting() {
        let err = http_get("192.0.2.1:80".parse().unwrap(), "/").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
