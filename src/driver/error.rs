//! Errors of the I/O layer.

use std::fmt;

/// Everything the driver can fail with.
#[derive(Debug)]
pub enum Error {
    /// The operating system refused an I/O operation (bind, register, send …).
    Io(std::io::Error),
    /// A handle refers to an entry that was closed (or belongs to another kind of entry).
    StaleHandle,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::StaleHandle => f.write_str("the handle was already closed"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
