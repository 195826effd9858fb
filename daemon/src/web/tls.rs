//! `tls_server_config` → a rustls server configuration (ring's primitives; TLS 1.2 and 1.3).
//!
//! Client certificates follow Go's `tls.ClientAuthType`, as the toolkit does: `NoClientCert` (the default),
//! `VerifyClientCertIfGiven` and `RequireAndVerifyClientCert`, the last two against `client_ca_file`.
//! `RequestClientCert` and `RequireAnyClientCert` accept certificates that no CA signed, which authenticates
//! nobody; they are refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::file::{field_error, TlsServerConfig};
use crate::error::DaemonError;

/// The `client_auth_type` values accepted.
pub(crate) const CLIENT_AUTH_TYPES: [&str; 3] = ["NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"];

/// What the first byte of a TLS connection is: a handshake record (RFC 8446 §5.1, ContentType 22).
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A PEM source: inline text under `inline`, or a file under `file`; exactly one of them.
fn pem(path: &Path, inline: (&str, &Option<String>), file: (&str, &Option<PathBuf>)) -> Result<Option<(String, Vec<u8>)>, DaemonError> {
    match (inline.1, file.1) {
        (Some(_), Some(_)) => Err(field_error(path, file.0, format!("give `{}` or `{}`, not both", file.0, inline.0))),
        (Some(text), None) => Ok(Some((inline.0.to_string(), text.as_bytes().to_vec()))),
        (None, Some(f)) => {
            let f = relative_to(path, f);
            let bytes = std::fs::read(&f).map_err(|e| field_error(path, file.0, format!("cannot read {}: {e}", f.display())))?;
            Ok(Some((file.0.to_string(), bytes)))
        }
        (None, None) => Ok(None),
    }
}

/// A relative path in the file is relative to the file's folder, as in the toolkit.
fn relative_to(config: &Path, file: &Path) -> PathBuf {
    match config.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_path_buf(),
    }
}

fn certificates(path: &Path, field: &str, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, DaemonError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| field_error(path, field, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(field_error(path, field, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn version(path: &Path, field: &str, value: &Option<String>, default: &'static rustls::SupportedProtocolVersion) -> Result<&'static rustls::SupportedProtocolVersion, DaemonError> {
    match value.as_deref() {
        None => Ok(default),
        Some("TLS12") => Ok(&rustls::version::TLS12),
        Some("TLS13") => Ok(&rustls::version::TLS13),
        Some(v @ ("TLS10" | "TLS11")) => Err(field_error(path, field, format!("{v} is not supported (rustls speaks TLS12 and TLS13)"))),
        Some(v) => Err(field_error(path, field, format!("`{v}`, expected TLS12 or TLS13"))),
    }
}

/// Builds the server configuration; every error names the field of `tls_server_config` at fault.
pub(crate) fn server_config(path: &Path, t: &TlsServerConfig) -> Result<Arc<ServerConfig>, DaemonError> {
    let cert = pem(path, ("tls_server_config.cert", &t.cert), ("tls_server_config.cert_file", &t.cert_file))?
        .ok_or_else(|| field_error(path, "tls_server_config.cert_file", "missing: TLS needs a certificate (cert_file, or cert inline)"))?;
    let key = pem(path, ("tls_server_config.key", &t.key), ("tls_server_config.key_file", &t.key_file))?
        .ok_or_else(|| field_error(path, "tls_server_config.key_file", "missing: TLS needs the certificate's private key (key_file, or key inline)"))?;
    let chain = certificates(path, &cert.0, &cert.1)?;
    let private_key = PrivateKeyDer::from_pem_slice(&key.1)
        .map_err(|e| field_error(path, &key.0, format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;

    let min = version(path, "tls_server_config.min_version", &t.min_version, &rustls::version::TLS12)?;
    let max = version(path, "tls_server_config.max_version", &t.max_version, &rustls::version::TLS13)?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match (min.version, max.version) {
        (a, b) if a == b => vec![min],
        (rustls::ProtocolVersion::TLSv1_2, rustls::ProtocolVersion::TLSv1_3) => vec![&rustls::version::TLS13, &rustls::version::TLS12],
        _ => return Err(field_error(path, "tls_server_config.min_version", "TLS13 is above max_version TLS12")),
    };

    // ring has no post-quantum key exchange (hence the deprecation); X25519 and the NIST curves remain, which
    // every Prometheus offers, and aws-lc-rs would add minutes of C build to every build of the daemon.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| field_error(path, "tls_server_config.min_version", e.to_string()))?;

    let client_ca = pem(path, ("tls_server_config.client_ca", &t.client_ca), ("tls_server_config.client_ca_file", &t.client_ca_file))?;
    let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let auth_field = "tls_server_config.client_auth_type";
    let builder = match auth_type {
        "NoClientCert" => {
            if let Some((field, _)) = client_ca {
                return Err(field_error(path, &field, "given with client_auth_type NoClientCert, so no client certificate would be checked; set client_auth_type RequireAndVerifyClientCert"));
            }
            builder.with_no_client_auth()
        }
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let (field, bytes) = client_ca.ok_or_else(|| {
                field_error(path, "tls_server_config.client_ca_file", format!("missing: client_auth_type {auth_type} checks client certificates against it"))
            })?;
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, &field, &bytes)? {
                roots.add(ca).map_err(|e| field_error(path, &field, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth_type == "VerifyClientCertIfGiven" { verifier.allow_unauthenticated() } else { verifier };
            let verifier = verifier.build().map_err(|e| field_error(path, &field, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(field_error(path, auth_field, format!("{auth_type} is not supported: it accepts certificates that no CA signed; use RequireAndVerifyClientCert with client_ca_file")));
        }
        other => {
            return Err(field_error(path, auth_field, format!("`{other}`, expected one of {}", CLIENT_AUTH_TYPES.join(", "))));
        }
    };
    let mut config = builder
        .with_single_cert(chain, private_key)
        .map_err(|e| field_error(path, &key.0, format!("does not fit the certificate in {}: {e}", cert.0)))?;
    config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
