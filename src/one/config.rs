//! Configuration the way OpenNebula users already have it: `ONE_XMLRPC`, `ONEFLOW_URL`,
//! `ONE_AUTH` (a file holding `user:password`), `ONEGATE_ENDPOINT`, plus an optional CA
//! bundle, a timeout and the shared request budget.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::calls::{strip_userinfo_in_text, RetryPolicy, DEFAULT_REQUESTS_PER_SECOND};
use super::secret::Secret;

/// Default `ONE_XMLRPC`.
pub const DEFAULT_XMLRPC: &str = "http://localhost:2633/RPC2";
/// Default `ONEFLOW_URL`.
pub const DEFAULT_ONEFLOW: &str = "http://localhost:2474";
/// Default request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on an oned answer (a 2,000-VM extended page is ~12 MB).
pub const DEFAULT_MAX_XMLRPC_BODY: usize = 256 * 1024 * 1024;

/// Configuration errors. They never hold the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds something unusable.
    #[error("{var}: {reason}")]
    Invalid {
        /// Variable or setting name.
        var: String,
        /// Why.
        reason: String,
    },
    /// The auth file cannot be used.
    #[error("auth file {path}: {reason}")]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// OpenNebula credentials. `Debug` and `Display` print `user:***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: Secret,
}

impl Credentials {
    /// From a user name and a password (or login token).
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Result<Self, ConfigError> {
        let user = user.into();
        let password = password.into();
        let bad = |reason: &str| ConfigError::Invalid {
            var: "credentials".into(),
            reason: reason.into(),
        };
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            return Err(bad(
                "the user name must be non-empty, without ':' or control characters",
            ));
        }
        if password.is_empty() || password.chars().any(char::is_control) {
            return Err(bad(
                "the password must be non-empty, without control characters",
            ));
        }
        Ok(Self {
            user,
            password: Secret::new(password),
        })
    }

    /// Parse `user:password` (the `one_auth` format; trailing whitespace stripped).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let text = text.trim_end();
        let (user, password) = text.split_once(':').ok_or_else(|| ConfigError::Invalid {
            var: "ONE_AUTH".into(),
            reason: "expected user:password".into(),
        })?;
        Self::new(user, password)
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password (or token).
    pub fn password(&self) -> &Secret {
        &self.password
    }

    /// The oned session string `user:password`.
    pub(crate) fn session(&self) -> Secret {
        Secret::new(format!("{}:{}", self.user, self.password.expose()))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:***", self.user)
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:***", self.user)
    }
}

