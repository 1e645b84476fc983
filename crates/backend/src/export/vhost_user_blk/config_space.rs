//! The virtio-blk configuration space (`struct virtio_blk_config`, virtio 1.2 5.2.4)
//! that frontends read with VHOST_USER_GET_CONFIG.

/// Fields vubd fills in; the layout is produced by [`BlkConfig::to_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block size / logical block size)
    pub physical_block_exp: u8,
    /// Minimum and optimal I/O sizes in logical blocks.
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

/// Size of the structure up to and including the write-zeroes fields (and padding).
pub const CONFIG_LEN: usize = 60;

impl BlkConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry (not offered)
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        // 33: unused0
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// The bytes a GET_CONFIG of `offset..offset+size` returns (zeroes past the end).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity: 0x1122_3344_5566_7788,
            blk_size: 4096,
            num_queues: 4,
            max_write_zeroes_seg: 7,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(&b[52..56], &7u32.to_le_bytes());
        assert_eq!(b[56], 1);
        // A read past the end is zero-padded; a partial read is a window.
        assert_eq!(c.read(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.read(34, 2), vec![4, 0]);
        assert_eq!(c.read(100, 4), vec![0; 4]);
    }
}
