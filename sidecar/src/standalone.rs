//! Standalone mode: the policy comes from a YAML or JSON file instead of the controller stream
//! (JSON parses without buffering the whole document). Vault keys appear only as SHA-256 hashes;
//! upstream secrets come from environment variables or files the config names, never from the
//! config itself. The file is polled and re-applied when what it resolves to changes; a broken
//! file keeps the last good policy.
use std::{
    collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher},
    fs::File,
    hash::{Hash, Hasher},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use jiff::Timestamp;
use keybrake_api::{
    AgentRef, AllowRule, KeyGrant, KeyId, KeyState, Limits, OnStale, SecretString, TokenHash, Usd,
    Vendor, stream::PolicyApply,
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::vendors::module_for;

/// Namespace of every standalone key (`keybrake_calls_total{namespace="standalone"}`).
pub const NAMESPACE: &str = "standalone";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StandaloneConfig {
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    pub vendor: Vendor,
    /// Defaults to the vendor's production API.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of an environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the secret (relative paths are relative to the config file).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    /// `keybrake-sidecar hash-key` prints it.
    pub token_sha256: TokenHash,
    /// A name under `upstreams`.
    pub upstream: String,
    #[serde(default)]
    pub state: KeyState,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    pub agent: AgentRef,
    #[serde(default, deserialize_with = "exact_vec")]
    pub allow: Vec<AllowRule>,
    #[serde(default, deserialize_with = "exact_vec")]
    pub customers: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub on_stale: OnStale,
}

/// A list allocated at its final length. serde's `Vec` grows to room for four on the first
/// element; shrinking afterwards splits the spare room off as a free fragment too small for
/// anything that comes later, about 1.7 MB of them with 10,000 one-rule keys.
fn exact_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ExactVec<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ExactVec<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // Policies hold a few entries per list: the first ones wait on the stack.
            const INLINE: usize = 4;
            let mut inline: [Option<T>; INLINE] = Default::default();
            for (count, slot) in inline.iter_mut().enumerate() {
                match seq.next_element()? {
                    Some(item) => *slot = Some(item),
                    None => {
                        let mut exact = Vec::with_capacity(count);
                        exact.extend(inline.into_iter().flatten());
                        return Ok(exact);
                    }
                }
            }
            let mut long: Vec<T> = inline.into_iter().flatten().collect();
            while let Some(item) = seq.next_element()? {
                long.push(item);
            }
            long.shrink_to_fit();
            Ok(long)
        }
    }

    deserializer.deserialize_seq(ExactVec(std::marker::PhantomData))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("key {key}: upstream {upstream:?} is not declared under upstreams")]
    UnknownUpstream { key: String, upstream: String },
    #[error("key name {0:?} appears twice")]
    DuplicateKey(String),
    #[error("key {0:?}: names must be 1-253 characters of a-z, 0-9, '-' and '.'")]
    BadKeyName(String),
    #[error("upstream {0}: set exactly one of secretEnv and secretFile (secrets are never inline)")]
    SecretSource(String),
    #[error("upstream {upstream}: environment variable {var} is not set or empty")]
    SecretEnvMissing { upstream: String, var: String },
    #[error("upstream {upstream}: secret file {path}: {reason}")]
    SecretFile {
        upstream: String,
        path: String,
        reason: String,
    },
    #[error(
        "upstream {0}: baseUrl must be http(s)://host[:port][/path] without query or credentials"
    )]
    BadBaseUrl(String),
    #[error("upstream {0}: vendor custom needs a baseUrl")]
    NoBaseUrl(String),
    #[error("key {key}: allow entry {index} must be either {{operation}} or {{method, path}}")]
    BadAllowRule { key: String, index: usize },
    #[error("key {key}: operation {operation:?} is not in the {vendor} catalogue")]
    UnknownOperation {
        key: String,
        operation: String,
        vendor: Vendor,
    },
    #[error("key {key}: path {path:?} must be an absolute template such as /v1/customers/{{id}}")]
    BadPathTemplate { key: String, path: String },
    #[error("key {key}: limits.{field} must not be negative (got {value})")]
    NegativeCap {
        key: String,
        field: &'static str,
        value: Usd,
    },
    #[error("key {key}: limits.callsPerMinute must be between 1 and 1000000 (got {value})")]
    BadCallsPerMinute { key: String, value: u32 },
}

