//! The live page and its JSON sit behind the web config file's basic auth, like `/metrics`: without the
//! password every one of them is 401, with it 200 with the page's own content types.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use base64::Engine;
use gainguard_daemon::config::WebSettings;
use gainguard_daemon::{Daemon, DaemonConfig, NvmlSettings, SourceSettings};

fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let header = auth.map(|a| format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(a))).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{header}Connection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, raw)
}

#[test]
fn the_page_its_assets_and_its_json_ask_for_the_password_of_the_web_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.yml");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&file, format!("basic_auth_users:\n  viewer: {hash}\n")).unwrap();
    let daemon = Daemon::spawn(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        web: WebSettings { config_file: Some(file), listen_unprotected: false },
        sources: SourceSettings { nvml: NvmlSettings::off() },
        ..Default::default()
    })
    .unwrap();
    let addr = daemon.metrics_addr();
    let pages = [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/api/v1/overview", "application/json"),
        ("/api/v1/gpus", "application/json"),
    ];
    for (path, content_type) in pages {
        assert_eq!(get(addr, path, None).0, 401, "{path} without a password");
        assert_eq!(get(addr, path, Some("viewer:wrong")).0, 401, "{path} with a wrong password");
        let (status, raw) = get(addr, path, Some("viewer:s3cret"));
        assert_eq!(status, 200, "{path}: {raw}");
        assert!(raw.to_ascii_lowercase().contains(&format!("content-type: {content_type}")), "{path}: {raw}");
    }
    // A run the history does not hold is a 404 naming it; a missing parameter a 400 naming it.
    let (status, raw) = get(addr, "/api/v1/run?run=nope&rank=0&host=h", Some("viewer:s3cret"));
    assert!(status == 404 && raw.contains("no run `nope`"), "{raw}");
    let (status, raw) = get(addr, "/api/v1/run?run=nope", Some("viewer:s3cret"));
    assert!(status == 400 && raw.contains("`rank`"), "{raw}");
    daemon.shutdown();
}
