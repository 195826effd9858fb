//! Who may read the HTTP endpoint: TLS and basic authentication from a `--web.config.file` in
//! exporter-toolkit's format ([`file`]), and the rule that an address off loopback is served only with TLS
//! or by an explicit choice to leave it unprotected ([`check_exposure`]).
//!
//! The file is read once, when the daemon starts: a changed certificate takes a restart (the toolkit reads
//! the file on every request).

mod basic_auth;
mod file;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

use hyper::header::{HeaderName, HeaderValue};

use crate::error::DaemonError;
pub(crate) use basic_auth::BasicAuth;
pub(crate) use tls::TLS_HANDSHAKE_RECORD;

/// Environment variable naming the web config file when [`WebSettings::config_file`] is not set in code or
/// on the command line (read by [`WebSettings::default`]): the way to give one to an embedded daemon.
pub const WEB_CONFIG_ENV: &str = "GAINGUARD_WEB_CONFIG_FILE";
/// Environment variable that, set to `1`, is [`WebSettings::listen_unprotected`] (read by
/// [`WebSettings::default`]).
pub const LISTEN_UNPROTECTED_ENV: &str = "GAINGUARD_WEB_LISTEN_UNPROTECTED";

/// How the HTTP endpoint is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebSettings {
    /// A file in exporter-toolkit's `--web.config.file` format (docs/monitoring.md, "TLS and basic auth").
    /// Default: `$GAINGUARD_WEB_CONFIG_FILE`.
    pub config_file: Option<PathBuf>,
    /// Serve an address off loopback without TLS. Default: `$GAINGUARD_WEB_LISTEN_UNPROTECTED` is `1`.
    pub listen_unprotected: bool,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            config_file: std::env::var_os(WEB_CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from),
            listen_unprotected: std::env::var(LISTEN_UNPROTECTED_ENV).is_ok_and(|v| v == "1"),
        }
    }
}

/// The endpoint's protection, loaded from the file.
pub(crate) struct Web {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub auth: BasicAuth,
    /// `http_server_config.headers`, added to every answer.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Web {
    /// Reads and checks the file (none: plain HTTP, no authentication). Every error names the file's field.
    pub fn load(settings: &WebSettings) -> Result<Web, DaemonError> {
        let Some(path) = &settings.config_file else {
            return Ok(Web { tls: None, auth: BasicAuth::new(std::path::Path::new(""), Default::default())?, headers: Vec::new() });
        };
        let f = file::read(path)?;
        let tls = f
            .tls_server_config
            .as_ref()
            .map(|t| tls::server_config(path, t))
            .transpose()?
            .map(tokio_rustls::TlsAcceptor::from);
        let mut headers = Vec::new();
        if let Some(h) = &f.http_server_config {
            for (name, value) in h.headers.set() {
                let v = HeaderValue::from_str(value).map_err(|_| {
                    file::field_error(path, &format!("http_server_config.headers.{name}"), "not a valid header value")
                })?;
                let field = format!("http_server_config.headers.{name}");
                // from_bytes lower-cases the name, as HTTP/1.1 headers are matched.
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| file::field_error(path, &field, "not a valid header name"))?;
                headers.push((name, v));
            }
        }
        let auth = BasicAuth::new(path, f.basic_auth_users)?;
        Ok(Web { tls, auth, headers })
    }
}

/// Refuses to serve an address that other machines can reach without TLS, unless told to: the metrics carry
/// run and parameter names, and basic auth without TLS sends its passwords in the clear.
pub fn check_exposure(listen: SocketAddr, tls: bool, listen_unprotected: bool) -> Result<(), DaemonError> {
    if tls || listen_unprotected || listen.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(DaemonError::Setting {
        setting: "listen".into(),
        detail: format!(
            "{listen}: an address off loopback would serve /metrics to the network in plain HTTP; configure TLS in \
             --web.config.file (${WEB_CONFIG_ENV} for an embedded daemon; docs/monitoring.md), or pass \
             --web.listen-unprotected (${LISTEN_UNPROTECTED_ENV}=1) to serve it unprotected"
        ),
    })
}

