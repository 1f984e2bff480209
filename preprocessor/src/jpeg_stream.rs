//! What radflow's two JPEG decoders share (`jpeg_lossless`, `jpeg_extended`): the walk
//! over a codestream's marker segments, Huffman tables, and a reader of entropy-coded
//! bits that removes stuffed bytes, stops at markers and tells when a decoder used bits
//! the stream does not have.

/// Why a codestream was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    /// A valid stream that this decoder does not handle; another decoder may.
    #[error("not handled by radflow's JPEG decoder: {0}")]
    Unsupported(String),
    /// The stream is damaged or does not match the image it belongs to.
    #[error("corrupt JPEG data: {0}")]
    Corrupt(String),
}

use JpegError::Corrupt;

/// Bits of code looked up at once in a Huffman table.
const LOOKUP_BITS: u32 = 10;

/// Bits of code and extra bits looked up at once.
const FAST_BITS: u32 = 12;

/// The difference coded by category `t` and its `t` extra bits `v` (T.81 H.1.2.2).
#[inline(always)]
pub(crate) fn difference(t: u32, v: u32) -> i32 {
    match t {
        0 => 0,
        16 => 32768,
        t => {
            let v = v as i32;
            if v < 1 << (t - 1) {
                v - (1 << t) + 1
            } else {
                v
            }
        }
    }
}

/// A Huffman table: for difference categories (0–16) of lossless JPEG, or for any
/// byte symbols (the DC and AC tables of DCT-based JPEG).
#[derive(Clone)]
pub(crate) struct Huffman {
    /// `lookup[next LOOKUP_BITS bits]` = `(code length, category)`; length 0 when the
    /// code is longer than `LOOKUP_BITS`.
    lookup: Vec<(u8, u8)>,
    /// `fast[next FAST_BITS bits]` = `(bits used, difference)` when a code and its
    /// extra bits fit in `FAST_BITS`; 0 bits otherwise (slow path). Empty for a table
    /// of byte symbols.
    fast: Vec<(u8, i32)>,
    /// Canonical decoding of longer codes: per length, the largest code (exclusive
    /// bound) and the offset of its symbols.
    max_code: [i32; 17],
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    /// A table of difference categories, with the combined fast lookup.
    pub(crate) fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Self, JpegError> {
        let mut table = Self::of_bytes(counts, symbols)?;
        if let Some(symbol) = table.symbols.iter().find(|s| **s > 16) {
            return Err(Corrupt(format!("difference category {symbol} > 16")));
        }
        // Code and extra bits in one lookup, for the short codes of common categories.
        let mut fast = vec![(0u8, 0i32); 1 << FAST_BITS];
        for (peek, e) in fast.iter_mut().enumerate() {
            let (len, category) = table.lookup[peek >> (FAST_BITS - LOOKUP_BITS)];
            let (len, t) = (u32::from(len), u32::from(category));
            if len == 0 {
                continue;
            }
            let extra = if t == 16 { 0 } else { t };
            if len + extra > FAST_BITS {
                continue;
            }
            let v = ((peek as u32) >> (FAST_BITS - len - extra)) & ((1 << extra) - 1);
            *e = ((len + extra) as u8, difference(t, v));
        }
        table.fast = fast;
        Ok(table)
    }

    /// A table of any byte symbols, from a DHT segment's code counts and symbols.
    pub(crate) fn of_bytes(counts: &[u8; 16], symbols: &[u8]) -> Result<Self, JpegError> {
        let mut lookup = vec![(0u8, 0u8); 1 << LOOKUP_BITS];
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            offset[len] = k as i32 - code;
            for _ in 0..n {
                let symbol = *symbols
                    .get(k)
                    .ok_or_else(|| Corrupt("a Huffman table is short of symbols".into()))?;
                // Checked before the code is used: an overfull table would index past
                // the lookup.
                if code >= 1 << len {
                    return Err(Corrupt("a Huffman table has too many codes".into()));
                }
                if len as u32 <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - len as u32;
                    let first = (code as usize) << shift;
                    for e in &mut lookup[first..first + (1 << shift)] {
                        *e = (len as u8, symbol);
                    }
                }
                code += 1;
                k += 1;
            }
            max_code[len] = code;
            code <<= 1;
        }
        Ok(Huffman {
            lookup,
            fast: Vec::new(),
            max_code,
            offset,
            symbols: symbols[..k].to_vec(),
        })
    }
}

