//! Errors and exit codes: scripts can tell a usage error from an auth error, a conflict or a
//! network failure.

use std::process::ExitCode;

/// What kind of failure, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else (exit 1).
    Failure,
    /// Bad arguments or local input: missing file, bad key (exit 2, like clap's).
    Usage,
    /// 401/403 from the coordinator (exit 3).
    Auth,
    /// 409: already published, version_code not greater (exit 4).
    Conflict,
    /// The coordinator could not be reached (exit 5).
    Network,
    /// The coordinator refused the content: bad signature, missing chunks (exit 6).
    Rejected,
    /// A verification failed locally: tampered export, wrong image (exit 7).
    Verify,
}

/// A CLI error: a message that says what to do next, and its kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Kind.
    pub kind: Kind,
    /// Message.
    pub message: String,
}

impl CliError {
    /// New error.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// Usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }

    /// Failure.
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(Kind::Failure, message)
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self.kind {
            Kind::Failure => 1,
            Kind::Usage => 2,
            Kind::Auth => 3,
            Kind::Conflict => 4,
            Kind::Network => 5,
            Kind::Rejected => 6,
            Kind::Verify => 7,
        })
    }

    /// Stable name for `--json` output.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Failure => "failure",
            Kind::Usage => "usage",
            Kind::Auth => "auth",
            Kind::Conflict => "conflict",
            Kind::Network => "network",
            Kind::Rejected => "rejected",
            Kind::Verify => "verify",
        }
    }
}

/// Result alias.
pub type CliResult<T> = Result<T, CliError>;

/// Adds context to I/O errors on a path.
pub fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound { Kind::Usage } else { Kind::Failure };
        CliError::new(kind, format!("{}: {e}", path.display()))
    }
}
