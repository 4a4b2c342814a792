//! The card end of the management channel: a card's agent socket.
//!
//! The control plane (mgmt-channel) configures a card only through this
//! socket. It is a unix socket (mode 0600, bound before the card jails
//! itself) speaking JSON lines, one request and one answer per line:
//!
//! ```text
//! -> {"hello": {"version": 1}}
//! <- {"ok": {"version": 1, "card": "blk", "firmware": "0.1.0", "pid": 4242}}
//! -> {"fault_add": {"kind": "io_error", "scope": {"range": [0, 1048576]}}}
//! <- {"ok": {"id": "fault-1"}}
//! -> {"fault_clear": {"id": "nope"}}
//! <- {"error": {"code": "not_found", "message": "no fault with id nope"}}
//! ```
//!
//! The first line of a connection must be the hello, naming the protocol
//! version the client speaks; a card that speaks another one answers
//! `unsupported_version` and closes, as it closes on any other first line
//! (`hello_required`). After the hello every line is `{"<op>": {args}}`,
//! answered `{"ok": value}` or `{"error": {"code", "message"}}`. A malformed
//! or refused request changes nothing and the connection stays open.
//!
//! Every card answers `health` and `metrics`; the rest are the card's own
//! ([`AgentHandler`]). [`AgentClient`] is the other end, for the control plane
//! and tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::socket::{claim_socket_path, SocketPathError};

/// The protocol version this firmware speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// Longest request line a card reads; a longer one is refused unread.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Longest answer line the client accepts (a networking card's metrics
/// document grows with its ENIs).
const MAX_ANSWER_LINE: usize = 16 << 20;

// ---- what goes over the wire ---------------------------------------------------------------

/// Which card answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardKind {
    /// The EBS-style block card (`vhost-blk-backend`).
    Blk,
    /// The local-NVMe card (`nvme-emulator`).
    Nvme,
    /// The networking card (`vhost-net-backend`).
    Net,
}

/// The card's answer to the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardHello {
    pub version: u64,
    pub card: CardKind,
    /// The card crate's version.
    pub firmware: String,
    pub pid: u32,
}

/// The error codes a card answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not one object with one key, an unknown operation, a line too long.
    BadRequest,
    /// Well-formed but refused: a value out of range, a fault the card cannot apply.
    Invalid,
    /// Names something the card does not have.
    NotFound,
    UnsupportedVersion,
    HelloRequired,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
        }
    }
}

/// A request the card refused (its error answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    fn to_json(&self) -> Value {
        json!({ "error": { "code": self.code.as_str(), "message": self.message } })
    }
}

// ---- the card side -----------------------------------------------------------------------

/// A card's operations. `health` and the hello are answered by this module;
/// everything else (`metrics` included) comes here.
pub trait AgentHandler: Send + Sync + 'static {
    fn card(&self) -> CardKind;
    /// The card crate's version (`env!("CARGO_PKG_VERSION")` in the card).
    fn firmware(&self) -> &str;
    /// One operation: `op` is the request's single key, `args` its value.
    fn handle(&self, op: &str, args: &Value) -> Result<Value, OpError>;
}

#[derive(Debug, thiserror::Error)]
pub enum AgentSocketError {
    #[error(transparent)]
    Path(#[from] SocketPathError),
    #[error("agent socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (0600). A card that jails itself binds first, enters its
/// sandbox, then calls [`AgentListener::serve`]: the jail has no paths left
/// to bind in.
pub fn bind(path: &Path) -> Result<AgentListener, AgentSocketError> {
    let io_err = |source| AgentSocketError::Io {
        path: path.to_owned(),
        source,
    };
    claim_socket_path(path)?;
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(AgentListener {
        listener,
        path: path.to_owned(),
        started: Instant::now(),
    })
}

/// A bound agent socket, not yet served.
pub struct AgentListener {
    listener: UnixListener,
    path: PathBuf,
    /// When the card started, as far as `health` tells (the socket is bound
    /// during startup).
    started: Instant,
}

impl AgentListener {
    /// Serves the socket on a background thread, a thread per connection.
    pub fn serve(self, handler: Arc<dyn AgentHandler>) -> Result<(), AgentSocketError> {
        let AgentListener {
            listener,
            path,
            started,
        } = self;
        thread::Builder::new()
            .name("agent".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let handler = handler.clone();
                    let _ = thread::Builder::new()
                        .name("agent-conn".into())
                        .spawn(move || {
                            Session::new(handler.as_ref(), started).serve(stream);
                        });
                }
            })
            .map_err(|source| AgentSocketError::Io { path, source })?;
        Ok(())
    }
}

/// Binds and serves at once (a card that does not jail itself, and tests).
pub fn spawn(path: &Path, handler: Arc<dyn AgentHandler>) -> Result<(), AgentSocketError> {
    bind(path)?.serve(handler)
}