/// What a plain-HTTP client gets from a TLS port (the words of Go's `net/http`, which Prometheus users know).
pub(crate) const PLAIN_HTTP_ANSWER: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_off_loopback_needs_tls_or_the_explicit_flag() {
        let any: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let e = check_exposure(any, false, false).unwrap_err().to_string();
        assert!(e.contains("--listen 0.0.0.0:9464") && e.contains("--web.config.file") && e.contains("--web.listen-unprotected"), "{e}");
        assert!(check_exposure(any, true, false).is_ok());
        assert!(check_exposure(any, false, true).is_ok());
        for ok in ["127.0.0.1:9464", "127.3.4.5:1", "[::1]:9464", "[::ffff:127.0.0.1]:9464"] {
            assert!(check_exposure(ok.parse().unwrap(), false, false).is_ok(), "{ok}");
        }
        for refused in ["192.168.1.2:9464", "[::]:9464", "10.0.0.1:0"] {
            assert!(check_exposure(refused.parse().unwrap(), false, false).is_err(), "{refused}");
        }
    }

    /// A CA, a server certificate it signed for 127.0.0.1, and their PEM files in a temporary folder.
    pub(crate) struct Pki {
        pub dir: tempfile::TempDir,
    }

    impl Pki {
        pub fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &*ca).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
            Pki { dir }
        }

        /// Loads a web config file with this text, written next to the PEM files.
        pub fn load(&self, text: &str) -> Result<Web, DaemonError> {
            let path = self.dir.path().join("web.yml");
            std::fs::write(&path, text).unwrap();
            Web::load(&WebSettings { config_file: Some(path), listen_unprotected: false })
        }
    }

    fn err(pki: &Pki, text: &str) -> String {
        match pki.load(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const TLS: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";

    #[test]
    fn a_certificate_and_key_relative_to_the_file_give_tls() {
        let pki = Pki::new();
        assert!(pki.load(TLS).unwrap().tls.is_some());
        let mtls = format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n");
        assert!(pki.load(&mtls).unwrap().tls.is_some());
        assert!(pki.load("basic_auth_users: {}\n").unwrap().tls.is_none());
    }

    #[test]
    fn a_missing_certificate_or_key_file_is_refused_naming_the_field() {
        let pki = Pki::new();
        let e = err(&pki, "tls_server_config:\n  cert_file: nowhere.pem\n  key_file: server.key\n");
        assert!(e.contains("tls_server_config.cert_file") && e.contains("nowhere.pem"), "{e}");
        let e = err(&pki, "tls_server_config:\n  cert_file: server.pem\n  key_file: nowhere.key\n");
        assert!(e.contains("tls_server_config.key_file") && e.contains("nowhere.key"), "{e}");
        let e = err(&pki, "tls_server_config:\n  cert_file: server.pem\n");
        assert!(e.contains("tls_server_config.key_file: missing"), "{e}");
        let e = err(&pki, "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n");
        assert!(e.contains("tls_server_config.cert_file") && e.contains("no PEM certificate"), "{e}");
        let e = err(&pki, "tls_server_config:\n  cert_file: server.pem\n  key_file: ca.pem\n");
        assert!(e.contains("tls_server_config.key_file") && e.contains("private key"), "{e}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let pki = Pki::new();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(pki.dir.path().join("other.key"), other.serialize_pem()).unwrap();
        let e = err(&pki, "tls_server_config:\n  cert_file: server.pem\n  key_file: other.key\n");
        assert!(e.contains("tls_server_config.key_file") && e.contains("does not fit"), "{e}");
    }

    #[test]
    fn a_bad_client_auth_type_is_refused_with_the_accepted_ones() {
        let pki = Pki::new();
        let e = err(&pki, &format!("{TLS}  client_auth_type: VerifyEverything\n"));
        assert!(e.contains("tls_server_config.client_auth_type") && e.contains("RequireAndVerifyClientCert"), "{e}");
        let e = err(&pki, &format!("{TLS}  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.pem\n"));
        assert!(e.contains("tls_server_config.client_auth_type") && e.contains("not supported"), "{e}");
        let e = err(&pki, &format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n"));
        assert!(e.contains("tls_server_config.client_ca_file: missing"), "{e}");
        let e = err(&pki, &format!("{TLS}  client_ca_file: ca.pem\n"));
        assert!(e.contains("tls_server_config.client_ca_file") && e.contains("NoClientCert"), "{e}");
    }

    #[test]
    fn tls_versions_outside_rustls_are_refused() {
        let pki = Pki::new();
        let e = err(&pki, &format!("{TLS}  min_version: TLS10\n"));
        assert!(e.contains("tls_server_config.min_version") && e.contains("not supported"), "{e}");
        let e = err(&pki, &format!("{TLS}  min_version: TLS13\n  max_version: TLS12\n"));
        assert!(e.contains("tls_server_config.min_version"), "{e}");
        assert!(pki.load(&format!("{TLS}  min_version: TLS13\n")).is_ok());
    }

    #[test]
    fn a_missing_file_is_refused_naming_it() {
        let e = Web::load(&WebSettings { config_file: Some("/nonexistent/web.yml".into()), listen_unprotected: false })
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/web.yml"), "{e}");
    }
}
