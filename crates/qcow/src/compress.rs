//! Compression of whole clusters: raw deflate (zlib type) and zstd.

use crate::header::CompressionType;
use thiserror::Error;

/// Errors of compressed cluster handling.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompressError {
    /// The stream is malformed or ends before a whole cluster was produced.
    #[error("corrupt {0:?} compressed cluster: {1}")]
    Corrupt(CompressionType, String),
}

/// Decompresses `input` into `out`, which must be filled completely
/// (trailing bytes of the input are ignored).
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CompressError> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let r = d.decompress(input, out, flate2::FlushDecompress::Finish);
            let produced = d.total_out() as usize;
            match r {
                Ok(_) if produced == out.len() => Ok(()),
                Ok(s) => Err(CompressError::Corrupt(
                    kind,
                    format!("{s:?} after {produced} bytes"),
                )),
                Err(e) => Err(CompressError::Corrupt(kind, e.to_string())),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| CompressError::Corrupt(kind, e.to_string()))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                match d.run(&mut inb, &mut outb) {
                    Ok(_) => {}
                    Err(e) => return Err(CompressError::Corrupt(kind, e.to_string())),
                }
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if (inb.pos(), outb.pos()) == before || inb.pos() == input.len() {
                    return Err(CompressError::Corrupt(
                        kind,
                        format!("stream ended after {} bytes", outb.pos()),
                    ));
                }
            }
        }
    }
}

/// Compresses one cluster. Returns `None` when the result would not be
/// smaller than `max_len` (the caller then stores the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8], max_len: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(max_len);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < max_len => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, 0).ok()?;
            (out.len() < max_len).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data, data.len()).unwrap();
            c.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            // Truncated input is an error, not a panic.
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &c[..c.len() / 4], &mut out).is_err());
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
        }
        let mut x = 0x1234_5678_9abc_def1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &noise, 4096).is_none());
    }
}
