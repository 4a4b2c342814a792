//! A QMP client over a unix socket: the greeting and capability
//! negotiation, one command at a time, and the asynchronous events QEMU
//! sends in between, kept until someone waits for them.
//!
//! Blocking std I/O with timeouts: the daemon calls this from worker
//! threads. (The `qapi` crate's typed schema is generated from one QEMU
//! version, while we drive both 7.2 and 11.1, whose chardev options differ;
//! untyped JSON keeps one client for both.)

use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a command may take unless the caller says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept while nobody waits for them; the oldest go first.
const MAX_BUFFERED_EVENTS: usize = 1024;

/// A QMP message longer than this is refused rather than buffered without end.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to the QMP socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("QMP I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("QMP socket {path} closed by QEMU")]
    Closed { path: PathBuf },
    #[error("QMP protocol error on {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
    /// QEMU refused a command: its error class and description.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out after {after:?} waiting for {what} on {path}")]
    Timeout {
        path: PathBuf,
        what: String,
        after: Duration,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp, in microseconds since the epoch.
    pub timestamp_us: u64,
}

/// One message QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting {
        version: Value,
    },
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// Parses one line QEMU sent.
pub fn parse_message(line: &[u8]) -> Result<QmpMessage, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON ({e}): {}", show(line)))?;
    let Value::Object(obj) = value else {
        return Err(format!("not a JSON object: {}", show(line)));
    };
    let id = obj.get("id").cloned();
    if let Some(ret) = obj.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: ret.clone(),
        });
    }
    if let Some(err) = obj.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_string);
        return Ok(QmpMessage::Error {
            id,
            class: field("class").unwrap_or_else(|| "GenericError".into()),
            desc: field("desc").unwrap_or_else(|| err.to_string()),
        });
    }
    if let Some(name) = obj.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| format!("event name is not a string: {}", show(line)))?;
        let ts = obj.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64);
        let micros = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_u64);
        return Ok(QmpMessage::Event(QmpEvent {
            name: name.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: secs.unwrap_or(0) * 1_000_000 + micros.unwrap_or(0),
        }));
    }
    if let Some(qmp) = obj.get("QMP") {
        return Ok(QmpMessage::Greeting {
            version: qmp.get("version").cloned().unwrap_or(Value::Null),
        });
    }
    Err(format!("unknown QMP message: {}", show(line)))
}

