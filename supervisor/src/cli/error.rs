//! What a client command can fail with, and the exit status each failure maps to.

/// What a client command can fail with; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad flags or values.
    #[error("{0}")]
    Usage(String),
    /// The broker cannot be reached.
    #[error("cannot reach the broker at {broker}: {reason}")]
    Broker {
        /// The URL.
        broker: String,
        /// Why.
        reason: String,
    },
    /// No answer from the agent.
    #[error("{0}")]
    NoAnswer(String),
    /// Nothing on the broker knows the SUT.
    #[error("no SUT named {sut} on {broker}: no agent status, supervisor view or job of it is retained there (see `labvisor status`; is --topic-prefix right?)")]
    UnknownSut {
        /// The SUT asked for.
        sut: String,
        /// The broker URL.
        broker: String,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The exit status for this error: 2 usage, 4 broker or agent unreachable, 5 no such SUT,
    /// 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Broker { .. } | ClientError::NoAnswer(_) => 4,
            ClientError::UnknownSut { .. } => 5,
            ClientError::Io(_) => 1,
        }
    }

    /// Whether the output's reader went away (`labvisor jobs x | head`): the command stops
    /// quietly, as if it had finished.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ClientError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}