/// Reads entropy-coded bits, removing stuffed zero bytes and stopping at markers.
pub(crate) struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    /// Valid bits, left-aligned.
    acc: u64,
    n: u32,
    /// A marker was met: zeros are fed from here on.
    at_marker: bool,
    /// Bits of those zeros put in the buffer since the last restart.
    fed: u32,
}

impl<'a> Bits<'a> {
    pub(crate) fn new(data: &'a [u8], pos: usize) -> Self {
        Bits {
            data,
            pos,
            acc: 0,
            n: 0,
            at_marker: false,
            fed: 0,
        }
    }

    /// Fails if decoding used bits the stream does not have: the entropy-coded data
    /// ended (a marker or the end of the stream) before the image or the restart
    /// interval did, so its last samples are zeros made up by the reader.
    pub(crate) fn check_complete(&self) -> Result<(), JpegError> {
        if self.fed > self.n {
            return Err(Corrupt(
                "the entropy-coded data end before the image does".into(),
            ));
        }
        Ok(())
    }

    /// Tops the buffer up to at least 57 bits (zeros past a marker or the end); call
    /// with fewer than 57.
    #[inline(always)]
    pub(crate) fn refill(&mut self) {
        // Fast path: eight bytes at once when none of them is 0xFF.
        if !self.at_marker
            && let Some(chunk) = self.data.get(self.pos..self.pos + 8)
        {
            let w = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            let x = !w;
            let has_ff = x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080;
            if has_ff == 0 {
                let k = (64 - self.n) / 8;
                let bytes = if k == 8 { w } else { w >> (64 - 8 * k) };
                let shift = 64 - self.n - 8 * k;
                self.acc |= if shift == 64 { 0 } else { bytes << shift };
                self.pos += k as usize;
                self.n += 8 * k;
                return;
            }
        }
        while self.n <= 56 {
            let byte = if self.at_marker || self.pos >= self.data.len() {
                self.fed = self.fed.saturating_add(8);
                0
            } else {
                let b = self.data[self.pos];
                if b != 0xFF {
                    self.pos += 1;
                    b
                } else if self.data.get(self.pos + 1) == Some(&0) {
                    self.pos += 2;
                    0xFF
                } else {
                    self.at_marker = true;
                    0
                }
            };
            self.acc |= u64::from(byte) << (56 - self.n);
            self.n += 8;
        }
    }

    /// Bits in the buffer.
    #[inline(always)]
    pub(crate) fn available(&self) -> u32 {
        self.n
    }

    #[inline(always)]
    pub(crate) fn take(&mut self, k: u32) -> u32 {
        // k ≤ 16 and refill keeps at least 57 bits.
        let v = (self.acc >> (64 - k)) as u32;
        self.acc <<= k;
        self.n -= k;
        v
    }

    #[inline(always)]
    pub(crate) fn decode(&mut self, h: &Huffman) -> Result<u8, JpegError> {
        let peek = (self.acc >> (64 - LOOKUP_BITS)) as usize;
        let (len, symbol) = h.lookup[peek];
        if len > 0 {
            self.acc <<= len;
            self.n -= u32::from(len);
            return Ok(symbol);
        }
        for len in LOOKUP_BITS + 1..=16 {
            let code = (self.acc >> (64 - len)) as i32;
            if code < h.max_code[len as usize] {
                self.acc <<= len;
                self.n -= len;
                let i = (code + h.offset[len as usize]) as usize;
                return h
                    .symbols
                    .get(i)
                    .copied()
                    .ok_or_else(|| Corrupt("a Huffman code has no symbol".into()));
            }
        }
        Err(Corrupt("an invalid Huffman code".into()))
    }

    /// The next difference.
    #[inline(always)]
    pub(crate) fn difference(&mut self, h: &Huffman) -> Result<i32, JpegError> {
        if self.n < 32 {
            self.refill();
        }
        let (used, diff) = h.fast[(self.acc >> (64 - FAST_BITS)) as usize];
        if used > 0 {
            self.acc <<= used;
            self.n -= u32::from(used);
            return Ok(diff);
        }
        let t = u32::from(self.decode(h)?);
        let v = if t == 0 || t == 16 { 0 } else { self.take(t) };
        Ok(difference(t, v))
    }

