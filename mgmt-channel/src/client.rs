//! A small blocking client of the daemon's API, for cardctl and tests:
//! one HTTP/1.1 request per connection (`Connection: close`), over the
//! unix socket or TCP with a bearer token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: String, token: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon's answer is not HTTP: {0}")]
    Protocol(String),
}

/// One answer: the status and the JSON body (Null when empty).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// `error.code` of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    /// Longest wait for an answer (an attach waits on the guest).
    pub timeout: Duration,
}

impl Client {
    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client {
            endpoint: Endpoint::Unix(path.into()),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Answer, ClientError> {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }
    pub fn delete(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("DELETE", path, None)
    }

    /// Sends `body` as it is (tests send malformed JSON this way).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, ClientError> {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Endpoint::Tcp {
            token: Some(token), ..
        } = &self.endpoint
        {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.unwrap_or(b"");
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let raw = match &self.endpoint {
            Endpoint::Unix(path) => {
                let mut s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
                    endpoint: path.display().to_string(),
                    source,
                })?;
                s.set_read_timeout(Some(self.timeout))?;
                exchange(&mut s, &request)?
            }
            Endpoint::Tcp { addr, .. } => {
                let mut s = TcpStream::connect(addr).map_err(|source| ClientError::Connect {
                    endpoint: addr.clone(),
                    source,
                })?;
                s.set_read_timeout(Some(self.timeout))?;
                exchange(&mut s, &request)?
            }
        };
        parse_answer(&raw)
    }
}

fn exchange<S: Read + Write>(stream: &mut S, request: &[u8]) -> Result<Vec<u8>, ClientError> {
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(raw)
}

fn parse_answer(raw: &[u8]) -> Result<Answer, ClientError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status_line = head.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {status_line:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("body is not JSON: {e}")))?
    };
    Ok(Answer { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::Protocol("bad chunk".into()))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ClientError::Protocol(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(ClientError::Protocol("short chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
