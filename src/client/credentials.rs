//! The client's settings file and where credentials come from.
//!
//! Each credential (CA, certificate, key) is taken from the first of: the
//! command-line flag, the client config file (`--config`, else
//! `$XDG_CONFIG_HOME/imgsvc/client.toml`, else `~/.config/imgsvc/client.toml`),
//! the environment (`IMGSVC_CA`, `IMGSVC_CERT`, `IMGSVC_KEY`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The client config file. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfigFile {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read client config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("client config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no {what} given: looked for {flag}, {file_key} in {files}, and the {env} environment variable")]
    Missing { what: &'static str, flag: &'static str, file_key: &'static str, files: String, env: &'static str },
}

impl ClientConfigFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self, CredentialsError> {
        toml_from_str(text).map_err(|message| CredentialsError::Parse { path: path.into(), message })
    }

    /// Loads `explicit` (must exist) or the first default location that
    /// exists. Returns the file (empty if none) and the places looked at.
    pub fn discover(explicit: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<(Self, Vec<PathBuf>), CredentialsError> {
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => default_locations(env),
        };
        for path in &candidates {
            match std::fs::read_to_string(path) {
                Ok(text) => return Ok((Self::parse(path, &text)?, candidates)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => continue,
                Err(source) => return Err(CredentialsError::Read { path: path.clone(), source }),
            }
        }
        Ok((Self::default(), candidates))
    }
}

fn default_locations(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(xdg) = env("XDG_CONFIG_HOME").filter(|s| !s.is_empty()) {
        v.push(PathBuf::from(xdg).join("imgsvc/client.toml"));
    }
    if let Some(home) = env("HOME").filter(|s| !s.is_empty()) {
        let p = PathBuf::from(home).join(".config/imgsvc/client.toml");
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

fn toml_from_str(text: &str) -> Result<ClientConfigFile, String> {
    // The `config` crate parses TOML for us; no second TOML parser needed.
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

/// Paths of the three PEM files, resolved by precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Resolves each credential from flag, then file, then environment.
pub fn resolve(
    flags: (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    file: &ClientConfigFile,
    looked_in: &[PathBuf],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CredentialPaths, CredentialsError> {
    let files = if looked_in.is_empty() {
        "no client config file".to_string()
    } else {
        looked_in.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
    };
    let pick = |flag_value: Option<PathBuf>, file_value: &Option<PathBuf>, what, flag, file_key, var: &'static str| {
        flag_value
            .or_else(|| file_value.clone())
            .or_else(|| env(var).filter(|s| !s.is_empty()).map(PathBuf::from))
            .ok_or_else(|| CredentialsError::Missing { what, flag, file_key, files: files.clone(), env: var })
    };
    Ok(CredentialPaths {
        ca: pick(flags.0, &file.ca, "CA certificate", "--ca", "ca", "IMGSVC_CA")?,
        cert: pick(flags.1, &file.cert, "client certificate", "--cert", "cert", "IMGSVC_CERT")?,
        key: pick(flags.2, &file.key, "client key", "--key", "key", "IMGSVC_KEY")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn flag_beats_file_beats_env() {
        let file = ClientConfigFile { ca: Some("file-ca".into()), cert: Some("file-cert".into()), ..Default::default() };
        let env = |k: &str| Some(format!("env-{k}"));
        let got = resolve((Some("flag-ca".into()), None, None), &file, &[], &env).unwrap();
        assert_eq!(got, CredentialPaths { ca: "flag-ca".into(), cert: "file-cert".into(), key: "env-IMGSVC_KEY".into() });
    }

    #[test]
    fn missing_credential_says_which_and_where_it_looked() {
        let err = resolve((Some("a".into()), Some("b".into()), None), &ClientConfigFile::default(), &["/x/client.toml".into()], &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "no client key given: looked for --key, key in /x/client.toml, and the IMGSVC_KEY environment variable");
    }

    #[test]
    fn parses_file_and_refuses_unknown_keys() {
        let ok = ClientConfigFile::parse(Path::new("c.toml"), "host = \"h\"\nport = 7\nca = \"ca.pem\"\n").unwrap();
        assert_eq!((ok.host.as_deref(), ok.port), (Some("h"), Some(7)));
        let err = ClientConfigFile::parse(Path::new("c.toml"), "hots = \"h\"\n").unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("hots"), "{err}");
    }

    #[test]
    fn discovers_xdg_location_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("imgsvc")).unwrap();
        std::fs::write(dir.path().join("imgsvc/client.toml"), "port = 9\n").unwrap();
        let root = dir.path().to_string_lossy().to_string();
        let env = move |k: &str| (k == "XDG_CONFIG_HOME").then(|| root.clone());
        let (file, looked) = ClientConfigFile::discover(None, &env).unwrap();
        assert_eq!(file.port, Some(9));
        assert_eq!(looked, vec![dir.path().join("imgsvc/client.toml")]);
    }

    #[test]
    fn explicit_config_must_exist() {
        let err = ClientConfigFile::discover(Some(Path::new("/nonexistent/c.toml")), &no_env).unwrap_err();
        assert!(matches!(err, CredentialsError::Read { .. }), "{err}");
    }
}