    /// Skips to the next byte boundary and over a restart marker; returns its number.
    pub(crate) fn restart(&mut self) -> Result<u8, JpegError> {
        self.check_complete()?;
        // Bytes already in the buffer are behind `pos`; the marker is where the
        // entropy data stopped.
        self.acc = 0;
        self.n = 0;
        self.fed = 0;
        let mut p = self.pos;
        while p + 1 < self.data.len() && !(self.data[p] == 0xFF && self.data[p + 1] != 0) {
            p += 1;
        }
        match self.data.get(p..p + 2) {
            Some([0xFF, m]) if (0xD0..=0xD7).contains(m) => {
                self.pos = p + 2;
                self.at_marker = false;
                Ok(m - 0xD0)
            }
            _ => Err(Corrupt("a restart marker is missing".into())),
        }
    }
}

pub(crate) fn u16_at(b: &[u8], p: usize) -> Result<usize, JpegError> {
    b.get(p..p + 2)
        .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
        .ok_or_else(|| Corrupt("the stream ends inside a marker segment".into()))
}

/// Walks the marker segments of a JPEG stream from its start-of-image marker, calling
/// `segment(marker, contents, end)` for each one with a length (`end`: the offset
/// after it) until it returns a value.
pub(crate) fn walk_segments<T>(
    b: &[u8],
    mut segment: impl FnMut(u8, &[u8], usize) -> Result<Option<T>, JpegError>,
) -> Result<T, JpegError> {
    if b.get(0..2) != Some(&[0xFF, 0xD8]) {
        return Err(Corrupt("no start-of-image marker".into()));
    }
    let mut p = 2;
    loop {
        // Markers may be preceded by fill bytes (0xFF).
        while b.get(p) == Some(&0xFF) && b.get(p + 1) == Some(&0xFF) {
            p += 1;
        }
        let marker = match b.get(p..p + 2) {
            Some([0xFF, m]) => *m,
            _ => return Err(Corrupt(format!("expected a marker at byte {p}"))),
        };
        p += 2;
        if marker == 0xD8 || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            continue;
        }
        let len = u16_at(b, p)?;
        let seg = b
            .get(p + 2..p + len)
            .filter(|_| len >= 2)
            .ok_or_else(|| Corrupt("a marker segment runs past the end".into()))?;
        if let Some(done) = segment(marker, seg, p + len)? {
            return Ok(done);
        }
        p += len;
    }
}

/// The tables of a DHT segment: `table(class, id, counts, symbols)` for each.
pub(crate) fn huffman_tables(
    seg: &[u8],
    mut table: impl FnMut(u8, usize, &[u8; 16], &[u8]) -> Result<(), JpegError>,
) -> Result<(), JpegError> {
    let mut q = 0;
    while q < seg.len() {
        let (class, id) = (seg[q] >> 4, usize::from(seg[q] & 0x0F));
        let counts: [u8; 16] = seg
            .get(q + 1..q + 17)
            .ok_or_else(|| Corrupt("short Huffman table".into()))?
            .try_into()
            .expect("16 bytes");
        let total: usize = counts.iter().map(|c| usize::from(*c)).sum();
        let symbols = seg
            .get(q + 17..q + 17 + total)
            .ok_or_else(|| Corrupt("short Huffman table".into()))?;
        if class > 1 || id > 3 {
            return Err(Corrupt(format!("Huffman table {class}/{id}")));
        }
        table(class, id, &counts, symbols)?;
        q += 17 + total;
    }
    Ok(())
}

/// Fails unless a stream's frame header (`rows`, `cols`) describes the image it is in.
pub(crate) fn same_size(stream: (usize, usize), image: (usize, usize)) -> Result<(), JpegError> {
    if stream != image {
        return Err(Corrupt(format!(
            "the stream holds {}x{} samples, the image is {}x{}",
            stream.1, stream.0, image.1, image.0
        )));
    }
    Ok(())
}
