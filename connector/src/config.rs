//! The Connector's configuration: a TOML file (every key commented in
//! `config/connector.toml`), `BACKBONE_CONNECTOR__SECTION__KEY=value`
//! environment overrides, and [`Config::validate`] at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "BACKBONE_CONNECTOR__";

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the Backbone broker is and how to trust it.
    pub backbone: BackboneConfig,
    /// The identity's key file and the local database.
    pub storage: StorageConfig,
    /// The REST API.
    pub api: ApiConfig,
    /// Webhooks told about incoming messages and relationship changes.
    pub webhooks: WebhookConfig,
    /// Defaults for what the Connector sends.
    pub messages: MessageConfig,
}

/// `[backbone]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackboneConfig {
    /// The broker's `host:port`.
    pub server: String,
    /// A PEM file with the certificate (or CA) the broker's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// The SHA-256 fingerprint of the broker's certificate, instead of `ca`.
    pub fingerprint: Option<String>,
    /// The TLS server name; `localhost` when `server` is an IP address.
    pub server_name: Option<String>,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            server: "127.0.0.1:7700".into(),
            ca: None,
            fingerprint: None,
            server_name: None,
        }
    }
}

/// `[storage]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The directory of the SQLite database and of uploads in progress.
    pub data_dir: PathBuf,
    /// The identity's key file (made by `backbone-connector init`).
    pub key_file: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("connector-data"),
            key_file: PathBuf::from("connector-data/identity.key"),
        }
    }
}

/// `[api]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where the REST API listens; loopback unless the operator says otherwise.
    pub listen: SocketAddr,
    /// The accepted API keys, each as `sha256:<64 hex digits>` of the key
    /// (`backbone-connector hash-key` prints it); the keys themselves are
    /// never stored.
    pub api_keys: Vec<String>,
    /// The largest JSON request body.
    pub max_json_body: ByteSize,
    /// The largest file upload.
    pub max_file_size: ByteSize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            max_json_body: ByteSize::mib(1),
            max_file_size: ByteSize::gib(1),
        }
    }
}

impl ApiConfig {
    /// The configured key hashes as bytes (validated by [`Config::validate`]).
    pub fn key_hashes(&self) -> Vec<[u8; 32]> {
        self.api_keys
            .iter()
            .filter_map(|text| parse_key_hash(text).ok())
            .collect()
    }
}

/// `[webhooks]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The endpoints; every event goes to each of them.
    pub endpoints: Vec<WebhookEndpoint>,
    /// How long a delivery is retried before it is marked failed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The first retry's delay; each retry doubles it, with jitter.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long one POST may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            max_age: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One `[[webhooks.endpoints]]`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// The URL events are POSTed to (`http` or `https`).
    pub url: String,
    /// The shared secret of the HMAC-SHA256 signature (at least 16 bytes).
    pub secret: String,
}

impl std::fmt::Debug for WebhookEndpoint {
    // The secret is never printed, so that logging the config cannot leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `[messages]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageConfig {
    /// How long the broker keeps a sent message for an offline recipient
    /// when the request names no TTL.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
}

