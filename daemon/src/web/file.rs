//! The `--web.config.file` format of Prometheus' exporter-toolkit (its docs/web-configuration.md), as
//! node_exporter and every exporter built on the toolkit read it: `tls_server_config`, `http_server_config`
//! and `basic_auth_users`. A field the toolkit documents but gainguardd does not implement is refused by
//! name, never ignored, so that a file written for another exporter cannot silently protect less here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::DaemonError;

/// The whole file. Every field is optional; an empty file means plain HTTP without authentication.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebConfigFile {
    pub tls_server_config: Option<TlsServerConfig>,
    pub http_server_config: Option<HttpServerConfig>,
    /// User name → bcrypt hash of the password.
    #[serde(default)]
    pub basic_auth_users: BTreeMap<String, String>,
    /// The toolkit's token bucket; not implemented here (`max_concurrent_scrapes` bounds the load instead).
    pub rate_limit: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsServerConfig {
    /// PEM text inline, instead of `cert_file`.
    pub cert: Option<String>,
    /// PEM text inline, instead of `key_file`.
    pub key: Option<String>,
    /// PEM text inline, instead of `client_ca_file`.
    pub client_ca: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Go's `tls.ClientAuthType` names; default `NoClientCert`.
    pub client_auth_type: Option<String>,
    pub client_ca_file: Option<PathBuf>,
    pub client_allowed_sans: Option<Vec<String>>,
    /// `TLS12` (the default) or `TLS13`.
    pub min_version: Option<String>,
    /// `TLS13` (the default) or `TLS12`.
    pub max_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
    /// Default true: the server's order of cipher suites wins.
    pub prefer_server_cipher_suites: Option<bool>,
    pub curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpServerConfig {
    /// Accepted for compatibility and never read: gainguardd serves HTTP/1.1 only, which every Prometheus
    /// speaks.
    #[allow(dead_code)]
    pub http2: Option<bool>,
    #[serde(default)]
    pub headers: Headers,
}

/// Response headers added to every answer; the toolkit allows these five.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Headers {
    #[serde(rename = "Content-Security-Policy")]
    pub content_security_policy: Option<String>,
    #[serde(rename = "X-Frame-Options")]
    pub x_frame_options: Option<String>,
    #[serde(rename = "X-Content-Type-Options")]
    pub x_content_type_options: Option<String>,
    #[serde(rename = "X-XSS-Protection")]
    pub x_xss_protection: Option<String>,
    #[serde(rename = "Strict-Transport-Security")]
    pub strict_transport_security: Option<String>,
}

impl Headers {
    /// The set headers as (name, value), in the order above.
    pub fn set(&self) -> Vec<(&'static str, &str)> {
        [
            ("Content-Security-Policy", &self.content_security_policy),
            ("X-Frame-Options", &self.x_frame_options),
            ("X-Content-Type-Options", &self.x_content_type_options),
            ("X-XSS-Protection", &self.x_xss_protection),
            ("Strict-Transport-Security", &self.strict_transport_security),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_deref().filter(|v| !v.is_empty()).map(|v| (name, v)))
        .collect()
    }
}

/// An error about `field` of the file at `path`.
pub(crate) fn field_error(path: &Path, field: &str, detail: impl Into<String>) -> DaemonError {
    DaemonError::WebConfig { path: path.to_path_buf(), field: field.to_string(), detail: detail.into() }
}

/// Reads and parses the file; an unknown field or a value of the wrong type is an error that names it.
pub(crate) fn read(path: &Path) -> Result<WebConfigFile, DaemonError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DaemonError::WebConfig { path: path.to_path_buf(), field: "the file".into(), detail: e.to_string() })?;
    parse(path, &text)
}

pub(crate) fn parse(path: &Path, text: &str) -> Result<WebConfigFile, DaemonError> {
    // A file of comments only is an empty document, which serde reads as no struct at all.
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(path, e))?;
    if value.is_null() {
        return Ok(WebConfigFile::default());
    }
    // Parsed again from the text, so that an error carries its path in the file and its line.
    let file: WebConfigFile = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(path, e))?;
    file.refuse_unimplemented(path)?;
    Ok(file)
}

/// serde's message names the field (`tls_server_config: unknown field `cert_fil`, expected one of …`).
fn yaml_error(path: &Path, e: serde_yaml_ng::Error) -> DaemonError {
    let message = e.to_string();
    let location = match e.location() {
        Some(l) if !message.contains(" at line ") => format!(" at line {} column {}", l.line(), l.column()),
        _ => String::new(),
    };
    let (field, detail) = match message.split_once(": ") {
        Some((f, d)) if !f.contains(' ') => (f.to_string(), d.to_string()),
        _ => ("the file".to_string(), message),
    };
    field_error(path, &field, format!("{detail}{location}"))
}

impl WebConfigFile {
    fn refuse_unimplemented(&self, path: &Path) -> Result<(), DaemonError> {
        let unimplemented = |field: &str, why: &str| field_error(path, field, format!("not supported by gainguardd: {why}"));
        if self.rate_limit.is_some() {
            return Err(unimplemented("rate_limit", "--max-concurrent-scrapes bounds the load instead; remove the field"));
        }
        if let Some(t) = &self.tls_server_config {
            let lists = [
                ("tls_server_config.client_allowed_sans", &t.client_allowed_sans),
                ("tls_server_config.cipher_suites", &t.cipher_suites),
                ("tls_server_config.curve_preferences", &t.curve_preferences),
            ];
            for (field, list) in lists {
                if list.as_ref().is_some_and(|l| !l.is_empty()) {
                    return Err(unimplemented(field, "rustls' defaults apply (TLS 1.2 and 1.3 AEAD suites only); remove the field"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("web.yml"), text).unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_name_and_the_known_ones() {
        let e = err("tls_server_config:\n  cert_fil: a.pem\n");
        assert!(e.contains("web config file web.yml") && e.contains("tls_server_config") && e.contains("`cert_fil`"), "{e}");
        assert!(e.contains("cert_file"), "the known fields are listed: {e}");
        let e = err("basic_auth:\n  alice: x\n");
        assert!(e.contains("`basic_auth`") && e.contains("basic_auth_users"), "{e}");
    }

    #[test]
    fn a_documented_field_gainguardd_does_not_implement_is_refused_not_ignored() {
        let e = err("rate_limit:\n  interval: 1s\n  burst: 20\n");
        assert!(e.contains("rate_limit") && e.contains("not supported"), "{e}");
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n");
        assert!(e.contains("tls_server_config.client_allowed_sans"), "{e}");
    }

    #[test]
    fn an_empty_or_comment_only_file_means_no_tls_and_no_auth() {
        for text in ["", "# nothing yet\n", "---\n"] {
            let f = parse(Path::new("w.yml"), text).unwrap();
            assert!(f.tls_server_config.is_none() && f.basic_auth_users.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn a_file_in_the_toolkits_sample_layout_parses() {
        let f = parse(
            Path::new("w.yml"),
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  alice: $2y$05$gainguardsaltgainguarOfRAdQBPFp3cWH1T8XOk2YVvrx4Od9oK\n  bob: $2b$04$Zm9vYmFyYmF6cXV4cXV1e.otM79G3UUOeNbr0Yk6O5ArR0QSbRS66\n",
        )
        .unwrap();
        assert_eq!(f.tls_server_config.unwrap().cert_file.unwrap(), PathBuf::from("server.crt"));
        assert_eq!(f.basic_auth_users.len(), 2);
    }
}
