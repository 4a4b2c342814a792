//! A card's local control socket.
//!
//! Until the control plane (mgmt-channel) talks to cards over their agent
//! sockets, a card can be given `--control PATH`: a unix socket (mode 0600)
//! that takes one JSON request per line and answers one JSON line, e.g.
//!
//! ```text
//! {"fault_add": {"kind": "io_error", "scope": {"range": [0, 1048576]}}}
//! {"ok": {"id": "fault-1"}}
//! {"fault_clear": {"id": "nope"}}
//! {"error": {"code": "not_found", "message": "no fault with id nope"}}
//! ```
//!
//! A malformed request gets an error answer and changes nothing; the
//! connection stays open for the next line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use serde_json::{json, Value};

use crate::socket::{claim_socket_path, SocketPathError};

/// Longest request line accepted; anything longer is refused unread.
const MAX_LINE: usize = 64 * 1024;

/// An error answered to a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub code: String,
    pub message: String,
}

impl ControlError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// Handles one request: the single key of the request object names the
/// operation, its value holds the arguments.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, op: &str, args: &Value) -> Result<Value, ControlError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error(transparent)]
    Path(#[from] SocketPathError),
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (0600) and serves it on a background thread.
pub fn spawn(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<(), ControlSocketError> {
    bind(path)?.serve(handler)
}

/// Binds `path` (0600). A card that jails itself binds first, enters its
/// sandbox, then calls [`ControlListener::serve`].
pub fn bind(path: &Path) -> Result<ControlListener, ControlSocketError> {
    let io_err = |source| ControlSocketError::Io {
        path: path.display().to_string(),
        source,
    };
    claim_socket_path(path)?;
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(ControlListener {
        listener,
        path: path.display().to_string(),
    })
}

/// A bound control socket, not yet served.
pub struct ControlListener {
    listener: UnixListener,
    path: String,
}

impl ControlListener {
    /// Serves the socket on a background thread, a thread per connection.
    pub fn serve(self, handler: Arc<dyn ControlHandler>) -> Result<(), ControlSocketError> {
        let ControlListener { listener, path } = self;
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let handler = handler.clone();
                    let _ = thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve_connection(stream, handler.as_ref()));
                }
            })
            .map_err(|source| ControlSocketError::Io { path, source })?;
        Ok(())
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn ControlHandler) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE {
            // Drop the rest of the oversized line before answering.
            let mut rest = Vec::new();
            let _ = reader.read_until(b'\n', &mut rest);
            error_json(&ControlError::new("too_large", "request line too long"))
        } else {
            answer(&line, handler)
        };
        let mut text = answer.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(line: &[u8], handler: &dyn ControlHandler) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_json(&ControlError::new("bad_json", e.to_string())),
    };
    let Some(object) = request.as_object().filter(|o| o.len() == 1) else {
        return error_json(&ControlError::new(
            "bad_request",
            "a request is an object with exactly one key, the operation",
        ));
    };
    let (op, args) = object.iter().next().expect("one key");
    match handler.handle(op, args) {
        Ok(value) => json!({ "ok": value }),
        Err(e) => error_json(&e),
    }
}

fn error_json(e: &ControlError) -> Value {
    json!({ "error": { "code": e.code, "message": e.message } })
}

/// Sends one request and returns its `ok` value (client side, for tests and tools).
pub fn request(path: &Path, op: &str, args: Value) -> std::io::Result<Result<Value, ControlError>> {
    let stream = UnixStream::connect(path)?;
    let mut writer = stream.try_clone()?;
    let mut text = json!({ op: args }).to_string();
    text.push('\n');
    writer.write_all(text.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let reply: Value = serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if let Some(ok) = reply.get("ok") {
        return Ok(Ok(ok.clone()));
    }
    let code = reply["error"]["code"].as_str().unwrap_or("unknown");
    let message = reply["error"]["message"].as_str().unwrap_or("");
    Ok(Err(ControlError::new(code, message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl ControlHandler for Echo {
        fn handle(&self, op: &str, args: &Value) -> Result<Value, ControlError> {
            match op {
                "echo" => Ok(args.clone()),
                _ => Err(ControlError::new(
                    "bad_request",
                    format!("unknown operation {op}"),
                )),
            }
        }
    }

    #[test]
    fn answers_each_line_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        spawn(&path, Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            request(&path, "echo", json!({"a": 1})).unwrap(),
            Ok(json!({"a": 1}))
        );
        let err = request(&path, "nope", json!({})).unwrap().unwrap_err();
        assert_eq!(err.code, "bad_request");

        let stream = UnixStream::connect(&path).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        for garbage in ["not json\n", "[1,2]\n", "{\"a\":1,\"b\":2}\n"] {
            w.write_all(garbage.as_bytes()).unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            assert!(reply.contains("\"error\""), "{reply}");
        }
        w.write_all(b"{\"echo\": 5}\n").unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "{\"ok\":5}");
    }
}