/// What a line does to the connection after its answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    KeepOpen,
    Close,
}

/// One connection's protocol state: answers lines, the hello first.
///
/// Public so the fuzz target drives exactly what the socket runs.
pub struct Session<'a> {
    handler: &'a dyn AgentHandler,
    started: Instant,
    greeted: bool,
}

impl<'a> Session<'a> {
    pub fn new(handler: &'a dyn AgentHandler, started: Instant) -> Self {
        Self {
            handler,
            started,
            greeted: false,
        }
    }

    fn serve(mut self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(MAX_REQUEST_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let (answer, next) = if line.len() > MAX_REQUEST_LINE && !line.ends_with(b"\n") {
                // Skip the rest of the oversized line, unread, before answering.
                if skip_line(&mut reader).is_err() {
                    return;
                }
                self.oversized()
            } else {
                self.answer(&line)
            };
            let mut text = answer.to_string();
            text.push('\n');
            if writer.write_all(text.as_bytes()).is_err() || next == Next::Close {
                return;
            }
        }
    }

    /// The answer to a line longer than [`MAX_REQUEST_LINE`].
    pub fn oversized(&mut self) -> (Value, Next) {
        let e = OpError::bad_request(format!("request line longer than {MAX_REQUEST_LINE} bytes"));
        (e.to_json(), self.next_after_error())
    }

    /// Before the hello, any error ends the connection.
    fn next_after_error(&self) -> Next {
        if self.greeted {
            Next::KeepOpen
        } else {
            Next::Close
        }
    }

    /// The answer to one request line (without or with its newline).
    pub fn answer(&mut self, line: &[u8]) -> (Value, Next) {
        let request = parse_request(line);
        if !self.greeted {
            return match request {
                Ok((op, args)) if op == "hello" => match self.hello(&args) {
                    Ok(hello) => {
                        self.greeted = true;
                        (json!({ "ok": hello }), Next::KeepOpen)
                    }
                    Err(e) => (e.to_json(), Next::Close),
                },
                Ok((op, _)) => (
                    OpError::new(
                        ErrorCode::HelloRequired,
                        format!(
                            "say {{\"hello\": {{\"version\": {PROTOCOL_VERSION}}}}} first, not {op:?}"
                        ),
                    )
                    .to_json(),
                    Next::Close,
                ),
                Err(e) => (
                    OpError::new(
                        ErrorCode::HelloRequired,
                        format!(
                            "say {{\"hello\": {{\"version\": {PROTOCOL_VERSION}}}}} first ({})",
                            e.message
                        ),
                    )
                    .to_json(),
                    Next::Close,
                ),
            };
        }
        let result = request.and_then(|(op, args)| match op.as_str() {
            "hello" => Err(OpError::bad_request("hello was already said")),
            "health" => Ok(json!({
                "status": "ok",
                "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })),
            _ => self.handler.handle(&op, &args),
        });
        match result {
            Ok(value) => (json!({ "ok": value }), Next::KeepOpen),
            Err(e) => (e.to_json(), Next::KeepOpen),
        }
    }

    fn hello(&self, args: &Value) -> Result<CardHello, OpError> {
        let version = args.get("version").ok_or_else(|| {
            OpError::bad_request("hello takes {\"version\": N}, the protocol version spoken")
        })?;
        if version.as_u64() != Some(PROTOCOL_VERSION) {
            return Err(OpError::new(
                ErrorCode::UnsupportedVersion,
                format!("card speaks agent protocol {PROTOCOL_VERSION}, not {version}"),
            ));
        }
        Ok(CardHello {
            version: PROTOCOL_VERSION,
            card: self.handler.card(),
            firmware: self.handler.firmware().to_owned(),
            pid: std::process::id(),
        })
    }
}

/// A request line: one JSON object with exactly one key, the operation.
fn parse_request(line: &[u8]) -> Result<(String, Value), OpError> {
    let request: Value =
        serde_json::from_slice(line).map_err(|e| OpError::bad_request(format!("not JSON: {e}")))?;
    let Value::Object(object) = request else {
        return Err(OpError::bad_request(
            "a request is an object with exactly one key, the operation",
        ));
    };
    if object.len() != 1 {
        return Err(OpError::bad_request(
            "a request is an object with exactly one key, the operation",
        ));
    }
    let (op, args) = object.into_iter().next().expect("one key");
    Ok((op, args))
}

fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        reader.consume(n);
    }
}

// ---- the control plane side --------------------------------------------------------------

/// What can go wrong talking to a card's agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent socket {path}: no answer to {op} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        op: String,
        timeout: Duration,
    },
    #[error("agent socket {path}: the card closed the connection")]
    Closed { path: PathBuf },
    #[error("agent socket {path}: not an agent protocol answer: {problem}")]
    Protocol { path: PathBuf, problem: String },
    /// The card answered with an error.
    #[error("card refused: {code}: {message}")]
    Card { code: String, message: String },
}

