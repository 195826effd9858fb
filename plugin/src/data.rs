//! Training data with no download.
//!
//! - [`MarkovCorpus`]: a deterministic synthetic corpus from a seed. Tokens follow a sparse first-order
//!   Markov chain, so the loss falls well below `ln(vocab)`, and its entropy rate
//!   `H = Σ_i π_i · H(P(· | i))` (π the stationary distribution) is known exactly: the floor that no
//!   model can beat, shown in reports beside the loss.
//! - [`TokenFile`]: a user's raw text file (byte-level, vocab 256) or a nanoGPT-style `.bin` of
//!   little-endian `uint16` token ids.

use std::path::Path;

/// SplitMix64: a small, well-mixed generator, so corpora are identical on every machine.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Standard normal, by Box–Muller (one draw of the pair).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(1e-300);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A Markov source of order `order`: the next token depends on the previous `order` tokens (its
/// *context*). Order 1 is predictable from the current token alone; from order 2 on a model must look back
/// along the sequence (attention, in a transformer) to reach the entropy floor.
#[derive(Clone, Debug)]
pub struct MarkovCorpus {
    pub vocab: usize,
    pub order: usize,
    pub seed: u64,
    /// For each context (the previous `order` tokens as base-`vocab` digits, oldest first), its successors and
    /// their probabilities (summing to 1).
    pub transitions: Vec<Vec<(u32, f64)>>,
    /// Stationary distribution of the chain over contexts.
    pub stationary: Vec<f64>,
}

impl MarkovCorpus {
    /// A first-order chain over `vocab` tokens where each token has `branching` successors with random
    /// probabilities. One successor is always `i + 1 mod vocab`, so the chain is irreducible.
    pub fn new(vocab: usize, branching: usize, seed: u64) -> MarkovCorpus {
        MarkovCorpus::with_order(vocab, 1, branching, seed)
    }

    /// A chain of order `order` (1 or more; `vocab^order` contexts) where each context has `branching`
    /// successors with random probabilities. One successor of a context ending in token `i` is always
    /// `i + 1 mod vocab`.
    pub fn with_order(vocab: usize, order: usize, branching: usize, seed: u64) -> MarkovCorpus {
        assert!(vocab >= 2 && branching >= 1 && branching <= vocab, "vocab >= 2 and 1 <= branching <= vocab");
        let contexts = u32::try_from(order).ok().and_then(|o| vocab.checked_pow(o)).filter(|c| *c <= 1 << 22);
        let contexts = contexts.expect("order >= 1 and vocab^order <= 4M contexts");
        assert!(order >= 1, "order >= 1");
        let mut rng = SplitMix64::new(seed ^ 0x6761_696e_6775_6172);
        let transitions: Vec<Vec<(u32, f64)>> = (0..contexts)
            .map(|ctx| {
                let i = ctx % vocab;
                let mut succ = vec![((i + 1) % vocab) as u32];
                while succ.len() < branching {
                    let c = rng.below(vocab as u64) as u32;
                    if !succ.contains(&c) {
                        succ.push(c);
                    }
                }
                // Skewed weights (exponential of a uniform spread) give a spread of conditional entropies.
                let w: Vec<f64> = succ.iter().map(|_| (3.0 * rng.next_f64()).exp()).collect();
                let total: f64 = w.iter().sum();
                succ.into_iter().zip(w).map(|(s, w)| (s, w / total)).collect()
            })
            .collect();
        let next = |ctx: usize, tok: u32| (ctx * vocab + tok as usize) % contexts;
        let stationary = stationary_distribution(&transitions, next);
        MarkovCorpus { vocab, order, seed, transitions, stationary }
    }

    /// The context after `ctx` when `tok` follows.
    fn next_context(&self, ctx: usize, tok: u32) -> usize {
        (ctx * self.vocab + tok as usize) % self.transitions.len()
    }

    /// Entropy rate in nats per token: `Σ_i π_i · H(P(· | i))`.
    pub fn entropy_rate(&self) -> f64 {
        self.transitions
            .iter()
            .zip(&self.stationary)
            .map(|(row, pi)| pi * -row.iter().map(|(_, p)| if *p > 0.0 { p * p.ln() } else { 0.0 }).sum::<f64>())
            .sum()
    }

    fn sample_from(rng: &mut SplitMix64, dist: impl Iterator<Item = (u32, f64)>) -> u32 {
        let u = rng.next_f64();
        let mut acc = 0.0;
        let mut last = 0;
        for (tok, p) in dist {
            acc += p;
            last = tok;
            if u < acc {
                return tok;
            }
        }
        last
    }

