//! A hand-written decoder for the two events that make up nearly all traffic, `step` and `spectrum`, in the
//! form every encoder here writes them: serde's, with the fields in declaration order (absent ones left out),
//! `type` first in the event object, and strings without escapes.
//!
//! It decides nothing on its own: whatever it is not sure of (another event type, a field out of that order,
//! which includes a repeated or an unknown one, an escape or a control character in a string, a missing
//! field, a number that is not a plain JSON number of the field's type, an infinite float, a `null` where
//! serde wants a value, trailing bytes) makes it return `None`, and the serde decoder then decides, so which
//! lines are accepted or rejected, and why, stays serde's by construction. For what it does accept it must
//! produce the values serde would: floats are correctly rounded (the standard library's parser, or one exact
//! IEEE operation when mantissa and power of ten are both exact), as `serde_json`'s `float_roundtrip` feature
//! makes serde's, and integers within `u64` convert to `f64` as serde's visitor does (`as f64`, also correctly
//! rounded). The tests below check both claims against serde on valid, hostile and randomly mutated lines.

use std::sync::Arc;

use crate::events::{Envelope, Event, ParamClass, SpectrumQuantiles, SpectrumSample, StepEvent};

/// The run and host names of the latest line, which the next lines of the same sender share.
#[derive(Default)]
pub(super) struct Names {
    run: Option<Arc<str>>,
    host: Option<Arc<str>>,
}

/// The envelope on `line`, or `None` when the serde decoder must decide.
pub(super) fn decode(line: &[u8], names: &mut Names) -> Option<Envelope> {
    let mut c = Cursor { b: line, i: 0, ascii: line.is_ascii() };
    let envelope = c.envelope(names)?;
    c.ws();
    (c.i == line.len()).then_some(envelope)
}

/// A field name as [`Cursor::field`] compares it: its bytes and the closing quote, in little-endian 8-byte
/// words with a mask of the bytes that count, so that most names that are not the one at the cursor are
/// told apart by one load, one xor and one and.
#[derive(Clone, Copy)]
struct Name {
    /// The name and its closing quote.
    quoted_len: usize,
    words: [u64; 4],
    masks: [u64; 4],
}

impl Name {
    const fn new(name: &[u8]) -> Name {
        let quoted_len = name.len() + 1;
        assert!(quoted_len <= 32, "field names here are shorter than 32 bytes");
        let (mut words, mut masks) = ([0u64; 4], [0u64; 4]);
        let mut i = 0;
        while i < quoted_len {
            let byte = if i < name.len() { name[i] } else { b'"' };
            words[i / 8] |= (byte as u64) << (8 * (i % 8));
            masks[i / 8] |= 0xff << (8 * (i % 8));
            i += 1;
        }
        Name { quoted_len, words, masks }
    }

    /// Whether `rest` starts with the name and its closing quote.
    fn starts(&self, rest: &[u8]) -> bool {
        let n = self.quoted_len.div_ceil(8);
        if rest.len() >= 8 * n {
            (0..n).all(|w| {
                let x = u64::from_le_bytes(rest[8 * w..8 * w + 8].try_into().expect("8 bytes"));
                (x ^ self.words[w]) & self.masks[w] == 0
            })
        } else {
            // Near the end of the line: byte by byte.
            rest.len() >= self.quoted_len
                && (0..self.quoted_len).all(|i| u64::from(rest[i]) == (self.words[i / 8] >> (8 * (i % 8))) & 0xff)
        }
    }
}