impl Default for MessageConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML (with overrides applied) did not parse into the config.
    #[error("{}: {message}", origin.as_ref().map_or("configuration".into(), |path| path.display().to_string()))]
    Parse {
        /// The file, if one was read.
        origin: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// An environment override is malformed.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads the file (if any), applies overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|error| ConfigError::Parse {
                        origin: Some(path.to_owned()),
                        message: error.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                apply_env_override(&mut table, &name, key, &value)?;
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|error: toml::de::Error| ConfigError::Parse {
                    origin: path.map(Path::to_owned),
                    message: error.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.backbone.server.trim().is_empty() {
            return invalid("backbone.server", "must be host:port");
        }
        match (&self.backbone.ca, &self.backbone.fingerprint) {
            (Some(_), Some(_)) => {
                return invalid("backbone.ca", "set either ca or fingerprint, not both");
            }
            (None, None) => {
                return invalid(
                    "backbone.ca",
                    "set ca (the broker's certificate or CA, PEM) or fingerprint",
                );
            }
            _ => {}
        }
        if self.api.api_keys.is_empty() {
            return invalid(
                "api.api_keys",
                "at least one key is needed (backbone-connector init makes one; \
                 backbone-connector hash-key hashes another)",
            );
        }
        for key in &self.api.api_keys {
            if let Err(message) = parse_key_hash(key) {
                return Err(ConfigError::Invalid {
                    key: "api.api_keys",
                    message,
                });
            }
        }
        if self.api.max_json_body.as_u64() < 1024 {
            return invalid("api.max_json_body", "must be at least 1 KiB");
        }
        if self.api.max_file_size.as_u64() == 0 {
            return invalid("api.max_file_size", "must be greater than zero");
        }
        for (index, endpoint) in self.webhooks.endpoints.iter().enumerate() {
            if self.webhooks.endpoints[..index]
                .iter()
                .any(|earlier| earlier.url == endpoint.url)
            {
                return Err(ConfigError::Invalid {
                    key: "webhooks.endpoints.url",
                    message: format!("{:?} is listed twice", endpoint.url),
                });
            }
            match reqwest::Url::parse(&endpoint.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                Ok(_) => return invalid("webhooks.endpoints.url", "must be an http(s) URL"),
                Err(error) => {
                    return Err(ConfigError::Invalid {
                        key: "webhooks.endpoints.url",
                        message: format!("{:?}: {error}", endpoint.url),
                    });
                }
            }
            if endpoint.secret.len() < 16 {
                return invalid(
                    "webhooks.endpoints.secret",
                    "must be at least 16 characters",
                );
            }
        }
        if self.webhooks.initial_backoff.is_zero()
            || self.webhooks.initial_backoff > self.webhooks.max_backoff
        {
            return invalid(
                "webhooks.initial_backoff",
                "must be greater than zero and at most max_backoff",
            );
        }
        if self.webhooks.timeout.is_zero() || self.webhooks.max_age.is_zero() {
            return invalid(
                "webhooks.timeout",
                "timeout and max_age must be greater than zero",
            );
        }
        if self.messages.default_ttl < Duration::from_secs(1) {
            return invalid("messages.default_ttl", "must be at least 1s");
        }
        Ok(())
    }
}

/// The SHA-256 of an API key, as the config stores it.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn parse_key_hash(text: &str) -> Result<[u8; 32], String> {
    let hex_text = text.strip_prefix("sha256:").ok_or_else(|| {
        format!("{text:?} must start with sha256: (the key's hash, never the key)")
    })?;
    let bytes = hex::decode(hex_text).map_err(|_| format!("{text:?} is not hex after sha256:"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{text:?} must have 64 hex digits after sha256:"))
}

/// `BACKBONE_CONNECTOR__API__LISTEN=0.0.0.0:8080` sets `api.listen`. The
/// value is parsed as a TOML value when it is one (numbers, booleans,
/// arrays) and taken as a string otherwise.
fn apply_env_override(
    table: &mut toml::Table,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let parts: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            name: name.to_owned(),
            message: "empty key segment".into(),
        });
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (leaf, sections) = parts.split_last().expect("split yields at least one part");
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
            name: name.to_owned(),
            message: format!("{section} is not a section"),
        })?;
    }
    current.insert(leaf.clone(), parsed);
    Ok(())
}

