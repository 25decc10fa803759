//! One error type for the library: every message names what was wrong and where, on one line.

/// Everything that can go wrong between bytes on disk and a mask.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is missing a field, has the wrong type, or is inconsistent.
    #[error("invalid config: {0}")]
    Config(String),
    /// A checkpoint file could not be parsed, or its tensors do not fit the config.
    #[error("{0}")]
    Weights(String),
    /// The tokenizer files are missing or malformed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image could not be decoded or is unusable.
    #[error("image: {0}")]
    Image(String),
    /// A caller passed an argument the model cannot use.
    #[error("{0}")]
    Input(String),
    /// A share link is malformed, truncated or from an unknown version.
    #[error("link: {0}")]
    Link(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
