//! Request limits of a node, merged up the graph (as QEMU's `bdrv_refresh_limits`).

/// What a node can accept in one driver call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths of reads and writes must be multiples of this (bytes).
    pub request_alignment: u32,
    /// Buffer addresses and segment lengths must be multiples of this (bytes).
    pub mem_alignment: usize,
    /// Largest read/write in bytes (0: no limit).
    pub max_transfer: u64,
    /// Most segments in one read/write.
    pub max_iov: usize,
    /// Largest discard in bytes (0: no limit).
    pub max_discard: u64,
    /// Largest write-zeroes in bytes (0: no limit).
    pub max_write_zeroes: u64,
    /// Preferred discard granularity in bytes.
    pub discard_alignment: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            mem_alignment: 1,
            max_transfer: 0,
            max_iov: libc::UIO_MAXIOV as usize,
            max_discard: 0,
            max_write_zeroes: 0,
            discard_alignment: 1,
        }
    }
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

impl Limits {
    /// Combines a node's own limits with those of a child it forwards requests to:
    /// the stricter of each.
    pub fn merge(self, child: Limits) -> Limits {
        Limits {
            request_alignment: self.request_alignment.max(child.request_alignment),
            mem_alignment: self.mem_alignment.max(child.mem_alignment),
            max_transfer: min_nonzero(self.max_transfer, child.max_transfer),
            max_iov: self.max_iov.min(child.max_iov),
            max_discard: min_nonzero(self.max_discard, child.max_discard),
            max_write_zeroes: min_nonzero(self.max_write_zeroes, child.max_write_zeroes),
            discard_alignment: self.discard_alignment.max(child.discard_alignment),
        }
    }

    /// `max_transfer` with "no limit" spelled as `u64::MAX`.
    pub fn transfer_cap(&self) -> u64 {
        if self.max_transfer == 0 {
            u64::MAX
        } else {
            self.max_transfer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_takes_the_stricter() {
        let a = Limits {
            request_alignment: 512,
            max_transfer: 0,
            ..Limits::default()
        };
        let b = Limits {
            request_alignment: 4096,
            mem_alignment: 512,
            max_transfer: 1 << 20,
            max_iov: 16,
            ..Limits::default()
        };
        let m = a.merge(b);
        assert_eq!(m.request_alignment, 4096);
        assert_eq!(m.mem_alignment, 512);
        assert_eq!(m.max_transfer, 1 << 20);
        assert_eq!(m.max_iov, 16);
        assert_eq!(Limits::default().transfer_cap(), u64::MAX);
    }
}
