//! Small helpers: unique names and a seedable PRNG (no external crates needed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this machine for the lifetime of this process:
/// `<prefix>-<pid>-<counter>`. Tests in one binary run as threads of one process, test
/// binaries run as separate processes, so pid + counter never collide.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// xorshift64* PRNG. Seeded from `VUBD_TEST_SEED` if set, otherwise from the clock; the
/// seed is printed so a failing run can be reproduced.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn with_seed(seed: u64) -> Rng {
        // splitmix64 the seed so that small seeds give well-mixed states; never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng { state: z | 1 }
    }

    /// A new generator; `what` names the test in the printed seed line.
    pub fn new(what: &str) -> Rng {
        let seed = match std::env::var("VUBD_TEST_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("VUBD_TEST_SEED={s:?} is not a u64")),
            Err(_) => {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
            }
        };
        eprintln!("{what}: VUBD_TEST_SEED={seed}");
        Rng::with_seed(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi` (hi exclusive, hi > lo).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    /// Split `total` into `n` positive parts (`n <= total`) at random points.
    pub fn split(&mut self, total: usize, n: usize) -> Vec<usize> {
        assert!(n >= 1 && n <= total);
        let mut cuts: Vec<usize> = Vec::with_capacity(n + 1);
        cuts.push(0);
        cuts.push(total);
        while cuts.len() < n + 1 {
            let c = self.range_usize(1, total);
            if !cuts.contains(&c) {
                cuts.push(c);
            }
        }
        cuts.sort_unstable();
        cuts.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// First index where `a` and `b` differ, for readable data-mismatch messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Assert two buffers are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_same_data(what: &str, got: &[u8], expected: &[u8]) {
    if let Some(i) = first_difference(got, expected) {
        // i <= min(len) by construction
        let g = &got[i..(i + 16).min(got.len())];
        let e = &expected[i..(i + 16).min(expected.len())];
        panic!(
            "{what}: data mismatch at byte {i} (sector {}, byte {} in it): got {g:02x?}, \
             expected {e:02x?} (lengths {} / {})",
            i / 512,
            i % 512,
            got.len(),
            expected.len()
        );
    }
}