    /// Batch `index` of `batch × seq_len` token ids, row-major. The same (seed, index) always gives the
    /// same batch, so resumed runs and different widths see identical data.
    pub fn batch(&self, index: u64, batch: usize, seq_len: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(batch * seq_len);
        for row in 0..batch as u64 {
            let mut rng = SplitMix64::new(self.seed.wrapping_mul(0x100_0000_01B3) ^ index.wrapping_mul(0x9E37_79B9) ^ (row << 40));
            let mut ctx = Self::sample_from(&mut rng, self.stationary.iter().enumerate().map(|(i, p)| (i as u32, *p))) as usize;
            let start = out.len();
            // The first context's own tokens, oldest first, then one token per transition.
            for k in (0..self.order).rev() {
                out.push((ctx / self.vocab.pow(k as u32) % self.vocab) as i64);
            }
            while out.len() - start < seq_len {
                let tok = Self::sample_from(&mut rng, self.transitions[ctx].iter().copied());
                out.push(tok as i64);
                ctx = self.next_context(ctx, tok);
            }
            out.truncate(start + seq_len);
        }
        out
    }
}

/// Stationary distribution by power iteration on the lazy chain `(I + P) / 2`, which has the same
/// stationary distribution and converges even when `P` is periodic.
fn stationary_distribution(transitions: &[Vec<(u32, f64)>], next_state: impl Fn(usize, u32) -> usize) -> Vec<f64> {
    let n = transitions.len();
    let mut pi = vec![1.0 / n as f64; n];
    for _ in 0..100_000 {
        let mut next: Vec<f64> = pi.iter().map(|p| 0.5 * p).collect();
        for (i, row) in transitions.iter().enumerate() {
            for (tok, p) in row {
                next[next_state(i, *tok)] += 0.5 * pi[i] * p;
            }
        }
        let delta: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
        pi = next;
        if delta < 1e-14 {
            break;
        }
    }
    pi
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data file `{path}`: {reason}")]
    File { path: String, reason: String },
}

/// Tokens loaded from a file, sampled as random windows.
#[derive(Clone, Debug)]
pub struct TokenFile {
    pub tokens: Vec<u16>,
    pub vocab: usize,
}

impl TokenFile {
    fn err(path: &Path, reason: impl Into<String>) -> DataError {
        DataError::File { path: path.display().to_string(), reason: reason.into() }
    }

    /// A raw text file, one token per byte (vocab 256).
    pub fn text_bytes(path: &Path, min_tokens: usize) -> Result<TokenFile, DataError> {
        let bytes = std::fs::read(path).map_err(|e| Self::err(path, e.to_string()))?;
        if bytes.len() < min_tokens {
            return Err(Self::err(path, format!("{} bytes, need at least {min_tokens} (one sequence)", bytes.len())));
        }
        Ok(TokenFile { tokens: bytes.into_iter().map(u16::from).collect(), vocab: 256 })
    }

