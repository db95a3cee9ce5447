//! Where the Go-built Kubernetes binaries live. `e2e/scripts/build-k8s.sh` builds them into
//! `$KEYBRAKE_CACHE/bin/<tool>-v<version>/` (default cache `~/.cache/keybrake`); the versions
//! below must match `e2e/scripts/versions.env` (a unit test checks it).
use std::path::{Path, PathBuf};

use crate::error::HarnessError;

/// kube-apiserver and kubectl version (built from `k8s.io/kubernetes`).
pub const K8S_VERSION: &str = "1.35.4";
/// etcd version (built from `go.etcd.io/etcd/server/v3`).
pub const ETCD_VERSION: &str = "3.6.16";
/// Helm version (built from `helm.sh/helm/v3`).
pub const HELM_VERSION: &str = "3.21.4";

/// The command that builds (or reuses) every binary below.
pub const BUILD_HINT: &str = "run `make e2e-deps` (e2e/scripts/build-k8s.sh all)";

/// Root of the binary cache: `$KEYBRAKE_CACHE`, else `$HOME/.cache/keybrake`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYBRAKE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache").join("keybrake")
}

/// Paths of the cached binaries, each checked to exist.
#[derive(Clone, Debug)]
pub struct K8sBinaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl K8sBinaries {
    /// Finds every binary in the cache, or says which is missing and what to run.
    pub fn locate() -> Result<Self, HarnessError> {
        let bin = cache_dir().join("bin");
        let k8s = bin.join(format!("k8s-v{K8S_VERSION}"));
        let found = K8sBinaries {
            etcd: bin.join(format!("etcd-v{ETCD_VERSION}")).join("etcd"),
            kube_apiserver: k8s.join("kube-apiserver"),
            kubectl: k8s.join("kubectl"),
            helm: bin.join(format!("helm-v{HELM_VERSION}")).join("helm"),
        };
        for path in [
            &found.etcd,
            &found.kube_apiserver,
            &found.kubectl,
            &found.helm,
        ] {
            if !is_executable(path) {
                return Err(HarnessError::MissingBinary(path.clone()));
            }
        }
        Ok(found)
    }

    /// Like [`K8sBinaries::locate`], but panics with the command to run: what a test wants.
    pub fn require() -> Self {
        match Self::locate() {
            Ok(found) => found,
            Err(err) => panic!("{err}"),
        }
    }

    /// The directory holding kubectl (and kube-apiserver), to put first on `PATH`.
    pub fn kubectl_dir(&self) -> &Path {
        self.kubectl.parent().expect("kubectl path has a parent")
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_build_script() {
        let env = include_str!("../scripts/versions.env");
        let value = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("versions.env lacks {key}"))
                .trim()
                .to_string()
        };
        assert_eq!(value("K8S_VERSION"), K8S_VERSION);
        assert_eq!(value("ETCD_VERSION"), ETCD_VERSION);
        assert_eq!(value("HELM_VERSION"), HELM_VERSION);
    }

    #[test]
    fn missing_binary_error_says_what_to_run() {
        let err = HarnessError::MissingBinary("/nowhere/etcd".into());
        assert!(err.to_string().contains("make e2e-deps"), "{err}");
    }
}