/// A connection to a card's agent, past the hello.
pub struct AgentClient {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    hello: CardHello,
    /// A call timed out or failed halfway: its answer may still arrive, so
    /// the connection cannot be trusted to pair answers with requests.
    broken: bool,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("path", &self.path)
            .field("card", &self.hello)
            .finish()
    }
}

impl AgentClient {
    /// Connects and says hello. `timeout` bounds each answer awaited (the
    /// hello's and every call's).
    pub fn connect(path: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let io_err = |source| AgentError::Io {
            path: path.to_owned(),
            source,
        };
        // A zero timeout would mean "block forever" to the socket.
        let timeout = timeout.max(Duration::from_millis(1));
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut client = AgentClient {
            path: path.to_owned(),
            timeout,
            reader: BufReader::new(stream),
            writer,
            hello: CardHello {
                version: 0,
                card: CardKind::Blk,
                firmware: String::new(),
                pid: 0,
            },
            broken: false,
        };
        let hello = client.call("hello", json!({ "version": PROTOCOL_VERSION }))?;
        client.hello = serde_json::from_value(hello).map_err(|e| AgentError::Protocol {
            path: path.to_owned(),
            problem: format!("hello answer: {e}"),
        })?;
        Ok(client)
    }

    /// Who answered the hello.
    pub fn card(&self) -> &CardHello {
        &self.hello
    }

