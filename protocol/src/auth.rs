//! The TCP ingest token. TCP peers on loopback have no uid the daemon can trust, so they send a shared token,
//! read from a file only its owner can read, in their first line (see docs/protocol.md, "Authentication").
//! Unix peers need none: the daemon checks their uid.

use std::path::Path;

/// Environment variable a sender reads the TCP ingest token file's path from when it is given none.
pub const TOKEN_FILE_ENV: &str = "GAINGUARD_INGEST_TOKEN_FILE";

/// Longest accepted token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// A shared secret. Compared in constant time; never printed.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads a token file: a regular file owned by this process's effective user, with no permission bits
    /// for group or others, holding one line of 1 to [`MAX_TOKEN_BYTES`] printable ASCII characters.
    pub fn from_file(path: &Path) -> Result<Token, String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!("mode {mode:04o} lets other users read it; expected 0600 (chmod 600)"));
        }
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(format!("owned by uid {}, expected this process's uid {euid}", meta.uid()));
        }
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let token = text.trim_ascii();
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(format!("expected one line of 1 to {MAX_TOKEN_BYTES} characters"));
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err("expected printable ASCII without spaces".into());
        }
        Ok(Token(token.to_vec()))
    }

    pub fn as_str(&self) -> &str {
        // Checked to be ASCII in from_file.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Compares without an early exit, so that timing does not reveal a matching prefix.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let mut diff = u8::from(self.0.len() != candidate.len());
        for (i, b) in self.0.iter().enumerate() {
            diff |= b ^ candidate.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Token {
        Token(s.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_matches_only_itself() {
        let t = Token::from("s3cret");
        assert!(t.matches(b"s3cret"));
        for other in [&b"s3cre"[..], b"s3crett", b"S3cret", b"", b"s3cret\0"] {
            assert!(!t.matches(other), "{other:?}");
        }
    }

    #[test]
    fn a_token_file_readable_by_others_is_refused_and_a_0600_one_is_read_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Token::from_file(&path).unwrap_err().contains("0644"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Token::from_file(&path).unwrap().as_str(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(Token::from_file(&path).is_err());
    }
}
