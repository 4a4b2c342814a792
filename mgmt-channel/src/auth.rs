//! Who is calling, and what they may do. On the unix socket the caller is
//! the peer's uid (SO_PEERCRED) and may do anything: the socket is 0600, so
//! only its owner reaches it. On TCP the caller is the bearer token's name,
//! from the tokens file (`NAME SECRET read|write` per line).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Describe and list.
    Read,
    /// Everything.
    Write,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `uid:1000` on the unix socket, `token:NAME` on TCP.
    pub name: String,
    pub access: Access,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    secret: String,
    pub access: Access,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Tokens shorter than this are refused: they could be guessed.
const MIN_SECRET_LEN: usize = 16;

/// Parses a tokens file: `NAME SECRET read|write` per line; `#` comments and
/// blank lines are skipped.
pub fn load_tokens(path: &Path) -> Result<Vec<Token>, TokensError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_tokens(&text).map_err(|(line, message)| TokensError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    })
}

fn parse_tokens(text: &str) -> Result<Vec<Token>, (usize, String)> {
    let mut tokens: Vec<Token> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, secret, access] = fields[..] else {
            return Err((n + 1, "expected `NAME SECRET read|write`".into()));
        };
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            other => return Err((n + 1, format!("access {other:?} is not read or write"))),
        };
        if secret.len() < MIN_SECRET_LEN {
            return Err((
                n + 1,
                format!("token {name}: the secret must be at least {MIN_SECRET_LEN} characters"),
            ));
        }
        if tokens.iter().any(|t| t.name == name || t.secret == secret) {
            return Err((n + 1, format!("token {name}: name or secret used twice")));
        }
        tokens.push(Token {
            name: name.to_string(),
            secret: secret.to_string(),
            access,
        });
    }
    Ok(tokens)
}

/// The token an `Authorization: Bearer SECRET` header names, if any.
pub fn check_bearer<'a>(tokens: &'a [Token], header: Option<&str>) -> Option<&'a Token> {
    let secret = header?.strip_prefix("Bearer ")?.trim();
    // Compare every token in full so the time taken does not tell which
    // prefix matched.
    let mut found = None;
    for token in tokens {
        if constant_time_eq(token.secret.as_bytes(), secret.as_bytes()) {
            found = Some(token);
        }
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub time_ms: u64,
    pub caller: &'a str,
    /// `POST /v1/volumes`.
    pub call: String,
    /// The HTTP status answered.
    pub status: u16,
    /// `ok` or the error code.
    pub result: &'a str,
}

/// The audit log: JSON lines, appended, flushed per record.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, record: &AuditRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "encoding an audit record");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!(error = %e, "writing the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_lines_and_bearer_check() {
        let tokens = parse_tokens(
            "# ops\nalice aaaaaaaaaaaaaaaaaaaa write\n\nbob bbbbbbbbbbbbbbbbbbbb read\n",
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        let bob = check_bearer(&tokens, Some("Bearer bbbbbbbbbbbbbbbbbbbb")).unwrap();
        assert_eq!((bob.name.as_str(), bob.access), ("bob", Access::Read));
        assert!(check_bearer(&tokens, Some("Bearer bbbb")).is_none());
        assert!(check_bearer(&tokens, Some("bbbbbbbbbbbbbbbbbbbb")).is_none());
        assert!(check_bearer(&tokens, None).is_none());
        assert_eq!(parse_tokens("a short write").unwrap_err().0, 1);
        assert_eq!(
            parse_tokens("a aaaaaaaaaaaaaaaaaaaa admin").unwrap_err().0,
            1
        );
        assert_eq!(parse_tokens("\na aaaaaaaaaaaaaaaaaaaa").unwrap_err().0, 2);
    }
}
