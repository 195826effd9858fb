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
mod tests {
    //! Differential tests: the hand-written path against serde on the same bytes.

    use super::Names;
    use crate::events::*;
    use crate::wire::{decode_line, decode_line_serde, encode_line, LineDecoder};

    /// xorshift64*: a fixed, dependency-free sequence, so that a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[self.below(xs.len())]
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
        /// Any finite f64: random bits (every magnitude, subnormals, -0.0) or a plain value.
        fn float(&mut self) -> f64 {
            loop {
                let v = match self.below(4) {
                    0 => f64::from_bits(self.next()),
                    1 => self.below(1000) as f64,
                    2 => self.below(1_000_000) as f64 / 1000.0,
                    _ => -(self.below(100) as f64) / 7.0,
                };
                if v.is_finite() {
                    return v;
                }
            }
        }
        fn opt_float(&mut self) -> Option<f64> {
            self.chance(60).then(|| self.float())
        }
        fn name(&mut self) -> String {
            const PARTS: [&str; 10] =
                ["blocks.0.mlp.up.weight", "run-1", "NaN", "Infinity", "é漢", "a\"b", "back\\slash", "tab\there", "\u{1}", " "];
            (0..1 + self.below(3)).map(|_| *self.pick(&PARTS)).collect()
        }
        fn int(&mut self) -> u64 {
            match self.below(3) {
                0 => self.next(),
                1 => self.next() % 100,
                _ => u64::from(u32::MAX) + self.next() % 3 - 1,
            }
        }
    }

    fn step(r: &mut Rng) -> Event {
        Event::Step(StepEvent {
            loss: r.opt_float(),
            loss_nonfinite: r.chance(20),
            tokens: r.int(),
            duration_seconds: r.opt_float(),
            timestamp_seconds: r.float(),
            lr_multiplier: r.float(),
            wd_multiplier: r.float(),
            spectrum_samples_dropped_total: r.int(),
            events_dropped_total: r.int(),
            nonfinite_parameters: r.chance(50).then(|| r.int()),
            skipped_steps_total: r.int(),
        })
    }

    fn spectrum(r: &mut Rng) -> Event {
        Event::Spectrum(SpectrumSample {
            sigma_max: r.opt_float(),
            top_k: (0..r.below(4)).map(|_| r.float()).collect(),
            iterations: r.next() as u32,
            sigma_max_normalized: r.opt_float(),
            reference_sigma_max: r.opt_float(),
            gain_ratio: r.opt_float(),
            stable_rank: r.opt_float(),
            frobenius_norm: r.opt_float(),
            effective_rank: r.opt_float(),
            quantiles: r.chance(50).then(|| SpectrumQuantiles { p10: r.float(), p50: r.float(), p90: r.float(), p99: r.float() }),
            update_ratio: r.opt_float(),
            nonfinite: r.chance(20),
            duration_seconds: r.float(),
            progress: r.opt_float(),
            ..SpectrumSample::empty(r.name(), r.chance(70).then(|| r.next() as u32), *r.pick(&[ParamClass::MatrixLike, ParamClass::VectorLike]))
        })
    }

    fn envelope(r: &mut Rng) -> Envelope {
        let event = match r.below(10) {
            0 => Event::Goodbye(Goodbye { reason: r.name() }),
            1..=5 => step(r),
            _ => spectrum(r),
        };
        Envelope::new(r.name(), r.next() as u32, r.name(), r.int(), event)
    }

    fn line(e: &Envelope) -> Vec<u8> {
        let mut l = encode_line(e).unwrap();
        l.pop();
        l
    }

    /// Floats compare by their bits (Debug prints -0.0 and every distinct finite value distinctly).
    fn same(a: &Envelope, b: &Envelope) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// The claim itself, for one line: what the hand-written path accepts, serde accepts with the same values;
    /// and the full decoder answers exactly what serde alone answers.
    fn agree(line: &[u8]) -> bool {
        let text = String::from_utf8_lossy(line);
        let fast = super::decode(line, &mut Names::default());
        if let Some(f) = &fast {
            match serde_json::from_slice::<Envelope>(line) {
                Ok(s) => assert!(same(f, &s), "{text}\n fast:  {f:?}\n serde: {s:?}"),
                Err(e) => panic!("{text}: the fast path accepted what serde refuses ({e}): {f:?}"),
            }
        }
        match (decode_line(line), decode_line_serde(line)) {
            (Ok(a), Ok(b)) => assert!(same(&a, &b), "{text}\n {a:?}\n {b:?}"),
            (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
            (a, b) => panic!("{text}: decode_line {a:?} but serde alone {b:?}"),
        }
        fast.is_some()
    }

    fn splice(template: &str, value: &str) -> Vec<u8> {
        template.replace("@", value).into_bytes()
    }

    #[test]
    fn the_fast_path_takes_every_encoded_step_and_spectrum_line_without_escapes_and_decodes_it_as_serde_does() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut plain, mut taken) = (0, 0);
        // One sender's decoder over all the lines: a name shared from an earlier line must be the line's own.
        let mut sender = LineDecoder::default();
        for _ in 0..20_000 {
            let e = envelope(&mut r);
            let l = line(&e);
            let fast = agree(&l);
            match (sender.decode(&l), decode_line_serde(&l)) {
                (Ok(a), Ok(b)) => assert!(same(&a, &b) && same(&a, &e), "{}", String::from_utf8_lossy(&l)),
                (Err(a), Err(b)) => assert_eq!(a, b),
                (a, b) => panic!("{}: {a:?} but serde alone {b:?}", String::from_utf8_lossy(&l)),
            }
            let hot = matches!(e.event, Event::Step(_) | Event::Spectrum(_));
            if hot && !l.contains(&b'\\') {
                plain += 1;
                assert!(fast, "the encoders' form must take the fast path: {}", String::from_utf8_lossy(&l));
            }
            taken += usize::from(fast);
            assert!(!fast || hot, "only step and spectrum take the fast path");
        }
        assert!(plain > 1500 && taken == plain, "{plain} plain hot lines, {taken} taken");
    }

    #[test]
    fn a_field_name_matches_only_itself_followed_by_its_closing_quote() {
        let long = super::Name::new(b"spectrum_samples_dropped_total");
        let short = super::Name::new(b"loss");
        for (name, rest, expected) in [
            (short, &b"loss\":1.5,\"tokens\":3}"[..], true),
            (short, b"loss\"", true),
            (short, b"loss_nonfinite\":true}", false),
            (short, b"los\":1}", false),
            (short, b"loss", false),
            (short, b"Loss\":1.5,\"tokens\":3}", false),
            (long, b"spectrum_samples_dropped_total\":0,\"x\":1}", true),
            (long, b"spectrum_samples_dropped_total\"", true),
            (long, b"spectrum_samples_dropped_totaL\":0,\"x\":1}", false),
            (long, b"spectrum_samples_dropped_tota\":0,\"x\":1}", false),
            (long, b"spectrum_samples_dropped_total", false),
        ] {
            assert_eq!(name.starts(rest), expected, "{}", String::from_utf8_lossy(rest));
        }
    }

    #[test]
    fn hostile_lines_get_the_same_answer_and_values_from_both_paths() {
        let step = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":@}}"#;
        let loss = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0,"loss":@}}"#;
        let int = r#"{"v":1,"run":"r","rank":0,"host":"h","step":@,"event":{"type":"step","timestamp_seconds":1.0}}"#;
        let rank = r#"{"v":1,"run":"r","rank":@,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0}}"#;
        let spec = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p","class":"matrix_like"@}}"#;
        let numbers = [
            "0", "-0", "-0.0", "0.0", "1", "1.0", "01", "-01", "1.", ".5", "+1", "1e", "1e+", "1E5", "1e-5", "-", "--1",
            "0e999999999999", "1e400", "-1e400", "1e-400", "-1e-400", "1.7976931348623157e308",
            "1.7976931348623158e308", "1.7976931348623159e308", "2.4703282292062327e-324", "2.4703282292062328e-324",
            "4.9406564584124654e-324", "9007199254740993", "18446744073709551615", "18446744073709551616",
            "-9223372036854775808", "-9223372036854775809", "-18446744073709551616",
            "123456789012345678901234567890", "0.1000000000000000055511151231257827021181583404541015625",
            "4294967295", "4294967296", "NaN", "-NaN", "Infinity", "-Infinity", "null", "true", "\"1\"", "[1]", "{}",
            "1 ", " 1", "1x", "0x10", "1_000",
        ];
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for n in numbers {
            for t in [step, loss, int, rank] {
                lines.push(splice(t, n));
            }
            for field in ["sigma_max", "iterations", "layer", "duration_seconds", "top_k", "quantiles"] {
                lines.push(splice(spec, &format!(",\"{field}\":{n}")));
                lines.push(splice(spec, &format!(",\"{field}\":[{n}]")));
            }
        }
        for extra in [
            "", ",\"top_k\":[]", ",\"top_k\":[1,2.5]", ",\"top_k\":[1,]", ",\"top_k\":[,1]", ",\"top_k\":[null]",
            ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4}", ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3}",
            ",\"quantiles\":{\"p10\":1,\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4}",
            ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4,\"p1\":0}", ",\"quantiles\":null",
            ",\"layer\":null", ",\"layer\":3", ",\"nonfinite\":true", ",\"nonfinite\":truex", ",\"nonfinite\":nul",
            ",\"sigma_max\":1,\"sigma_max\":2", ",\"class\":\"vector_like\"", ",\"unknown\":1", ",\"unknown\":{\"a\":[1,{}]}",
            ",\"sigma_max\":-1", ",\"progress\":1.5", ",\"sigma_max\":\"NaN\"",
        ] {
            lines.push(splice(spec, extra));
        }
        let raw: &[&[u8]] = &[
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#" { "v" : 1 , "run" : "r" , "rank" : 0 , "host" : "h" , "step" : 1 , "event" : { "type" : "step" , "timestamp_seconds" : 1 } } "#,
            b"{\"v\":1,\"run\":\"r\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}\t\r",
            br#"{"event":{"type":"step","timestamp_seconds":1},"step":1,"host":"h","rank":0,"run":"r","v":1}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"timestamp_seconds":1,"type":"step"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}x"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}},"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1},}"#,
            br#"{"v":1,"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","run":"s","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":1,"loss":2}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1},"event":{"type":"step","timestamp_seconds":2}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"extra":0,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"tokens_x":5}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":2,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":-1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":NaN}}"#,
            br#"{"v":1,"run":"NaN","rank":0,"host":"Infinity","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"a \"NaN\" b","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r\u0073","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"r\u0075n":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"st\u0065p","timestamp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timest\u0061mp_seconds":1}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"hello","pid":1,"rule":"paper"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"goodbye","reason":"finished"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"params","params":[]}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"teleport"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"class":"x"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":null}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":[]}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p","class":"matrix_like","class":"vector_like"}}"#,
            br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p"}}"#,
            br#"{"v":1,"run":null,"rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
            b"{\"v\":1,\"run\":\"r\xff\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
            b"{\"v\":1,\"run\":\"r\x01\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
            b"{\"v\":1,\"run\":\"r\tx\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
            b"{\"v\":1,\"run\":\"\xc3\xa9\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
            b"{\"v\":1,\"run\":\"r\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}\x0b}",
            b"",
            b"{",
            b"{}",
            b"null",
        ];
        lines.extend(raw.iter().map(|l| l.to_vec()));
        let mut taken = 0;
        for l in &lines {
            taken += usize::from(agree(l));
        }
        assert!(taken > 40, "the corpus exercises the fast path ({taken} of {} lines)", lines.len());
    }

    #[test]
    fn random_json_numbers_read_as_serde_reads_them() {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        let template = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":@}}"#;
        for _ in 0..20_000 {
            let digits = |r: &mut Rng, n: usize| (0..n).map(|_| char::from(b'0' + r.below(10) as u8)).collect::<String>();
            let mut n = String::new();
            if r.chance(30) {
                n.push('-');
            }
            let int_len = 1 + r.below(25);
            n.push_str(&digits(&mut r, int_len));
            if r.chance(60) {
                n.push('.');
                let frac_len = 1 + r.below(30);
                n.push_str(&digits(&mut r, frac_len));
            }
            if r.chance(50) {
                n.push(*r.pick(&['e', 'E']));
                n.push_str(*r.pick(&["", "+", "-"]));
                n.push_str(&(r.below(700)).to_string());
            }
            agree(&splice(template, &n));
        }
    }

    #[test]
    fn mutated_lines_get_the_same_answer_from_both_paths() {
        let mut r = Rng(0xdead_beef_cafe_f00d);
        const BYTES: &[u8] = b"\"\\{}[],:-+.eE0159 nNaItfu\t\xff";
        for _ in 0..20_000 {
            let mut l = line(&envelope(&mut r));
            for _ in 0..1 + r.below(3) {
                if l.is_empty() {
                    break;
                }
                let at = r.below(l.len());
                match r.below(4) {
                    0 => {
                        l.remove(at);
                    }
                    1 => l.insert(at, *r.pick(BYTES)),
                    2 => l[at] = *r.pick(BYTES),
                    _ => {
                        let b = l[at];
                        l.insert(at, b);
                    }
                }
            }
            agree(&l);
        }
    }
}