/// The commented config `backbone-connector init` writes, with the hash of
/// the API key it generated.
pub fn commented_template(key_hash: &str, data_dir: &Path) -> String {
    include_str!("../../config/connector.toml")
        .replace("api_keys = []", &format!("api_keys = [\"{key_hash}\"]"))
        .replace(
            "data_dir = \"connector-data\"",
            &format!(
                "data_dir = {}",
                toml::Value::String(data_dir.display().to_string())
            ),
        )
        .replace(
            "key_file = \"connector-data/identity.key\"",
            &format!(
                "key_file = {}",
                toml::Value::String(data_dir.join("identity.key").display().to_string())
            ),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_shipped_file_parses_and_names_every_default() {
        let text = commented_template(&hash_key("k"), Path::new("connector-data"));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("connector.toml");
        std::fs::write(&path, text).expect("write");
        let config = Config::load(
            Some(&path),
            env(&[("BACKBONE_CONNECTOR__BACKBONE__CA", "/etc/backbone/cert.pem")]),
        )
        .expect("the shipped config loads");
        let defaults = Config::default();
        assert_eq!(config.api.listen, defaults.api.listen);
        assert_eq!(config.backbone.server, defaults.backbone.server);
        assert_eq!(config.webhooks.max_age, defaults.webhooks.max_age);
        assert_eq!(config.messages.default_ttl, defaults.messages.default_ttl);
        assert_eq!(config.storage.key_file, defaults.storage.key_file);
        assert_eq!(config.api.key_hashes().len(), 1);
    }

    #[test]
    fn environment_overrides_apply_and_bad_values_are_named() {
        let key = hash_key("secret");
        let config = Config::load(
            None,
            env(&[
                ("BACKBONE_CONNECTOR__API__API_KEYS", &format!("[\"{key}\"]")),
                ("BACKBONE_CONNECTOR__BACKBONE__FINGERPRINT", "00"),
                ("BACKBONE_CONNECTOR__API__LISTEN", "0.0.0.0:9000"),
                ("BACKBONE_CONNECTOR__WEBHOOKS__MAX_AGE", "2h"),
                ("OTHER", "ignored"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.api.listen.port(), 9000);
        assert_eq!(config.webhooks.max_age, Duration::from_secs(7200));

        let error = Config::load(
            None,
            env(&[("BACKBONE_CONNECTOR__BACKBONE__FINGERPRINT", "00")]),
        )
        .expect_err("no API key");
        assert!(error.to_string().starts_with("api.api_keys"), "{error}");
        let error = Config::load(
            None,
            env(&[("BACKBONE_CONNECTOR__API__API_KEYS", &format!("[\"{key}\"]"))]),
        )
        .expect_err("no trust");
        assert!(error.to_string().starts_with("backbone.ca"), "{error}");
        let error = Config::load(
            None,
            env(&[
                ("BACKBONE_CONNECTOR__BACKBONE__FINGERPRINT", "00"),
                ("BACKBONE_CONNECTOR__API__API_KEYS", "[\"plain\"]"),
            ]),
        )
        .expect_err("a key in clear");
        assert!(error.to_string().contains("sha256:"), "{error}");
        let error = Config::load(
            None,
            env(&[
                ("BACKBONE_CONNECTOR__API__API_KEYS", &format!("[\"{key}\"]")),
                ("BACKBONE_CONNECTOR__BACKBONE__FINGERPRINT", "00"),
                ("BACKBONE_CONNECTOR__API__MAX_JSON_BODY", "12"),
            ]),
        )
        .expect_err("a tiny body limit");
        assert!(error.to_string().contains("api.max_json_body"), "{error}");
        let error = Config::load(
            None,
            env(&[
                ("BACKBONE_CONNECTOR__API__API_KEYS", &format!("[\"{key}\"]")),
                ("BACKBONE_CONNECTOR__BACKBONE__FINGERPRINT", "00"),
                ("BACKBONE_CONNECTOR__API__NOPE", "1"),
            ]),
        )
        .expect_err("an unknown key");
        assert!(error.to_string().contains("nope"), "{error}");
    }

    #[test]
    fn webhook_endpoints_are_checked() {
        let mut config = Config::default();
        config.api.api_keys = vec![hash_key("k")];
        config.backbone.fingerprint = Some("00".into());
        config.webhooks.endpoints = vec![WebhookEndpoint {
            url: "ftp://example.invalid/".into(),
            secret: "0123456789abcdef".into(),
        }];
        assert!(config.validate().is_err());
        config.webhooks.endpoints[0].url = "http://127.0.0.1:9/hook".into();
        config.validate().expect("valid");
        let twice = config.webhooks.endpoints[0].clone();
        config.webhooks.endpoints.push(twice);
        let error = config.validate().expect_err("a URL twice");
        assert!(error.to_string().contains("listed twice"), "{error}");
        config.webhooks.endpoints.pop();
        config.webhooks.endpoints[0].secret = "short".into();
        assert!(config.validate().is_err());
        assert!(!format!("{:?}", config.webhooks.endpoints[0]).contains("short"));
    }
}
