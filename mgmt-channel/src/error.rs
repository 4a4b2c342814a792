//! The API's one error shape: `{"error": {"code", "message", "field"?}}` with
//! the HTTP status that goes with the code.

use serde::Serialize;
use utoipa::ToSchema;

/// What went wrong, as an HTTP status and a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed JSON, an unknown or missing field, a value of the wrong type.
    BadRequest,
    /// A well-formed value out of range (size 0, IOPS above the type's maximum).
    InvalidValue,
    NotFound,
    /// The request contradicts the current state (a double attach, deleting
    /// a volume in use).
    Conflict,
    Unauthorized,
    Forbidden,
    /// A card or VMM did not do what it was asked.
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::InvalidValue => 422,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error answered to a caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when one is.
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            field: None,
        }
    }
    /// A value out of range in `field`; the message names it.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::InvalidValue,
            message: format!("`{field}`: {}", message.into()),
            field: Some(field.to_string()),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("no {what} {id}"))
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// Names `field` as the one at fault, in `field` and in the message.
    pub fn with_field(mut self, field: &str) -> Self {
        if !self.message.contains(field) {
            self.message = format!("`{field}`: {}", self.message);
        }
        self.field = Some(field.to_string());
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.kind.code().to_string(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(format!("state database: {e}"))
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `invalid_value`, `not_found`, `conflict`,
    /// `unauthorized`, `forbidden`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
    /// The request field at fault (a JSON path such as `iops`), when one is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub field: Option<String>,
}
