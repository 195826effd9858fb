//! The live page's static files, built into the binary: no CDN and no network. `index.html` loads
//! `style.css` and `app.js`, a small hand-written script that reads `/api/v1/` and draws plain SVG.

const INDEX: &[u8] = include_bytes!("index.html");
const STYLE: &[u8] = include_bytes!("style.css");
const APP: &[u8] = include_bytes!("app.js");

/// The content type and bytes served at `path`, if it is one of the page's files.
pub(crate) fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/style.css" => Some(("text/css; charset=utf-8", STYLE)),
        "/app.js" => Some(("text/javascript; charset=utf-8", APP)),
        _ => None,
    }
}