    /// One request; its `ok` value, or the card's error as [`AgentError::Card`].
    pub fn call(&mut self, op: &str, args: Value) -> Result<Value, AgentError> {
        if self.broken {
            return Err(AgentError::Closed {
                path: self.path.clone(),
            });
        }
        // Until the answer is read, a failure leaves the connection unusable.
        self.broken = true;
        let mut text = json!({ op: args }).to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| self.io_error(op, e))?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_ANSWER_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io_error(op, e))?;
        if n == 0 {
            return Err(AgentError::Closed {
                path: self.path.clone(),
            });
        }
        if line.len() > MAX_ANSWER_LINE {
            return Err(self.protocol(format!("answer longer than {MAX_ANSWER_LINE} bytes")));
        }
        let answer: Value = serde_json::from_slice(&line)
            .map_err(|e| self.protocol(format!("answer is not JSON: {e}")))?;
        self.broken = false;
        if let Some(ok) = answer.get("ok") {
            return Ok(ok.clone());
        }
        let error = answer
            .get("error")
            .ok_or_else(|| self.protocol("answer holds neither ok nor error".into()))?;
        let code = error.get("code").and_then(Value::as_str);
        let message = error.get("message").and_then(Value::as_str);
        match (code, message) {
            (Some(code), Some(message)) => Err(AgentError::Card {
                code: code.to_owned(),
                message: message.to_owned(),
            }),
            _ => Err(self.protocol(format!("error without code and message: {error}"))),
        }
    }

    fn io_error(&self, op: &str, source: std::io::Error) -> AgentError {
        match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => AgentError::Timeout {
                path: self.path.clone(),
                op: op.to_owned(),
                timeout: self.timeout,
            },
            _ => AgentError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    fn protocol(&self, problem: String) -> AgentError {
        AgentError::Protocol {
            path: self.path.clone(),
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A card whose one operation echoes its arguments and `invalid` refuses.
    struct Echo;
    impl AgentHandler for Echo {
        fn card(&self) -> CardKind {
            CardKind::Blk
        }
        fn firmware(&self) -> &str {
            "9.9.9"
        }
        fn handle(&self, op: &str, args: &Value) -> Result<Value, OpError> {
            match op {
                "echo" => Ok(args.clone()),
                "metrics" => Ok(json!({"requests": 0})),
                "refuse" => Err(OpError::invalid("no")),
                _ => Err(OpError::bad_request(format!("unknown operation {op}"))),
            }
        }
    }

    fn card() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        spawn(&path, Arc::new(Echo)).unwrap();
        (dir, path)
    }

    /// A raw connection: sends lines, reads answers.
    struct Raw {
        writer: UnixStream,
        reader: BufReader<UnixStream>,
    }
    impl Raw {
        fn new(path: &Path) -> Raw {
            let stream = UnixStream::connect(path).unwrap();
            stream.set_read_timeout(Some(T)).unwrap();
            Raw {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }
        fn send(&mut self, line: &[u8]) -> Value {
            self.writer.write_all(line).unwrap();
            self.writer.write_all(b"\n").unwrap();
            let mut reply = String::new();
            self.reader.read_line(&mut reply).unwrap();
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"))
        }
        /// Whether the card closed the connection (EOF on the next read).
        fn closed(&mut self) -> bool {
            let mut rest = String::new();
            matches!(self.reader.read_line(&mut rest), Ok(0))
        }
    }

    #[test]
    fn hello_then_operations() {
        let (_dir, path) = card();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut client = AgentClient::connect(&path, T).unwrap();
        assert_eq!(
            client.card(),
            &CardHello {
                version: 1,
                card: CardKind::Blk,
                firmware: "9.9.9".into(),
                pid: std::process::id(),
            }
        );
        assert_eq!(
            client.call("echo", json!({"a": 1})).unwrap(),
            json!({"a": 1})
        );
        let health = client.call("health", json!({})).unwrap();
        assert_eq!(health["status"], "ok");
        assert!(health["uptime_ms"].is_u64(), "{health}");
        match client.call("refuse", json!({})) {
            Err(AgentError::Card { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("invalid", "no"))
            }
            other => panic!("{other:?}"),
        }
        // A refused request leaves the connection usable.
        assert_eq!(client.call("echo", json!(5)).unwrap(), json!(5));
    }

    #[test]
    fn the_hello_answer_is_exactly_the_documented_one() {
        let (_dir, path) = card();
        let mut raw = Raw::new(&path);
        let answer = raw.send(br#"{"hello": {"version": 1}}"#);
        assert_eq!(
            answer,
            json!({"ok": {"version": 1, "card": "blk", "firmware": "9.9.9", "pid": std::process::id()}})
        );
        let again = raw.send(br#"{"hello": {"version": 1}}"#);
        assert_eq!(again["error"]["code"], "bad_request");
        assert_eq!(raw.send(br#"{"echo": 1}"#), json!({"ok": 1}));
    }

    #[test]
    fn a_wrong_version_is_refused_and_the_connection_closed() {
        let (_dir, path) = card();
        let mut raw = Raw::new(&path);
        let answer = raw.send(br#"{"hello": {"version": 7}}"#);
        assert_eq!(
            answer,
            json!({"error": {"code": "unsupported_version", "message": "card speaks agent protocol 1, not 7"}})
        );
        assert!(raw.closed());
    }

    #[test]
    fn an_operation_before_hello_is_refused_and_the_connection_closed() {
        let (_dir, path) = card();
        for first in [
            &br#"{"metrics": {}}"#[..],
            br#"{"health": {}}"#,
            b"not json",
        ] {
            let mut raw = Raw::new(&path);
            let answer = raw.send(first);
            assert_eq!(answer["error"]["code"], "hello_required", "{answer}");
            assert!(raw.closed());
        }
        // A hello without a version is no hello either.
        let mut raw = Raw::new(&path);
        assert_eq!(
            raw.send(br#"{"hello": {}}"#)["error"]["code"],
            "bad_request"
        );
        assert!(raw.closed());
    }

    #[test]
    fn malformed_requests_get_errors_and_the_connection_stays_open() {
        let (_dir, path) = card();
        let mut raw = Raw::new(&path);
        raw.send(br#"{"hello": {"version": 1}}"#);
        for garbage in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"a":1,"b":2}"#,
            b"{}",
            br#"{"nope": {}}"#,
            b"\xff\xfe",
        ] {
            let answer = raw.send(garbage);
            assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
        }
        assert_eq!(raw.send(br#"{"echo": 5}"#), json!({"ok": 5}));
    }

    #[test]
    fn an_oversized_line_is_refused_unread_and_the_next_one_answered() {
        let (_dir, path) = card();
        let mut raw = Raw::new(&path);
        raw.send(br#"{"hello": {"version": 1}}"#);
        // Valid JSON, so only its length can be what is refused.
        let big = format!("{{\"echo\": \"{}\"}}", "x".repeat(MAX_REQUEST_LINE + 10));
        let answer = raw.send(big.as_bytes());
        assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("longer"),
            "{answer}"
        );
        assert_eq!(raw.send(br#"{"echo": 6}"#), json!({"ok": 6}));
        // Just under the limit is served.
        let fits = format!("{{\"echo\": \"{}\"}}", "y".repeat(MAX_REQUEST_LINE - 20));
        assert_eq!(
            raw.send(fits.as_bytes())["ok"].as_str().unwrap().len(),
            MAX_REQUEST_LINE - 20
        );
    }

    #[test]
    fn the_client_reports_a_refused_hello_and_a_missing_card() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        assert!(matches!(
            AgentClient::connect(&path, T),
            Err(AgentError::Connect { .. })
        ));
        // A peer that never answers: the hello times out.
        let _listener = UnixListener::bind(&path).unwrap();
        match AgentClient::connect(&path, Duration::from_millis(50)) {
            Err(AgentError::Timeout { op, .. }) => assert_eq!(op, "hello"),
            other => panic!("{other:?}"),
        }
    }
}