fn show(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A connected, negotiated QMP session.
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a message not yet ended by a newline (a read timed out).
    partial: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    version: Value,
    command_timeout: Duration,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects, reads the greeting and enters command mode
    /// (`qmp_capabilities`). `timeout` bounds each step.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io_err = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let writer = stream.try_clone().map_err(io_err)?;
        writer.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut client = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            version: Value::Null,
            command_timeout: timeout,
        };
        let deadline = Instant::now() + timeout;
        // QEMU greets one client at a time; a second one waits unanswered.
        let greeting = "the QMP greeting (is another client connected?)";
        match client.read_message(deadline, greeting)? {
            QmpMessage::Greeting { version } => client.version = version,
            other => {
                return Err(client.protocol(format!("expected the greeting, got {other:?}")));
            }
        }
        client.execute("qmp_capabilities", json!({}))?;
        client.command_timeout = DEFAULT_COMMAND_TIMEOUT;
        Ok(client)
    }

    /// The `version` object of QEMU's greeting.
    pub fn version(&self) -> &Value {
        &self.version
    }

    /// QEMU's (major, minor) version, from the greeting.
    pub fn qemu_version(&self) -> Option<(u64, u64)> {
        let q = self.version.get("qemu")?;
        Some((q.get("major")?.as_u64()?, q.get("minor")?.as_u64()?))
    }

    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Runs one command and returns its `return` value; QEMU's refusal
    /// becomes [`QmpError::Command`] with its class and description.
    /// `args` may be `{}` or `null` for none.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.into()));
        match args {
            Value::Null => {}
            Value::Object(ref o) if o.is_empty() => {}
            Value::Object(_) => {
                request.insert("arguments".into(), args);
            }
            other => {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: "InvalidArguments".into(),
                    desc: format!("arguments must be a JSON object, not {other}"),
                })
            }
        }
        request.insert("id".into(), json!(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        tracing::debug!(path = %self.path.display(), %line, "QMP command");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.io(source))?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            match self.read_message(deadline, &format!("the answer to {command}"))? {
                QmpMessage::Event(event) => self.buffer_event(event),
                QmpMessage::Return { id: rid, value } if rid == Some(json!(id)) => {
                    return Ok(value)
                }
                QmpMessage::Error {
                    id: rid,
                    class,
                    desc,
                } if rid == Some(json!(id)) || rid.is_none() => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                // An answer to an earlier command that timed out: stale.
                QmpMessage::Return { .. } | QmpMessage::Error { .. } => {}
                QmpMessage::Greeting { .. } => {
                    return Err(self.protocol("a second greeting".into()));
                }
            }
        }
    }

    /// Waits for an event named `name` whose `data` satisfies `matches`,
    /// taking it from the buffer if it already came. Other events stay
    /// buffered.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(at) = self
            .events
            .iter()
            .position(|e| e.name == name && matches(&e.data))
        {
            return Ok(self.events.remove(at).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, &format!("event {name}"))? {
                QmpMessage::Event(e) if e.name == name && matches(&e.data) => return Ok(e),
                QmpMessage::Event(e) => self.buffer_event(e),
                // A late answer to a command that timed out.
                _ => {}
            }
        }
    }

    /// Reads whatever QEMU sent without waiting and returns every buffered
    /// event, oldest first.
    pub fn drain_events(&mut self) -> Result<Vec<QmpEvent>, QmpError> {
        loop {
            match self.read_message(Instant::now(), "events") {
                Ok(QmpMessage::Event(e)) => self.buffer_event(e),
                Ok(_) => {}
                Err(QmpError::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.events.drain(..).collect())
    }

    /// Drops buffered events named `name` whose data satisfies `matches`
    /// (a late event from an earlier, timed-out wait must not answer a new one).
    pub fn discard_events(&mut self, name: &str, matches: impl Fn(&Value) -> bool) {
        self.events
            .retain(|e| !(e.name == name && matches(&e.data)));
    }

    fn buffer_event(&mut self, event: QmpEvent) {
        if self.events.len() == MAX_BUFFERED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// The next whole message, or a timeout at `deadline`. A partial line
    /// survives a timeout, so no message is lost or torn.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<QmpMessage, QmpError> {
        loop {
            let now = Instant::now();
            // A zero read timeout means "block forever" to the kernel.
            let left = deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| self.io(source))?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return parse_message(&line).map_err(|detail| self.protocol(detail));
                }
                // EOF in the middle of a line.
                Ok(_) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            path: self.path.clone(),
                            what: what.into(),
                            after: left,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(self.io(source)),
            }
            if self.partial.len() > MAX_MESSAGE_BYTES {
                return Err(self.protocol(format!("a message over {MAX_MESSAGE_BYTES} bytes")));
            }
        }
    }

    fn io(&self, source: io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_message() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        match parse_message(greeting).unwrap() {
            QmpMessage::Greeting { version } => assert_eq!(version["qemu"]["major"], 7),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_message(br#"{"return": {}, "id": 3}"#).unwrap(),
            QmpMessage::Return {
                id: Some(json!(3)),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(
                br#"{"id": 4, "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#
            )
            .unwrap(),
            QmpMessage::Error {
                id: Some(json!(4)),
                class: "DeviceNotFound".into(),
                desc: "Device 'x' not found".into()
            }
        );
        let ev = br#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "DEVICE_DELETED", "data": {"device": "blk-vol-1", "path": "/machine/peripheral/blk-vol-1"}}"#;
        match parse_message(ev).unwrap() {
            QmpMessage::Event(e) => {
                assert_eq!(e.name, "DEVICE_DELETED");
                assert_eq!(e.data["device"], "blk-vol-1");
                assert_eq!(e.timestamp_us, 2_000_005);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_what_is_not_qmp() {
        for bad in [
            &b"not json"[..],
            b"[1, 2]",
            b"{\"something\": 1}",
            b"{\"event\": 5}",
        ] {
            assert!(parse_message(bad).is_err(), "{}", show(bad));
        }
    }

    /// Kills QEMU when a failing test unwinds.
    struct Qemu(std::process::Child);

    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A real QEMU (the host's, no guest: `-machine none`).
    fn qemu() -> Option<(Qemu, tempfile::TempDir, PathBuf)> {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("qemu-system-x86_64 not installed; skipping");
            return None;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Some((Qemu(child), dir, sock))
    }

    #[test]
    fn talks_to_a_real_qemu() {
        let Some((mut child, _dir, sock)) = qemu() else {
            return;
        };
        let mut qmp = QmpClient::connect(&sock, Duration::from_secs(10)).unwrap();
        assert!(qmp.qemu_version().is_some_and(|(major, _)| major >= 7));
        let status = qmp.execute("query-status", json!({})).unwrap();
        assert!(status["status"].is_string(), "{status}");

        // QEMU's refusals come back with their class, naming the device.
        match qmp.execute("device_del", json!({"id": "blk-vol-nothere"})) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "device_del");
                assert_eq!(class, "DeviceNotFound");
                assert!(desc.contains("blk-vol-nothere"), "{desc}");
            }
            other => panic!("{other:?}"),
        }
        match qmp.execute("no-such-command", json!({})) {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            qmp.execute("query-status", json!([1])),
            Err(QmpError::Command { .. })
        ));

        // Events that come while nobody waits are kept for wait_event.
        qmp.execute("stop", json!({})).unwrap();
        qmp.execute("cont", json!({})).unwrap();
        let resumed = qmp.wait_event("RESUME", |_| true, Duration::from_secs(5));
        assert!(resumed.is_ok(), "{resumed:?}");
        let stop = qmp.wait_event("STOP", |_| true, Duration::from_secs(5));
        assert!(stop.is_ok(), "{stop:?}");
        qmp.execute("stop", json!({})).unwrap();
        qmp.execute("query-status", json!({})).unwrap();
        qmp.discard_events("STOP", |_| true);
        let gone = qmp.wait_event("STOP", |_| true, Duration::from_millis(200));
        assert!(matches!(gone, Err(QmpError::Timeout { .. })), "{gone:?}");
        let none = qmp.wait_event("DEVICE_DELETED", |_| true, Duration::from_millis(200));
        assert!(matches!(none, Err(QmpError::Timeout { .. })), "{none:?}");

        qmp.execute("quit", json!({})).unwrap();
        child.0.wait().unwrap();
        assert!(matches!(
            qmp.execute("query-status", json!({})),
            Err(QmpError::Closed { .. } | QmpError::Io { .. })
        ));
    }

    #[test]
    fn a_second_client_is_told_it_got_no_greeting() {
        let Some((_child, _dir, sock)) = qemu() else {
            return;
        };
        let _first = QmpClient::connect(&sock, Duration::from_secs(10)).unwrap();
        match QmpClient::connect(&sock, Duration::from_millis(300)) {
            Err(QmpError::Timeout { what, .. }) => {
                assert!(what.contains("another client"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_socket_nobody_serves_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(&dir.path().join("none.sock"), Duration::from_secs(1));
        assert!(matches!(err, Err(QmpError::Connect { .. })), "{err:?}");
    }
}
