//! `gainguardd --web.config.file`: a real Prometheus scrapes it over TLS with basic auth; a wrong password,
//! an untrusted CA, a missing client certificate and plain HTTP are each refused; a bad file exits 2 naming
//! its field; an address off loopback is refused without TLS. The certificates are made when the test runs.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, http_get, prometheus_binary, spawn_prometheus, wait_until, ChildGuard};

/// Made by libxcrypt's crypt(3), not by the daemon's bcrypt crate: `python3 -c "import crypt;
/// print(crypt.crypt('correct horse', '$2y$05$gainguardsaltgainguardu'))"`.
const HASH: &str = "$2y$05$gainguardsaltgainguarOfRAdQBPFp3cWH1T8XOk2YVvrx4Od9oK";
const PASSWORD: &str = "correct horse";

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, as PEM files in a
/// temporary folder, with a second CA that signed nothing of these.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
        };
        let (ca, other_ca) = (ca("gainguard test CA"), ca("some other CA"));
        let leaf = |sans: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(sans).unwrap();
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &*ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        leaf(vec!["127.0.0.1".into()], rcgen::ExtendedKeyUsagePurpose::ServerAuth, "server");
        leaf(Vec::new(), rcgen::ExtendedKeyUsagePurpose::ClientAuth, "client");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a web config file; returns its path.
    fn web_config(&self, text: &str) -> PathBuf {
        let p = self.path("web.yml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

const TLS_AND_AUTH: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\nbasic_auth_users:\n  prometheus: HASH\n";

fn tls_and_auth() -> String {
    TLS_AND_AUTH.replace("HASH", HASH)
}

/// `gainguardd --web.config.file web` on a free loopback port, once its port accepts connections.
fn gainguardd_with(web: &Path) -> (ChildGuard, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gainguardd"))
        .arg(format!("--listen={addr}"))
        .arg(format!("--web.config.file={}", web.display()))
        .arg(format!("--ingest=unix:{}", dir.path().join("d.sock").display()))
        .args(["--nvml", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting gainguardd");
    let guard = ChildGuard(child);
    wait_until(Duration::from_secs(10), "gainguardd to accept connections", || TcpStream::connect(addr).ok());
    // The socket's folder may go: the daemon has bound it.
    drop(dir);
    (guard, addr)
}

/// A real Prometheus scraping `target` with one job per (name, scrape options in YAML).
struct Scraper {
    addr: SocketAddr,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Scraper {
    fn start(target: SocketAddr, jobs: &[(&str, String)]) -> Scraper {
        let dir = tempfile::tempdir().unwrap();
        let mut yaml = String::from("global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\nscrape_configs:\n");
        for (name, options) in jobs {
            yaml.push_str(&format!("  - job_name: {name}\n    static_configs:\n      - targets: ['{target}']\n"));
            for line in options.lines() {
                yaml.push_str(&format!("    {line}\n"));
            }
        }
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, yaml).unwrap();
        let (child, addr) = spawn_prometheus(&prometheus_binary(), &config, &dir.path().join("data"));
        wait_until(Duration::from_secs(30), "prometheus to become ready", || {
            http_get(addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        Scraper { addr, _child: child, _dir: dir }
    }

    /// The health (`up` or `down`) and last error of the job's target, once it has been scraped.
    fn target(&self, job: &str) -> (String, String) {
        wait_until(Duration::from_secs(15), &format!("job {job} to be scraped"), || {
            let (_, body) = http_get(self.addr, "/api/v1/targets?state=active").ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let t = v["data"]["activeTargets"].as_array()?.iter().find(|t| t["labels"]["job"] == job)?.clone();
            let health = t["health"].as_str()?.to_string();
            (health != "unknown").then(|| (health, t["lastError"].as_str().unwrap_or_default().to_string()))
        })
    }

    /// Waits until `query` returns at least one series; returns how many.
    fn series(&self, query: &str) -> usize {
        let url = format!("/api/v1/query?query={}", gainguard_test_support::http::percent_encode(query));
        wait_until(Duration::from_secs(15), query, || {
            let (_, body) = http_get(self.addr, &url).ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let n = v["data"]["result"].as_array()?.len();
            (n > 0).then_some(n)
        })
    }
}

fn https(pki: &Pki, ca: &str, user: &str, password: &str) -> String {
    format!(
        "scheme: https\ntls_config:\n  ca_file: {}\nbasic_auth:\n  username: {user}\n  password: '{password}'\n",
        pki.path(ca).display()
    )
}

#[test]
fn a_real_prometheus_scrapes_gainguardd_over_tls_with_basic_auth() {
    let pki = Pki::new();
    let (_gd, addr) = gainguardd_with(&pki.web_config(&tls_and_auth()));
    let prom = Scraper::start(addr, &[("tls", https(&pki, "ca.pem", "prometheus", PASSWORD))]);
    let (health, error) = prom.target("tls");
    assert_eq!((health.as_str(), error.as_str()), ("up", ""));
    assert_eq!(prom.series(r#"gainguard_build_info{job="tls"}"#), 1);
}

#[test]
fn a_prometheus_with_a_wrong_password_sees_the_target_down_with_401() {
    let pki = Pki::new();
    let (_gd, addr) = gainguardd_with(&pki.web_config(&tls_and_auth()));
    let prom = Scraper::start(
        addr,
        &[("wrong", https(&pki, "ca.pem", "prometheus", "correct horsf")), ("right", https(&pki, "ca.pem", "prometheus", PASSWORD))],
    );
    let (health, error) = prom.target("wrong");
    assert_eq!(health, "down");
    assert!(error.contains("401"), "{error}");
    // The refusals are counted, as the job with the right password sees.
    prom.series(r#"gainguard_http_refused_total{job="right",reason="unauthorized"} > 0"#);
}

#[test]
fn a_prometheus_that_does_not_trust_the_ca_sees_the_target_down() {
    let pki = Pki::new();
    let (_gd, addr) = gainguardd_with(&pki.web_config(&tls_and_auth()));
    let prom = Scraper::start(addr, &[("untrusted", https(&pki, "other-ca.pem", "prometheus", PASSWORD))]);
    let (health, error) = prom.target("untrusted");
    assert_eq!(health, "down");
    assert!(error.contains("certificate"), "{error}");
}

#[test]
fn plain_http_to_the_tls_port_is_refused() {
    let pki = Pki::new();
    let (_gd, addr) = gainguardd_with(&pki.web_config(&tls_and_auth()));
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("HTTP request to an HTTPS server"), "{body}");
    let plain = "basic_auth:\n  username: prometheus\n  password: 'correct horse'\n".to_string();
    let prom = Scraper::start(addr, &[("plain", plain)]);
    let (health, error) = prom.target("plain");
    assert_eq!(health, "down");
    assert!(error.contains("400"), "{error}");
}

#[test]
fn require_and_verify_client_cert_admits_only_a_certificate_the_ca_signed() {
    let pki = Pki::new();
    let web = format!(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\nbasic_auth_users:\n  prometheus: {HASH}\n"
    );
    let (_gd, addr) = gainguardd_with(&pki.web_config(&web));
    let with_cert = https(&pki, "ca.pem", "prometheus", PASSWORD).replace(
        "tls_config:\n",
        &format!("tls_config:\n  cert_file: {}\n  key_file: {}\n", pki.path("client.pem").display(), pki.path("client.key").display()),
    );
    let prom = Scraper::start(addr, &[("client_cert", with_cert), ("no_client_cert", https(&pki, "ca.pem", "prometheus", PASSWORD))]);
    let (health, error) = prom.target("client_cert");
    assert_eq!((health.as_str(), error.as_str()), ("up", ""));
    let (health, error) = prom.target("no_client_cert");
    assert_eq!(health, "down", "{error}");
    assert!(!error.is_empty());
}

/// Runs gainguardd with a web config file of this text (in `pki`'s folder) until it exits.
fn exit_with(pki: &Pki, text: &str) -> (i32, String) {
    let web = pki.web_config(text);
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("--listen=127.0.0.1:{}", free_port());
    let sock = format!("--ingest=unix:{}", dir.path().join("d.sock").display());
    let web = format!("--web.config.file={}", web.display());
    common::run_to_exit(&[&listen, &sock, &web, "--nvml=off"])
}

#[test]
fn a_bad_web_config_file_exits_2_naming_the_field() {
    let pki = Pki::new();
    let cases = [
        ("tls_server_config:\n  cert_fil: server.pem\n  key_file: server.key\n", "cert_fil"),
        ("tls_server_config:\n  cert_file: absent.pem\n  key_file: server.key\n", "tls_server_config.cert_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: absent.key\n", "tls_server_config.key_file"),
        ("basic_auth_users:\n  prometheus: '$2y$05$tooshort'\n", "basic_auth_users.prometheus"),
        (
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: RequireClientCert\n",
            "tls_server_config.client_auth_type",
        ),
    ];
    for (text, field) in cases {
        let (code, stderr) = exit_with(&pki, text);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert!(stderr.contains(field) && stderr.contains("web.yml"), "{text}: the message must name `{field}`: {stderr}");
    }
}

#[test]
fn a_good_web_config_file_is_not_refused() {
    // The counterpart of the test above: the same runner, a file with nothing wrong, keeps running.
    let pki = Pki::new();
    let (mut gd, _addr) = gainguardd_with(&pki.web_config(&tls_and_auth()));
    assert!(gd.0.try_wait().unwrap().is_none(), "gainguardd exited on a good file");
}

#[test]
fn an_address_off_loopback_is_refused_without_tls() {
    // Checked before anything binds, so no port off loopback is ever opened.
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("--ingest=unix:{}", dir.path().join("d.sock").display());
    let (code, stderr) = common::run_to_exit(&["--listen=0.0.0.0:0", &sock, "--nvml=off"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--listen 0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--web.config.file") && stderr.contains("--web.listen-unprotected"), "{stderr}");
}