/// Field names in the order serde writes them.
const ENVELOPE: [Name; 6] = [
    Name::new(b"v"),
    Name::new(b"run"),
    Name::new(b"rank"),
    Name::new(b"host"),
    Name::new(b"step"),
    Name::new(b"event"),
];
const STEP: [Name; 11] = [
    Name::new(b"loss"),
    Name::new(b"loss_nonfinite"),
    Name::new(b"tokens"),
    Name::new(b"duration_seconds"),
    Name::new(b"timestamp_seconds"),
    Name::new(b"lr_multiplier"),
    Name::new(b"wd_multiplier"),
    Name::new(b"spectrum_samples_dropped_total"),
    Name::new(b"events_dropped_total"),
    Name::new(b"nonfinite_parameters"),
    Name::new(b"skipped_steps_total"),
];
const SPECTRUM: [Name; 17] = [
    Name::new(b"param"),
    Name::new(b"layer"),
    Name::new(b"class"),
    Name::new(b"sigma_max"),
    Name::new(b"top_k"),
    Name::new(b"iterations"),
    Name::new(b"sigma_max_normalized"),
    Name::new(b"reference_sigma_max"),
    Name::new(b"gain_ratio"),
    Name::new(b"stable_rank"),
    Name::new(b"frobenius_norm"),
    Name::new(b"effective_rank"),
    Name::new(b"quantiles"),
    Name::new(b"update_ratio"),
    Name::new(b"nonfinite"),
    Name::new(b"duration_seconds"),
    Name::new(b"progress"),
];
const QUANTILES: [Name; 4] = [Name::new(b"p10"), Name::new(b"p50"), Name::new(b"p90"), Name::new(b"p99")];

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
    /// The whole line is ASCII (nearly always), so its strings need no UTF-8 check of their own.
    ascii: bool,
}

/// The index of the first byte of `s` that ends a plain string: `"`, `\` or a control character. Eight bytes at a
/// time: a byte flags in `(x - 0x01..) & !x & 0x80..` when it is zero (in `x`), in `(x - 0x20..) & !x & 0x80..`
/// when it is below 0x20, and the lowest flagged byte is always a true one (a borrow only runs upwards).
fn plain_len(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = s.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().ok()?);
        let hits = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH);
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    chunks.remainder().iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).map(|i| at + i)
}