/// Where secrets come from; a seam so tests need not touch the process environment.
pub trait SecretSourceEnv {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl SecretSourceEnv for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Reads, parses, validates and resolves `path` into grants (with `policy_revision` 0; the
/// watcher stamps the revision).
pub fn load(path: &Path, env: &dyn SecretSourceEnv) -> Result<Vec<KeyGrant>, ConfigError> {
    load_tracked(path, env).map(|loaded| loaded.grants)
}

/// A loaded policy plus what it was made from, so a watcher can tell cheaply whether anything
/// changed without parsing again (and without keeping a second copy of every grant).
pub struct Loaded {
    pub grants: Vec<KeyGrant>,
    /// Secret files read, in reading order.
    pub secret_files: Vec<PathBuf>,
    pub fingerprint: u64,
}

/// A reader that hashes what passes through it, so a file is fingerprinted while it is parsed
/// instead of being held whole (a 10,000-key policy is about 2 MB).
struct Fingerprinting<R> {
    inner: R,
    hasher: DefaultHasher,
    len: u64,
}

impl<R: Read> Fingerprinting<R> {
    fn new(inner: R) -> Self {
        Fingerprinting {
            inner,
            hasher: DefaultHasher::new(),
            len: 0,
        }
    }

    /// Reads what is left, then combines the config's hash with the secret files' contents
    /// (environment variables cannot change under a running process). Change detection only,
    /// not security.
    fn finish(mut self, secrets: &[Option<Vec<u8>>]) -> std::io::Result<u64> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        self.hasher.write_u64(self.len);
        secrets.hash(&mut self.hasher);
        Ok(self.hasher.finish())
    }
}

impl<R: Read> Read for Fingerprinting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.write(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// The fingerprint `path` and `secret_files` have now, or `None` if the config is unreadable.
pub fn current_fingerprint(path: &Path, secret_files: &[PathBuf]) -> Option<u64> {
    let config = Fingerprinting::new(File::open(path).ok()?);
    let secrets: Vec<Option<Vec<u8>>> =
        secret_files.iter().map(|f| std::fs::read(f).ok()).collect();
    config.finish(&secrets).ok()
}

/// Read buffer of the policy file.
const READ_BUFFER: usize = 64 * 1024;

/// YAML, or JSON (a subset of YAML) when the file starts with `{`: serde_json deserializes as it
/// reads, while serde_yaml needs the whole text and then buffers every event of the document,
/// which for a policy with thousands of keys costs several times the policy's own memory.
fn parse<R: Read>(reader: &mut BufReader<R>) -> Result<StandaloneConfig, ParseFailure> {
    let head = reader.fill_buf().map_err(ParseFailure::Read)?;
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        serde_json::from_reader(reader).map_err(|e| {
            if e.is_io() {
                ParseFailure::Read(e.into())
            } else {
                ParseFailure::Syntax(e.to_string())
            }
        })
    } else {
        let mut text = Vec::new();
        reader.read_to_end(&mut text).map_err(ParseFailure::Read)?;
        serde_yaml::from_slice(&text).map_err(|e| ParseFailure::Syntax(e.to_string()))
    }
}

enum ParseFailure {
    Read(std::io::Error),
    Syntax(String),
}

pub fn load_tracked(path: &Path, env: &dyn SecretSourceEnv) -> Result<Loaded, ConfigError> {
    let shown = path.display().to_string();
    let read_error = |source| ConfigError::Read {
        path: shown.clone(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, Fingerprinting::new(file));
    let config = parse(&mut reader).map_err(|failure| match failure {
        ParseFailure::Read(source) => read_error(source),
        ParseFailure::Syntax(reason) => ConfigError::Parse {
            path: shown.clone(),
            reason,
        },
    })?;
    // Whatever the parser left unread still counts towards the fingerprint.
    let config_bytes = reader.into_inner();
    let mut secret_files = Vec::new();
    let grants = resolve_tracked(
        config,
        path.parent().unwrap_or(Path::new(".")),
        env,
        &mut secret_files,
    )?;
    let secrets: Vec<Option<Vec<u8>>> = secret_files
        .iter()
        .map(|(_, content)| Some(content.clone()))
        .collect();
    Ok(Loaded {
        grants,
        fingerprint: config_bytes.finish(&secrets).map_err(read_error)?,
        secret_files: secret_files.into_iter().map(|(p, _)| p).collect(),
    })
}

pub fn resolve(
    config: StandaloneConfig,
    base_dir: &Path,
    env: &dyn SecretSourceEnv,
) -> Result<Vec<KeyGrant>, ConfigError> {
    resolve_tracked(config, base_dir, env, &mut Vec::new())
}

fn resolve_tracked(
    config: StandaloneConfig,
    base_dir: &Path,
    env: &dyn SecretSourceEnv,
    secret_files: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<Vec<KeyGrant>, ConfigError> {
    let mut upstreams = BTreeMap::new();
    for (name, upstream) in &config.upstreams {
        let secret = match (&upstream.secret_env, &upstream.secret_file) {
            (Some(var), None) => {
                env.var(var)
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| ConfigError::SecretEnvMissing {
                        upstream: name.clone(),
                        var: var.clone(),
                    })?
            }
            (None, Some(file)) => {
                let full = base_dir.join(file);
                let raw = std::fs::read(&full).map_err(|e| ConfigError::SecretFile {
                    upstream: name.clone(),
                    path: full.display().to_string(),
                    reason: e.to_string(),
                })?;
                let text = String::from_utf8(raw.clone()).map_err(|_| ConfigError::SecretFile {
                    upstream: name.clone(),
                    path: full.display().to_string(),
                    reason: "not UTF-8".into(),
                })?;
                secret_files.push((full.clone(), raw));
                if text.trim().is_empty() {
                    return Err(ConfigError::SecretFile {
                        upstream: name.clone(),
                        path: full.display().to_string(),
                        reason: "empty".into(),
                    });
                }
                text
            }
            _ => return Err(ConfigError::SecretSource(name.clone())),
        };
        let base_url = match &upstream.base_url {
            Some(url) => {
                check_base_url(url).map_err(|()| ConfigError::BadBaseUrl(name.clone()))?;
                url.trim_end_matches('/').to_owned()
            }
            None => upstream
                .vendor
                .default_base_url()
                .ok_or_else(|| ConfigError::NoBaseUrl(name.clone()))?
                .to_owned(),
        };
        upstreams.insert(
            name.as_str(),
            (upstream.vendor, base_url, SecretString::new(secret.trim())),
        );
    }

    let mut seen = BTreeSet::new();
    let mut grants = Vec::with_capacity(config.keys.len());
    for key in config.keys {
        if !valid_name(&key.name) {
            return Err(ConfigError::BadKeyName(key.name));
        }
        if !seen.insert(key.name.clone()) {
            return Err(ConfigError::DuplicateKey(key.name));
        }
        let (vendor, base_url, secret) =
            upstreams
                .get(key.upstream.as_str())
                .cloned()
                .ok_or_else(|| ConfigError::UnknownUpstream {
                    key: key.name.clone(),
                    upstream: key.upstream.clone(),
                })?;
        check_allow_rules(&key.name, vendor, &key.allow)?;
        check_limits(&key.name, &key.limits)?;
        grants.push(KeyGrant {
            id: standalone_id(&key.name),
            token_sha256: key.token_sha256,
            vendor,
            base_url,
            upstream_secret: secret,
            state: key.state,
            expires_at: key.expires_at,
            agent: key.agent,
            allow: key.allow,
            customers: key.customers,
            limits: key.limits,
            on_stale: key.on_stale,
            policy_revision: 0,
        });
    }
    Ok(grants)
}

/// `KeyId::new(NAMESPACE, name)`, allocated at its length (formatting reserves about twice).
fn standalone_id(name: &str) -> KeyId {
    let mut id = String::with_capacity(NAMESPACE.len() + 1 + name.len());
    id.push_str(NAMESPACE);
    id.push('/');
    id.push_str(name);
    KeyId(id)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn check_base_url(url: &str) -> Result<(), ()> {
    let parsed = url::Url::parse(url).map_err(|_| ())?;
    let ok = matches!(parsed.scheme(), "http" | "https")
        && parsed.host().is_some()
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    if ok { Ok(()) } else { Err(()) }
}

/// The bounds the VaultKey CRD enforces, so a file cannot hold a policy the cluster would refuse
/// (a negative cap would make every call exceed it).
fn check_limits(key: &str, limits: &Limits) -> Result<(), ConfigError> {
    for (field, cap) in [
        ("dailyUsdCap", limits.daily_usd_cap),
        ("perCallUsdMax", limits.per_call_usd_max),
    ] {
        if let Some(value) = cap.filter(|v| *v < Usd::ZERO) {
            return Err(ConfigError::NegativeCap {
                key: key.into(),
                field,
                value,
            });
        }
    }
    match limits.calls_per_minute {
        Some(value) if !(1..=1_000_000).contains(&value) => Err(ConfigError::BadCallsPerMinute {
            key: key.into(),
            value,
        }),
        _ => Ok(()),
    }
}

fn check_allow_rules(key: &str, vendor: Vendor, rules: &[AllowRule]) -> Result<(), ConfigError> {
    let catalogue = module_for(vendor).operations();
    for (index, rule) in rules.iter().enumerate() {
        match (&rule.operation, rule.method, &rule.path) {
            (Some(op), None, None) => {
                if !catalogue.iter().any(|o| o.name == op) {
                    return Err(ConfigError::UnknownOperation {
                        key: key.into(),
                        operation: op.clone(),
                        vendor,
                    });
                }
            }
            (None, Some(_), Some(path)) => {
                if crate::path::check_path(path).is_err() || path.contains('?') {
                    return Err(ConfigError::BadPathTemplate {
                        key: key.into(),
                        path: path.clone(),
                    });
                }
            }
            _ => {
                return Err(ConfigError::BadAllowRule {
                    key: key.into(),
                    index,
                });
            }
        }
    }
    Ok(())
}

/// Keeps `store` in step with the file at `path`: applies it now (returning the error if the
/// first load fails), then polls every `interval` until `shutdown` flips.
pub struct ConfigWatcher {
    path: PathBuf,
    store: Arc<dyn PolicyApply>,
    env: Box<dyn SecretSourceEnv + Send + Sync>,
    /// Metadata of the config and secret files when their contents were last fingerprinted;
    /// while it stays the same a poll reads nothing. `None`: fingerprint on the next poll.
    seen: Option<Vec<Option<FileStamp>>>,
    /// Inputs of the policy in force, and of the last broken attempt (not retried until changed).
    applied: u64,
    failed: Option<u64>,
    secret_files: Vec<PathBuf>,
    revision: u64,
    last_error: Option<String>,
}

impl ConfigWatcher {
    pub fn start(
        path: PathBuf,
        store: Arc<dyn PolicyApply>,
        env: Box<dyn SecretSourceEnv + Send + Sync>,
    ) -> Result<Self, ConfigError> {
        let loaded = load_tracked(&path, env.as_ref())?;
        let mut watcher = ConfigWatcher {
            path,
            store,
            env,
            seen: None,
            applied: 0,
            failed: None,
            secret_files: Vec::new(),
            revision: 0,
            last_error: None,
        };
        watcher.apply(loaded);
        Ok(watcher)
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn apply(&mut self, loaded: Loaded) {
        self.revision += 1;
        self.applied = loaded.fingerprint;
        self.secret_files = loaded.secret_files;
        let stamped = loaded
            .grants
            .into_iter()
            .map(|mut g| {
                g.policy_revision = self.revision as i64;
                g
            })
            .collect::<Vec<_>>();
        tracing::info!(path = %self.path.display(), revision = self.revision, keys = stamped.len(), "policy file applied");
        self.store.replace_all(stamped, self.revision);
        self.store.mark_fresh(self.revision);
    }

    /// One poll: if the file (or a secret file it names) changed, parse and apply it. Unchanged
    /// metadata (size, mtime, ctime, inode) means nothing is read at all.
    pub fn poll(&mut self) {
        let stamps = self.stamps();
        if self.seen.as_ref() == Some(&stamps) {
            return;
        }
        let now = current_fingerprint(&self.path, &self.secret_files);
        if now.is_some() && (now == Some(self.applied) || now == self.failed) {
            self.seen = trusted(stamps);
            return;
        }
        match load_tracked(&self.path, self.env.as_ref()) {
            Ok(loaded) => {
                self.last_error = None;
                self.failed = None;
                self.apply(loaded);
                // The secret files may be others now: stamp them on the next poll.
                self.seen = None;
            }
            Err(e) => {
                self.failed = now;
                self.seen = now.and_then(|_| trusted(stamps));
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, revision = self.revision, "policy file is broken; keeping the last good policy");
                    self.last_error = Some(text);
                }
            }
        }
    }

    fn stamps(&self) -> Vec<Option<FileStamp>> {
        std::iter::once(&self.path)
            .chain(&self.secret_files)
            .map(|p| FileStamp::of(p))
            .collect()
    }

    /// Polls until `shutdown` flips. The metadata check runs here; reading, parsing and
    /// applying a changed file run on the blocking pool, off the request path's threads.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if self.seen.as_ref() == Some(&self.stamps()) {
                        continue;
                    }
                    match tokio::task::spawn_blocking(move || {
                        self.poll();
                        self
                    })
                    .await
                    {
                        Ok(watcher) => self = watcher,
                        Err(e) => {
                            tracing::error!(error = %e, "policy file watcher failed; the last applied policy stays in force");
                            return;
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// What the file system says about a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    inode: u64,
    modified: Option<SystemTime>,
    /// ctime (seconds, nanoseconds): changes with any write, even one that restores the mtime.
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            inode: meta.ino(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// How long after a write a file's timestamps are not trusted: a second write within the
/// file system's timestamp granularity could keep size and times unchanged.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// `stamps`, if every file in them was last modified long enough ago to trust its timestamps.
fn trusted(stamps: Vec<Option<FileStamp>>) -> Option<Vec<Option<FileStamp>>> {
    let now = SystemTime::now();
    let settled = stamps.iter().flatten().all(|stamp| {
        stamp
            .modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > RACY_WINDOW)
    });
    settled.then_some(stamps)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::{Freshness, PolicyStore};

    struct FakeEnv(HashMap<&'static str, &'static str>);
    impl SecretSourceEnv for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn env() -> Box<FakeEnv> {
        Box::new(FakeEnv(HashMap::from([("STRIPE_KEY", "sk_test_123")])))
    }

    fn config(extra: &str) -> String {
        format!(
            r#"
upstreams:
  stripe-test:
    vendor: stripe
    baseUrl: http://127.0.0.1:12111
    secretEnv: STRIPE_KEY
keys:
  - name: refund-agent
    tokenSha256: {hash}
    upstream: stripe-test
    agent: {{name: refund-agent, runId: run-42}}
    allow:
      - operation: refunds.create
      - {{method: GET, path: "/v1/customers/{{id}}"}}
    customers: [cus_123]
    limits: {{dailyUsdCap: "250.00", perCallUsdMax: "50.00", callsPerMinute: 120}}
{extra}"#,
            hash = TokenHash::of("vault_key_x").to_hex()
        )
    }

    #[test]
    fn loads_the_design_example() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config("")).unwrap();
        let grants = load(&path, env().as_ref()).unwrap();
        assert_eq!(grants.len(), 1);
        let g = &grants[0];
        assert_eq!(g.id, KeyId::new("standalone", "refund-agent"));
        assert_eq!(g.id.0.capacity(), g.id.0.len());
        assert_eq!(g.upstream_secret.expose(), "sk_test_123");
        assert_eq!(g.token_sha256, TokenHash::of("vault_key_x"));
        assert_eq!(g.limits.calls_per_minute, Some(120));
        assert_eq!(g.on_stale, OnStale::Deny);
    }

    #[test]
    fn refuses_inline_secrets_and_bad_references() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let cases = [
            (
                config("").replace("secretEnv: STRIPE_KEY", "secret: sk_live_inline"),
                "unknown field `secret`",
            ),
            (
                config("").replace("secretEnv: STRIPE_KEY", "secretEnv: NOPE"),
                "NOPE is not set",
            ),
            (
                config("").replace("upstream: stripe-test", "upstream: nope"),
                "not declared",
            ),
            (
                config("").replace("refunds.create", "refunds.explode"),
                "not in the stripe catalogue",
            ),
            (
                config("").replace("/v1/customers/{id}", "/v1/../x"),
                "absolute template",
            ),
            (
                config("").replace("http://127.0.0.1:12111", "ftp://x"),
                "baseUrl must be",
            ),
            (
                config("").replace("tokenSha256: ", "tokenSha256: zz"),
                "parsing",
            ),
            (
                config("  - name: refund-agent\n    tokenSha256: 00\n"),
                "parsing",
            ),
            (
                config("").replace("\"250.00\"", "\"-1\""),
                "key refund-agent: limits.dailyUsdCap must not be negative (got -1.00)",
            ),
            (
                config("").replace("\"50.00\"", "\"-0.01\""),
                "key refund-agent: limits.perCallUsdMax must not be negative (got -0.01)",
            ),
            (
                config("").replace("callsPerMinute: 120", "callsPerMinute: 0"),
                "key refund-agent: limits.callsPerMinute must be between 1 and 1000000",
            ),
        ];
        for (text, needle) in cases {
            std::fs::write(&path, &text).unwrap();
            let err = load(&path, env().as_ref()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
            assert!(
                !err.contains("sk_live_inline"),
                "an error message echoed a secret: {err}"
            );
        }
    }

    #[test]
    fn json_policies_load_like_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let yaml_path = dir.path().join("c.yaml");
        std::fs::write(&yaml_path, config("")).unwrap();
        let value: serde_json::Value = serde_yaml::from_str(&config("")).unwrap();
        let json_path = dir.path().join("c.json");
        std::fs::write(&json_path, format!("  {value}")).unwrap();
        assert_eq!(
            load(&json_path, env().as_ref()).unwrap(),
            load(&yaml_path, env().as_ref()).unwrap()
        );
        std::fs::write(&json_path, r#"{"upstreams": {}, "secret": "x"}"#).unwrap();
        assert!(
            load(&json_path, env().as_ref())
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
    }

    #[test]
    fn lists_are_allocated_at_their_length() {
        let parse = |json: &str| serde_json::from_str::<KeyConfig>(json).unwrap();
        let base = r#""name": "k", "tokenSha256": "0000000000000000000000000000000000000000000000000000000000000000", "upstream": "u", "agent": {"name": "a"}"#;
        let none = parse(&format!("{{{base}}}"));
        assert_eq!(none.allow.capacity(), 0);
        let one = parse(&format!(
            r#"{{{base}, "allow": [{{"operation": "charges.create"}}], "customers": []}}"#
        ));
        assert_eq!((one.allow.len(), one.allow.capacity()), (1, 1));
        assert_eq!(one.customers.capacity(), 0);
        let customers: Vec<String> = (0..9).map(|i| format!("cus_{i}")).collect();
        let nine = parse(&format!(r#"{{{base}, "customers": {customers:?}}}"#));
        assert_eq!(nine.customers, customers);
        assert_eq!(nine.customers.capacity(), 9);
        let four = parse(&format!(
            r#"{{{base}, "customers": {:?}}}"#,
            &customers[..4]
        ));
        assert_eq!((four.customers.len(), four.customers.capacity()), (4, 4));
        assert_eq!(four.customers[3], "cus_3");
        // YAML too, and anything but a list is refused.
        let yaml: KeyConfig = serde_yaml::from_str(
            "name: k\ntokenSha256: \"0000000000000000000000000000000000000000000000000000000000000000\"\nupstream: u\nagent: {name: a}\ncustomers: [a, b]\n",
        )
        .unwrap();
        assert_eq!(yaml.customers.capacity(), 2);
        assert!(
            serde_json::from_str::<KeyConfig>(&format!(r#"{{{base}, "customers": "x"}}"#)).is_err()
        );
    }

    #[test]
    fn a_zero_cap_is_a_valid_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config("").replace("\"250.00\"", "\"0\"")).unwrap();
        let grants = load(&path, env().as_ref()).unwrap();
        assert_eq!(grants[0].limits.daily_usd_cap, Some(Usd::ZERO));
    }

    #[test]
    fn a_negative_cap_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config("")).unwrap();
        let store = Arc::new(PolicyStore::new(Freshness::AlwaysFresh));
        let mut w = ConfigWatcher::start(path.clone(), store.clone(), env()).unwrap();
        std::fs::write(&path, config("").replace("\"50.00\"", "\"-1\"")).unwrap();
        w.poll();
        assert_eq!(store.revision(), 1, "the negative cap is not applied");
        let error = w.last_error.clone().expect("the broken file is reported");
        assert!(
            error.contains("refund-agent") && error.contains("perCallUsdMax"),
            "{error}"
        );
        let kept = store.lookup(&TokenHash::of("vault_key_x")).unwrap();
        assert_eq!(
            kept.grant.limits.per_call_usd_max,
            Some(Usd::from_cents(5000))
        );
    }

    #[test]
    fn a_policy_larger_than_the_read_buffer_streams_and_fingerprints_like_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<serde_json::Value> = (0..2_000)
            .map(|i| {
                serde_json::json!({
                    "name": format!("key-{i}"),
                    "tokenSha256": TokenHash::of(&format!("vault_key_{i}")).to_hex(),
                    "upstream": "stripe-test",
                    "agent": {"name": "agent"},
                })
            })
            .collect();
        let policy = serde_json::json!({
            "upstreams": {"stripe-test": {"vendor": "stripe", "secretEnv": "STRIPE_KEY"}},
            "keys": keys,
        });
        let text = format!("\n{policy:#}\n\n");
        assert!(text.len() > 2 * READ_BUFFER);
        let path = dir.path().join("big.json");
        std::fs::write(&path, &text).unwrap();
        let loaded = load_tracked(&path, env().as_ref()).unwrap();
        assert_eq!(loaded.grants.len(), 2_000);
        assert_eq!(loaded.grants[1_999].id, KeyId::new(NAMESPACE, "key-1999"));
        assert_eq!(
            current_fingerprint(&path, &loaded.secret_files),
            Some(loaded.fingerprint)
        );
        // One byte more, even trailing whitespace, is another file.
        std::fs::write(&path, format!("{text} ")).unwrap();
        assert_ne!(
            current_fingerprint(&path, &loaded.secret_files),
            Some(loaded.fingerprint)
        );
        // Trailing garbage after the JSON document is refused, not ignored.
        std::fs::write(&path, format!("{text}}}")).unwrap();
        let err = load(&path, env().as_ref()).unwrap_err().to_string();
        assert!(err.contains("parsing") && err.contains("trailing"), "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone/keybrake.yaml");
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("keybrake.yaml");
        std::fs::copy(&example, &copy).unwrap();
        std::fs::write(dir.path().join("openai.secret"), "sk-proj-example\n").unwrap();
        let env = FakeEnv(HashMap::from([
            ("STRIPE_SECRET_KEY", "sk_test_x"),
            ("TWILIO_CREDENTIALS", "ACx:tok"),
            ("RESEND_API_KEY", "re_x"),
        ]));
        let grants = load(&copy, &env).unwrap();
        assert_eq!(grants.len(), 4);
        let refund = &grants[0];
        assert_eq!(
            refund.token_sha256,
            TokenHash::of("vault_key_exampleRefundAgent0000000000000000000000000")
        );
        assert_eq!(refund.base_url, "https://api.stripe.com");
        assert_eq!(grants[1].upstream_secret.expose(), "sk-proj-example");
        assert_eq!(grants[3].state, KeyState::Suspended);
    }

    #[test]
    fn watcher_skips_settled_files_and_sees_a_same_size_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let age = |p: &Path| {
            let old = SystemTime::now() - Duration::from_secs(60);
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        };
        std::fs::write(&path, config("")).unwrap();
        age(&path);
        let store = Arc::new(PolicyStore::new(Freshness::AlwaysFresh));
        let mut w = ConfigWatcher::start(path.clone(), store.clone(), env()).unwrap();
        w.poll();
        assert!(
            w.seen.is_some(),
            "a settled, unchanged file is trusted by its metadata"
        );
        assert_eq!(store.revision(), 1);

        // Same length, different content, and the old mtime put back: ctime still moves.
        let broken = config("").replace("upstream: stripe-test", "upstream: stripe-tesT");
        assert_eq!(broken.len(), config("").len());
        std::fs::write(&path, &broken).unwrap();
        age(&path);
        w.poll();
        assert_eq!(store.revision(), 1, "a broken upstream name is not applied");
        assert!(w.last_error.is_some());

        // A fresh write is never trusted by its metadata alone.
        std::fs::write(&path, config("# fixed\n")).unwrap();
        w.poll();
        assert_eq!(store.revision(), 2);
        w.poll();
        assert!(
            w.seen.is_none(),
            "a just-written file is fingerprinted again"
        );
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn watcher_applies_changes_and_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config("")).unwrap();
        let store = Arc::new(PolicyStore::new(Freshness::AlwaysFresh));
        let mut w = ConfigWatcher::start(path.clone(), store.clone(), env()).unwrap();
        assert_eq!(store.revision(), 1);
        assert_eq!(
            store
                .lookup(&TokenHash::of("vault_key_x"))
                .unwrap()
                .grant
                .policy_revision,
            1
        );

        w.poll();
        assert_eq!(store.revision(), 1, "an unchanged file is not re-applied");
        // Same policy, different bytes: re-applied (cheap), still one key.
        std::fs::write(&path, config("# a comment\n")).unwrap();
        w.poll();
        assert_eq!(store.revision(), 2);
        assert_eq!(store.len(), 1);

        std::fs::write(&path, "upstreams: [broken").unwrap();
        w.poll();
        w.poll();
        assert_eq!(store.revision(), 2);
        assert!(
            store.lookup(&TokenHash::of("vault_key_x")).is_some(),
            "last good policy kept"
        );

        std::fs::write(
            &path,
            config("").replace(
                "upstream: stripe-test",
                "upstream: stripe-test\n    state: Revoked",
            ),
        )
        .unwrap();
        w.poll();
        assert_eq!(store.revision(), 3);
        assert_eq!(
            store
                .lookup(&TokenHash::of("vault_key_x"))
                .unwrap()
                .grant
                .state,
            KeyState::Revoked
        );
    }
}