    /// A nanoGPT-style token file: little-endian `uint16` ids, no header. `vocab` bounds the ids.
    pub fn nanogpt_bin(path: &Path, vocab: usize, min_tokens: usize) -> Result<TokenFile, DataError> {
        let bytes = std::fs::read(path).map_err(|e| Self::err(path, e.to_string()))?;
        if bytes.len() % 2 != 0 {
            return Err(Self::err(path, format!("{} bytes is odd: truncated, or not a uint16 token file", bytes.len())));
        }
        let tokens: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        if tokens.len() < min_tokens {
            return Err(Self::err(path, format!("{} tokens, need at least {min_tokens} (one sequence)", tokens.len())));
        }
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(Self::err(path, format!("token {t} at position {i} is outside the vocabulary of {vocab}")));
        }
        Ok(TokenFile { tokens, vocab })
    }

    /// Batch `index`: `batch` windows of `seq_len` tokens at seeded random offsets.
    pub fn batch(&self, index: u64, batch: usize, seq_len: usize, seed: u64) -> Vec<i64> {
        let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let span = (self.tokens.len() - seq_len + 1) as u64;
        let mut out = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let start = rng.below(span) as usize;
            out.extend(self.tokens[start..start + seq_len].iter().map(|t| *t as i64));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_corpus_and_batches() {
        let a = MarkovCorpus::new(64, 4, 7);
        let b = MarkovCorpus::new(64, 4, 7);
        assert_eq!(a.batch(3, 4, 32), b.batch(3, 4, 32));
        assert_ne!(a.batch(3, 4, 32), a.batch(4, 4, 32));
        assert_ne!(MarkovCorpus::new(64, 4, 8).batch(3, 4, 32), a.batch(3, 4, 32));
    }

    #[test]
    fn entropy_rate_matches_the_empirical_conditional_entropy() {
        // Independent estimate: count bigrams in a long sample and compute H(next | current).
        let c = MarkovCorpus::new(32, 3, 11);
        let v = c.vocab;
        let mut counts = vec![0u64; v * v];
        for i in 0..200 {
            let b = c.batch(i, 8, 256);
            for row in b.chunks(256) {
                for w in row.windows(2) {
                    counts[w[0] as usize * v + w[1] as usize] += 1;
                }
            }
        }
        let total: u64 = counts.iter().sum();
        let mut h = 0.0;
        for i in 0..v {
            let row = &counts[i * v..(i + 1) * v];
            let n: u64 = row.iter().sum();
            for &k in row.iter().filter(|k| **k > 0) {
                let p = k as f64 / n as f64;
                h -= (n as f64 / total as f64) * p * p.ln();
            }
        }
        let exact = c.entropy_rate();
        assert!(exact > 0.1 && exact < (3f64).ln(), "{exact}");
        assert!((h - exact).abs() < 0.01, "empirical {h} vs exact {exact}");
    }

    #[test]
    fn stationary_distribution_is_a_fixed_point_of_the_chain() {
        let c = MarkovCorpus::new(50, 5, 3);
        let mut next = vec![0.0; 50];
        for (i, row) in c.transitions.iter().enumerate() {
            for (j, p) in row {
                next[c.next_context(i, *j)] += c.stationary[i] * p;
            }
        }
        let err: f64 = next.iter().zip(&c.stationary).map(|(a, b)| (a - b).abs()).sum();
        assert!(err < 1e-9, "{err}");
        assert!((c.stationary.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    /// Conditional entropy of the next token given the previous `k`, counted from `batches` batches.
    fn empirical_conditional_entropy(c: &MarkovCorpus, k: usize, batches: u64) -> f64 {
        let mut counts: std::collections::HashMap<Vec<i64>, std::collections::HashMap<i64, u64>> = Default::default();
        for i in 0..batches {
            for row in c.batch(i, 8, 256).chunks(256) {
                for w in row.windows(k + 1) {
                    *counts.entry(w[..k].to_vec()).or_default().entry(w[k]).or_default() += 1;
                }
            }
        }
        let total: u64 = counts.values().flat_map(|m| m.values()).sum();
        let mut h = 0.0;
        for next in counts.values() {
            let n: u64 = next.values().sum();
            for &c in next.values() {
                let p = c as f64 / n as f64;
                h -= (n as f64 / total as f64) * p * p.ln();
            }
        }
        h
    }

    #[test]
    fn a_second_order_source_reaches_its_entropy_floor_only_with_two_tokens_of_context() {
        let c = MarkovCorpus::with_order(16, 2, 3, 5);
        let exact = c.entropy_rate();
        let given_two = empirical_conditional_entropy(&c, 2, 400);
        let given_one = empirical_conditional_entropy(&c, 1, 400);
        assert!((given_two - exact).abs() < 0.02, "empirical {given_two} vs exact {exact}");
        // With one token of context the next token is much less predictable: attention has something to do.
        assert!(given_one > exact + 0.5, "H(next | 1 token) {given_one} vs floor {exact}");
        // Rows are exactly seq_len long, even shorter than the context.
        assert!(c.batch(0, 3, 7).len() == 21 && c.batch(0, 3, 1).len() == 3);
    }

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("gainguard-data-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_nanogpt_bin_loads_little_endian_u16_ids() {
        let p = tmp("ok.bin", &[1, 0, 2, 1, 255, 0]);
        let f = TokenFile::nanogpt_bin(&p, 1024, 2).unwrap();
        assert_eq!(f.tokens, vec![1, 258, 255]);
        assert_eq!(f.batch(0, 2, 3, 1), vec![1, 258, 255, 1, 258, 255]);
    }

    #[test]
    fn bad_token_files_give_errors_naming_the_file_and_the_problem() {
        let truncated = tmp("trunc.bin", &[1, 0, 2]);
        let e = TokenFile::nanogpt_bin(&truncated, 1024, 1).unwrap_err().to_string();
        assert!(e.contains("trunc.bin") && e.contains("truncated"), "{e}");
        let empty = tmp("empty.txt", b"");
        let e = TokenFile::text_bytes(&empty, 8).unwrap_err().to_string();
        assert!(e.contains("empty.txt") && e.contains("0 bytes"), "{e}");
        let missing = std::env::temp_dir().join("gainguard-definitely-missing.bin");
        let e = TokenFile::nanogpt_bin(&missing, 10, 1).unwrap_err().to_string();
        assert!(e.contains("gainguard-definitely-missing.bin") && e.contains("No such file"), "{e}");
        let big = tmp("big.bin", &[0xff, 0xff]);
        assert!(TokenFile::nanogpt_bin(&big, 50304, 1).unwrap_err().to_string().contains("outside the vocabulary"));
    }

    #[test]
    fn a_text_file_is_byte_tokens() {
        let p = tmp("t.txt", b"hello world");
        let f = TokenFile::text_bytes(&p, 4).unwrap();
        assert_eq!(f.vocab, 256);
        assert_eq!(f.tokens[0], b'h' as u16);
    }
}
