use std::path::PathBuf;

/// Why the harness could not give a test its control plane.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{} is missing: {}", .0.display(), crate::binaries::BUILD_HINT)]
    MissingBinary(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{component} exited before it became ready ({status}); last log lines:\n{log_tail}")]
    ExitedEarly {
        component: &'static str,
        status: String,
        log_tail: String,
    },
    #[error("{component} not ready within {seconds} s; last log lines:\n{log_tail}")]
    NotReady {
        component: &'static str,
        seconds: u64,
        log_tail: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Reuse(String),
    #[error("{0}")]
    Crd(String),
    #[error("unexpected answer from the apiserver: {0}")]
    UnexpectedAnswer(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}
