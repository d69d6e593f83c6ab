//! The one error type of the library. Every message says what went wrong and, where there is one,
//! what to do about it: these strings reach users of the `kiln` command unchanged.

use std::fmt;

/// Result with kiln's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kiln.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter (hardware or software) could be found.
    #[error(
        "no GPU adapter found (wgpu looked on: {backends}).\n\
         Install a GPU driver with Vulkan, Metal or DX12 support, or on Debian/Ubuntu the software \
         Vulkan driver:\n    apt-get update && apt-get install -y mesa-vulkan-drivers libvulkan1"
    )]
    NoAdapter {
        /// The backends that were searched.
        backends: String,
    },
    /// The adapter the user asked for (by name or index) does not exist.
    #[error(
        "no adapter matches {wanted:?}; adapters found:\n{available}\nPass an index or part of a name from this list (--adapter or KILN_ADAPTER)."
    )]
    AdapterNotFound {
        /// What the user asked for.
        wanted: String,
        /// One line per adapter found.
        available: String,
    },
    /// `request_device` failed.
    #[error("could not open a device on adapter {adapter:?}: {source}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// The wgpu error.
        source: wgpu::RequestDeviceError,
    },
    /// A shape, size or argument that does not fit the op.
    #[error("{op}: {message}")]
    Shape {
        /// The op that was called.
        op: &'static str,
        /// What did not fit, with the shapes involved.
        message: String,
    },
    /// A buffer larger than the adapter allows.
    #[error(
        "{what} needs a buffer of {bytes} bytes but this adapter allows at most {limit} bytes \
         (max_buffer_size / max_storage_buffer_binding_size); use smaller shapes or a GPU with larger limits"
    )]
    BufferTooLarge {
        /// What the buffer was for.
        what: String,
        /// Bytes requested.
        bytes: u64,
        /// The adapter's limit.
        limit: u64,
    },
    /// A WGSL source did not compile or validate.
    #[error("shader {name}: {message}")]
    Shader {
        /// Kernel family and entry point.
        name: String,
        /// naga's message with line numbers.
        message: String,
    },
    /// wgpu reported a validation or out-of-memory error.
    #[error("GPU error during {during}: {message}")]
    Gpu {
        /// What kiln was doing.
        during: String,
        /// wgpu's message.
        message: String,
    },
    /// Reading a buffer back from the device failed.
    #[error("reading back {what} failed: {message}")]
    Readback {
        /// The buffer.
        what: String,
        /// Why.
        message: String,
    },
    /// A user-supplied value is out of range.
    #[error("invalid {key} = {value}: {rule}")]
    Invalid {
        /// Setting or argument name.
        key: String,
        /// The value given.
        value: String,
        /// The rule it broke.
        rule: String,
    },
    /// The configuration could not be parsed (malformed TOML, unknown key, wrong type).
    #[error("config: {message}")]
    Config {
        /// The parser's message, with the key and position.
        message: String,
    },
    /// The corpus, a tokenizer or the token cache is unusable; the message says which and what to
    /// do.
    #[error("data: {message}")]
    Data {
        /// What was wrong, with the file, offsets and sizes involved, and what to do.
        message: String,
    },
    /// A checkpoint file or folder is missing, truncated, corrupt or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file or folder at fault.
        path: String,
        /// What is wrong with it and what to do.
        message: String,
    },
    /// A checkpoint was written by a run whose model differs from the one asked for.
    #[error("checkpoint from a different config: {differences}.\n{advice}")]
    IncompatibleCheckpoint {
        /// Each differing setting and tensor shape, as `checkpoint vs requested`.
        differences: String,
        /// What to do, for the command at hand (resume, evaluate, sample).
        advice: String,
    },
    /// A run folder cannot be used as asked: it holds another run, another process is training
    /// in it, or it cannot be written.
    #[error("run folder {path}: {message}")]
    RunFolder {
        /// The folder.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A computation produced NaN or infinity where a number was needed (a diverged run, damaged
    /// weights); nothing was reported or saved from it.
    #[error("non-finite {what}: {message}")]
    NonFinite {
        /// What came out non-finite (loss, logits, ...).
        what: String,
        /// Where, and what to do.
        message: String,
    },
    /// A Hugging Face folder or GGUF file cannot be imported or exported as asked: a key or
    /// tensor is missing, contradictory or beyond what kiln or the target format can represent.
    #[error("{path}: {message}")]
    Interop {
        /// The file (or folder) at fault.
        path: String,
        /// What is wrong, naming the key or tensor, and what to do.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Data-parallel training could not go on: ranks that disagree, a failed exchange.
    #[error("distributed training: {message}")]
    Distributed {
        /// What went wrong and what to do.
        message: String,
    },
    /// Another rank stopped answering during an exchange (it died, was stopped, or is stuck).
    #[error(
        "distributed training: rank {rank} did not answer within {seconds:.1} s during {what}: \
         it has died, been stopped or hangs, so this rank stops too. Resume the run from its \
         last checkpoint (kiln train --resume, with any number of ranks that divides the global \
         batch); if rank {rank} is only slow (a long evaluation or checkpoint), raise the \
         deadline with KILN_DIST_TIMEOUT=SECONDS"
    )]
    RankLost {
        /// The rank that did not answer (the lowest, if several).
        rank: usize,
        /// The exchange that waited.
        what: String,
        /// Seconds waited.
        seconds: f64,
    },
}

impl Error {
    /// The exit status `kiln` uses for this error: 3 for a lost rank (so that job scripts can
    /// tell it from other failures and resume), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::RankLost { .. } => 3,
            _ => 1,
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, message: impl fmt::Display) -> Self {
        Error::Shape {
            op,
            message: message.to_string(),
        }
    }

    /// Shorthand for [`Error::Data`].
    pub fn data(message: impl fmt::Display) -> Self {
        Error::Data {
            message: message.to_string(),
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(
        key: impl Into<String>,
        value: impl fmt::Display,
        rule: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            key: key.into(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }
}