/// Powers of ten exact in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
    1e20, 1e21, 1e22,
];

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// JSON's whitespace, as serde_json skips it.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.i += 1)
    }

    /// `true` at a comma (another field follows), `false` at the closing brace.
    fn more(&mut self) -> Option<bool> {
        self.ws();
        let more = match self.peek()? {
            b',' => true,
            b'}' => false,
            _ => return None,
        };
        self.i += 1;
        Some(more)
    }

    /// The field name at the cursor and its colon, if it is one of `names[from..]`: its index. Names are taken
    /// in order, so one that comes again, or before one already read, is not found.
    fn field(&mut self, names: &[Name], from: usize) -> Option<usize> {
        self.eat(b'"')?;
        let rest = &self.b[self.i..];
        let j = (from..names.len()).find(|&j| names[j].starts(rest))?;
        self.i += names[j].quoted_len;
        self.eat(b':')?;
        Some(j)
    }

    /// Reads an object's fields in `names` order: `value` is called with each field's index and reads its
    /// value. The object must have at least one field.
    fn object(&mut self, names: &[Name], mut value: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        let j = self.field(names, 0)?;
        value(self, j)?;
        self.fields(names, j + 1, value)
    }

    /// The fields after the first one, up to the object's closing brace.
    fn fields(&mut self, names: &[Name], mut from: usize, mut value: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        while self.more()? {
            let j = self.field(names, from)?;
            value(self, j)?;
            from = j + 1;
        }
        Some(())
    }

    /// The raw bytes of a string without escapes or control characters (serde refuses raw control
    /// characters; an escape would need decoding).
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.b[self.i..];
        let end = plain_len(rest)?;
        if rest[end] != b'"' {
            return None;
        }
        self.i += end + 1;
        Some(&rest[..end])
    }

    fn text(&self, raw: &'a [u8]) -> Option<&'a str> {
        if self.ascii {
            // SAFETY: the line, and so this part of it, is ASCII, which is UTF-8.
            return Some(unsafe { std::str::from_utf8_unchecked(raw) });
        }
        std::str::from_utf8(raw).ok()
    }

    fn string(&mut self) -> Option<String> {
        let raw = self.raw_string()?;
        self.text(raw).map(str::to_owned)
    }

    /// A string that is often the same as `last`: then `last` is shared, else it becomes the new one.
    fn shared(&mut self, last: &mut Option<Arc<str>>) -> Option<Arc<str>> {
        let raw = self.raw_string()?;
        match last {
            Some(name) if name.as_bytes() == raw => Some(Arc::clone(name)),
            _ => {
                let name: Arc<str> = self.text(raw)?.into();
                *last = Some(Arc::clone(&name));
                Some(name)
            }
        }
    }

    fn null(&mut self) -> bool {
        self.ws();
        let is_null = self.b[self.i..].starts_with(b"null");
        if is_null {
            self.i += 4;
        }
        is_null
    }

    fn bool(&mut self) -> Option<bool> {
        self.ws();
        let rest = &self.b[self.i..];
        let (v, n) = if rest.starts_with(b"true") {
            (true, 4)
        } else if rest.starts_with(b"false") {
            (false, 5)
        } else {
            return None;
        };
        self.i += n;
        Some(v)
    }

    /// Digits at the cursor: how many, and their value if it fits in a u64.
    fn digits(&mut self) -> (usize, Option<u64>) {
        let start = self.i;
        let mut v = Some(0u64);
        while let Some(d @ b'0'..=b'9') = self.peek() {
            v = v.and_then(|v| v.checked_mul(10)).and_then(|v| v.checked_add(u64::from(d - b'0')));
            self.i += 1;
        }
        (self.i - start, v)
    }

    /// A non-negative integer token: `0` or digits without a leading zero, not followed by a fraction or an
    /// exponent (serde reads those as floats, which an integer field refuses), within `u64`.
    fn u64(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let (n, v) = self.digits();
        if n == 0 || (n > 1 && self.b[start] == b'0') || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        v
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    /// A JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`) read as a finite, correctly rounded f64.
    fn f64(&mut self) -> Option<f64> {
        self.ws();
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let int_start = self.i;
        let (int_digits, int_value) = self.digits();
        if int_digits == 0 || (int_digits > 1 && self.b[int_start] == b'0') {
            return None;
        }
        let mut mantissa = int_value;
        let mut exponent: i64 = 0;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let frac_start = self.i;
            while let Some(d @ b'0'..=b'9') = self.peek() {
                mantissa = mantissa.and_then(|m| m.checked_mul(10)).and_then(|m| m.checked_add(u64::from(d - b'0')));
                self.i += 1;
            }
            if self.i == frac_start {
                return None;
            }
            exponent -= (self.i - frac_start) as i64;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let negative_exponent = self.peek() == Some(b'-');
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            let (n, e) = self.digits();
            if n == 0 {
                return None;
            }
            match e.and_then(|e| i64::try_from(e).ok()) {
                Some(e) => exponent += if negative_exponent { -e } else { e },
                None => mantissa = None,
            }
        }
        // Clinger's fast path: a mantissa and a power of ten both exact in an f64 give a correctly rounded
        // product or quotient in one IEEE operation. Anything else goes to the standard library's parser.
        if let Some(m) = mantissa.filter(|&m| m <= 1 << 53) {
            if (-22..=22).contains(&exponent) {
                let m = m as f64;
                let v = if exponent >= 0 { m * POW10[exponent as usize] } else { m / POW10[(-exponent) as usize] };
                return Some(if negative { -v } else { v });
            }
        }
        // The token is ASCII digits and signs, so it is UTF-8.
        let token = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        // serde_json refuses a number that overflows to infinity.
        token.parse::<f64>().ok().filter(|v| v.is_finite())
    }

    /// `null` as `None` (what serde makes of it for an `Option` field), else the value `read` reads.
    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.null() {
            Some(None)
        } else {
            read(self).map(Some)
        }
    }

    fn envelope(&mut self, names: &mut Names) -> Option<Envelope> {
        let (mut v, mut run, mut rank, mut host, mut step, mut event) = (None, None, None, None, None, None);
        self.object(&ENVELOPE, |c, j| {
            match j {
                0 => v = Some(c.u32()?),
                1 => run = Some(c.shared(&mut names.run)?),
                2 => rank = Some(c.u32()?),
                3 => host = Some(c.shared(&mut names.host)?),
                4 => step = Some(c.u64()?),
                _ => event = Some(c.event()?),
            }
            Some(())
        })?;
        Some(Envelope { v: v?, run: run?, rank: rank?, host: host?, step: step?, event: event? })
    }

    /// An event object whose `type` comes first, as `"type":"step"` or `"type":"spectrum"`.
    fn event(&mut self) -> Option<Event> {
        self.eat(b'{')?;
        let rest = &self.b[self.i..];
        const STEP_TYPE: &[u8] = br#""type":"step""#;
        const SPECTRUM_TYPE: &[u8] = br#""type":"spectrum""#;
        if rest.starts_with(STEP_TYPE) {
            self.i += STEP_TYPE.len();
            self.step().map(Event::Step)
        } else if rest.starts_with(SPECTRUM_TYPE) {
            self.i += SPECTRUM_TYPE.len();
            self.spectrum().map(Event::Spectrum)
        } else {
            None
        }
    }

    /// A step event's fields after its `type`, with the wire defaults of `StepEvent`.
    fn step(&mut self) -> Option<StepEvent> {
        let mut s = StepEvent::default();
        let mut timestamp = None;
        self.fields(&STEP, 0, |c, j| {
            match j {
                0 => s.loss = c.opt(Self::f64)?,
                1 => s.loss_nonfinite = c.bool()?,
                2 => s.tokens = c.u64()?,
                3 => s.duration_seconds = c.opt(Self::f64)?,
                4 => timestamp = Some(c.f64()?),
                5 => s.lr_multiplier = c.f64()?,
                6 => s.wd_multiplier = c.f64()?,
                7 => s.spectrum_samples_dropped_total = c.u64()?,
                8 => s.events_dropped_total = c.u64()?,
                9 => s.nonfinite_parameters = c.opt(Self::u64)?,
                _ => s.skipped_steps_total = c.u64()?,
            }
            Some(())
        })?;
        s.timestamp_seconds = timestamp?;
        Some(s)
    }

    /// A spectrum sample's fields after its `type`.
    fn spectrum(&mut self) -> Option<SpectrumSample> {
        let (mut param, mut class) = (None, None);
        let mut s = SpectrumSample::empty(String::new(), None, ParamClass::MatrixLike);
        self.fields(&SPECTRUM, 0, |c, j| {
            match j {
                0 => param = Some(c.string()?),
                1 => s.layer = c.opt(Self::u32)?,
                2 => {
                    class = Some(match c.raw_string()? {
                        b"matrix_like" => ParamClass::MatrixLike,
                        b"vector_like" => ParamClass::VectorLike,
                        _ => return None,
                    })
                }
                3 => s.sigma_max = c.opt(Self::f64)?,
                4 => s.top_k = c.f64_array()?,
                5 => s.iterations = c.u32()?,
                6 => s.sigma_max_normalized = c.opt(Self::f64)?,
                7 => s.reference_sigma_max = c.opt(Self::f64)?,
                8 => s.gain_ratio = c.opt(Self::f64)?,
                9 => s.stable_rank = c.opt(Self::f64)?,
                10 => s.frobenius_norm = c.opt(Self::f64)?,
                11 => s.effective_rank = c.opt(Self::f64)?,
                12 => s.quantiles = c.opt(Self::quantiles)?,
                13 => s.update_ratio = c.opt(Self::f64)?,
                14 => s.nonfinite = c.bool()?,
                15 => s.duration_seconds = c.f64()?,
                _ => s.progress = c.opt(Self::f64)?,
            }
            Some(())
        })?;
        s.param = param?;
        s.class = class?;
        Some(s)
    }

    fn f64_array(&mut self) -> Option<Vec<f64>> {
        self.eat(b'[')?;
        let mut values = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Some(values);
        }
        loop {
            values.push(self.f64()?);
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(values);
                }
                _ => return None,
            }
        }
    }

    /// All four quantiles, in order.
    fn quantiles(&mut self) -> Option<SpectrumQuantiles> {
        let mut q = [None; 4];
        self.object(&QUANTILES, |c, j| {
            q[j] = Some(c.f64()?);
            Some(())
        })?;
        Some(SpectrumQuantiles { p10: q[0]?, p50: q[1]?, p90: q[2]?, p99: q[3]? })
    }
}

#[cfg(test)]
mod tests;
