//! A small deterministic mutator for the stable replay harness: generated cases are
//! the corpus entries changed a few bytes at a time, reproducible from a seed, so a
//! failure in CI can be replayed exactly (see `docs/fuzzing.md`).

/// xorshift64*: small, fast and good enough to choose mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Values that often sit on a boundary of some check.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
];

/// Mutates `data` in place with 1 to 4 edits; `other` is a second corpus entry to
/// splice from. The result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], max_len: usize) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        let pos = rng.below(len.max(1));
        match rng.below(10) {
            0 if len > 0 => data[pos] ^= 1 << rng.below(8),
            1 if len > 0 => data[pos] = rng.next_u64() as u8,
            2 | 3 if len > 0 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let v = v.wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                let width = [1, 2, 4, 8][rng.below(4)].min(len - pos);
                data[pos..pos + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            4 if len > 0 => {
                // Add or subtract a little from a byte (lengths, counts, indices).
                let d = rng.below(33) as u8;
                data[pos] = if rng.below(2) == 0 {
                    data[pos].wrapping_add(d)
                } else {
                    data[pos].wrapping_sub(d)
                };
            }
            5 => {
                let n = rng.below(len - pos.min(len) + 1).min(64);
                data.drain(pos.min(len)..pos.min(len) + n);
            }
            6 => {
                let n = 1 + rng.below(16);
                let fill = rng.next_u64() as u8;
                let at = pos.min(len);
                data.splice(at..at, std::iter::repeat_n(fill, n));
            }
            7 if len > 1 => {
                // Copy a chunk of the input over another place of it.
                let from = rng.below(len);
                let n = (1 + rng.below(32)).min(len - from).min(len - pos);
                let chunk = data[from..from + n].to_vec();
                data[pos..pos + n].copy_from_slice(&chunk);
            }
            8 if !other.is_empty() => {
                // Splice: the head of this input, the tail of another.
                let from = rng.below(other.len());
                data.truncate(pos);
                data.extend_from_slice(&other[from..]);
            }
            _ => data.truncate(rng.below(len + 1)),
        }
    }
    data.truncate(max_len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutation_is_deterministic_and_bounded() {
        let run = |seed| {
            let mut r = Rng::new(seed);
            let mut d = b"driver=file,node-name=x".to_vec();
            for _ in 0..200 {
                mutate(&mut r, &mut d, b"other input", 64);
                assert!(d.len() <= 64);
            }
            d
        };
        assert_eq!(run(7), run(7));
    }
}