/// Read a `one_auth` file.
///
/// Guarantees: a file readable by group or others is refused unless `allow_insecure`
/// (the password would be exposed to other local users). Errors never quote the file.
pub fn read_auth_file(path: &Path, allow_insecure: bool) -> Result<Credentials, ConfigError> {
    let fail = |reason: String| ConfigError::AuthFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !allow_insecure {
            return Err(fail(format!(
                "mode {mode:03o} lets other users read it; chmod 600 it (or allow an insecure auth file explicitly)"
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let first = text.lines().next().unwrap_or_default();
    Credentials::parse(first).map_err(|_| fail("expected one line user:password".into()))
}

/// Settings for all three clients.
#[derive(Debug, Clone)]
pub struct OneConfig {
    /// oned XML-RPC endpoint.
    pub xmlrpc: Url,
    /// OneFlow endpoint.
    pub oneflow: Url,
    /// OneGate endpoint, when set.
    pub onegate: Option<Url>,
    /// Credentials for oned and OneFlow.
    pub credentials: Credentials,
    /// Timeout of every request.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) for https endpoints.
    pub ca_bundle: Option<PathBuf>,
    /// Requests per second for the shared [`super::ApiBudget`].
    pub requests_per_second: NonZeroU32,
    /// Retries of idempotent reads.
    pub retry: RetryPolicy,
    /// Cap on an oned answer.
    pub max_xmlrpc_body: usize,
    /// Cap on a OneFlow answer.
    pub max_http_body: usize,
    /// `User-Agent` of every oned and OneFlow request: `flower-reconcile/<version>`, with
    /// the instance id once `run` or `apply` knows it
    /// ([`super::http::user_agent_with_instance`]).
    pub user_agent: String,
}

/// Options of [`OneConfig::from_lookup`].
#[derive(Debug, Clone, Default)]
pub struct ConfigOptions {
    /// Accept a group- or world-readable auth file.
    pub allow_insecure_auth_file: bool,
    /// The home directory for `~/.one/one_auth` (default: `$HOME`).
    pub home: Option<PathBuf>,
}

fn parse_url(var: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim()).map_err(|e| ConfigError::Invalid {
        var: var.into(),
        reason: format!(
            "{:?} is not a URL: {e}",
            strip_userinfo_in_text(&super::json::shorten(text))
        ),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid {
            var: var.into(),
            reason: format!("scheme must be http or https, not {}", url.scheme()),
        });
    }
    Ok(url)
}

impl OneConfig {
    /// Explicit settings with defaults for everything else.
    pub fn new(xmlrpc: Url, oneflow: Url, credentials: Credentials) -> Self {
        Self {
            xmlrpc,
            oneflow,
            onegate: None,
            credentials,
            timeout: DEFAULT_TIMEOUT,
            ca_bundle: None,
            requests_per_second: NonZeroU32::new(DEFAULT_REQUESTS_PER_SECOND)
                .unwrap_or(NonZeroU32::MIN),
            retry: RetryPolicy::default(),
            max_xmlrpc_body: DEFAULT_MAX_XMLRPC_BODY,
            max_http_body: super::http::DEFAULT_MAX_BODY * 4,
            user_agent: super::http::CONTROLLER_AGENT.to_string(),
        }
    }

    /// From variables (`ONE_XMLRPC`, `ONEFLOW_URL`, `ONE_AUTH`, `ONEGATE_ENDPOINT`) looked
    /// up with `lookup` (e.g. the process environment).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        opts: &ConfigOptions,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let xmlrpc = parse_url(
            "ONE_XMLRPC",
            &get("ONE_XMLRPC").unwrap_or(DEFAULT_XMLRPC.into()),
        )?;
        let oneflow = parse_url(
            "ONEFLOW_URL",
            &get("ONEFLOW_URL").unwrap_or(DEFAULT_ONEFLOW.into()),
        )?;
        let onegate = get("ONEGATE_ENDPOINT")
            .map(|v| parse_url("ONEGATE_ENDPOINT", &v))
            .transpose()?;
        let auth_path = match get("ONE_AUTH") {
            Some(p) => PathBuf::from(p),
            None => {
                let home = opts
                    .home
                    .clone()
                    .or_else(|| get("HOME").map(PathBuf::from))
                    .ok_or_else(|| ConfigError::Invalid {
                        var: "ONE_AUTH".into(),
                        reason: "not set and there is no HOME for ~/.one/one_auth".into(),
                    })?;
                home.join(".one/one_auth")
            }
        };
        let credentials = read_auth_file(&auth_path, opts.allow_insecure_auth_file)?;
        let mut cfg = Self::new(xmlrpc, oneflow, credentials);
        cfg.onegate = onegate;
        Ok(cfg)
    }

    /// A remote site's clients (`[sites.NAME]` of `run`'s config): the same checks as the
    /// variables get, `setting` naming the table in errors; the auth file is read like
    /// `ONE_AUTH` (refused when other users can read it) and never quoted.
    pub fn for_site(
        setting: &str,
        xmlrpc: &str,
        oneflow: &str,
        auth_file: &Path,
        ca_bundle: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let xmlrpc = parse_url(&format!("{setting}.xmlrpc"), xmlrpc)?;
        let oneflow = parse_url(&format!("{setting}.oneflow"), oneflow)?;
        let credentials = read_auth_file(auth_file, false)?;
        let mut cfg = Self::new(xmlrpc, oneflow, credentials);
        cfg.ca_bundle = ca_bundle.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// From the process environment.
    pub fn from_env(opts: &ConfigOptions) -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok(), opts)
    }

    /// The endpoints reached over plain `http://` on another host: the session (user and
    /// password) and every answer cross the network readable by anyone on the path.
    /// Loopback (`localhost`, 127.0.0.0/8, `::1`) is exempt: a front-end's own services
    /// listen there by default.
    pub fn plaintext_remote_endpoints(&self) -> Vec<(&'static str, &Url)> {
        let mut out = vec![("ONE_XMLRPC", &self.xmlrpc), ("ONEFLOW_URL", &self.oneflow)];
        out.extend(self.onegate.as_ref().map(|u| ("ONEGATE_ENDPOINT", u)));
        out.retain(|(_, u)| u.scheme() == "http" && !is_loopback(u));
        out
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn auth_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("one_auth");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn credentials_never_print_the_password() {
        let c = Credentials::parse("oneadmin:s3cr3t-pw\n").unwrap();
        assert_eq!(c.user(), "oneadmin");
        assert_eq!(c.password().expose(), "s3cr3t-pw");
        assert_eq!(format!("{c}"), "oneadmin:***");
        assert_eq!(format!("{c:?}"), "oneadmin:***");
        assert!(Credentials::parse("nocolon").is_err());
        assert!(Credentials::parse(":pw").is_err());
        assert!(Credentials::parse("u:").is_err());
    }

    #[test]
    fn auth_file_modes() {
        let d = tempfile::tempdir().unwrap();
        let p = auth_file(d.path(), "flower:pw-in-file  \n", 0o600);
        assert_eq!(
            read_auth_file(&p, false).unwrap().password().expose(),
            "pw-in-file"
        );
        let p = auth_file(d.path(), "flower:pw-in-file\n", 0o644);
        let e = read_auth_file(&p, false).unwrap_err();
        assert!(e.to_string().contains("644"), "{e}");
        assert!(!e.to_string().contains("pw-in-file"));
        assert!(read_auth_file(&p, true).is_ok());
        let p = auth_file(d.path(), "garbage-without-colon-secret\n", 0o600);
        let e = read_auth_file(&p, false).unwrap_err();
        assert!(!e.to_string().contains("garbage"), "{e}");
    }

    /// Guarantee: a plain-http endpoint on another host is named (and warned about where
    /// the controller connects); loopback and https are not.
    #[test]
    fn plaintext_remote_endpoints_are_named() {
        let c = Credentials::parse("oneadmin:pw").unwrap();
        let url = |s: &str| Url::parse(s).unwrap();
        let mut cfg = OneConfig::new(
            url("http://one.example:2633/RPC2"),
            url("http://127.0.0.1:2474"),
            c,
        );
        cfg.onegate = Some(url("http://[::1]:5030"));
        let vars = |cfg: &OneConfig| -> Vec<&str> {
            cfg.plaintext_remote_endpoints()
                .iter()
                .map(|(v, _)| *v)
                .collect()
        };
        assert_eq!(vars(&cfg), ["ONE_XMLRPC"]);
        cfg.xmlrpc = url("https://one.example:2633/RPC2");
        cfg.oneflow = url("http://LOCALHOST:2474");
        assert!(vars(&cfg).is_empty());
        cfg.onegate = Some(url("http://10.0.0.1:5030"));
        cfg.oneflow = url("http://127.0.0.2.example:2474");
        assert_eq!(vars(&cfg), ["ONEFLOW_URL", "ONEGATE_ENDPOINT"]);
    }

    #[test]
    fn from_lookup_defaults_and_overrides() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(".one")).unwrap();
        auth_file(&d.path().join(".one"), "oneadmin:pw", 0o600);
        let opts = ConfigOptions {
            home: Some(d.path().to_path_buf()),
            ..Default::default()
        };
        let cfg = OneConfig::from_lookup(|_| None, &opts).unwrap();
        assert_eq!(cfg.xmlrpc.as_str(), DEFAULT_XMLRPC);
        assert_eq!(cfg.oneflow.as_str(), "http://localhost:2474/");
        assert_eq!(cfg.onegate, None);
        let explicit = auth_file(d.path(), "flower:other", 0o600);
        let vars = [
            ("ONE_XMLRPC", "https://one.example:2633/RPC2"),
            ("ONEFLOW_URL", "https://one.example:2474"),
            ("ONEGATE_ENDPOINT", "http://169.254.16.9:5030"),
        ];
        let cfg = OneConfig::from_lookup(
            |k| {
                if k == "ONE_AUTH" {
                    return Some(explicit.display().to_string());
                }
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            },
            &opts,
        )
        .unwrap();
        assert_eq!(cfg.xmlrpc.host_str(), Some("one.example"));
        assert_eq!(cfg.credentials.user(), "flower");
        assert!(cfg.onegate.is_some());
        assert!(!format!("{cfg:?}").contains("other"));
        let e = OneConfig::from_lookup(|k| (k == "ONE_XMLRPC").then(|| "ftp://x".into()), &opts)
            .unwrap_err();
        assert!(e.to_string().contains("ONE_XMLRPC"), "{e}");
    }
}
