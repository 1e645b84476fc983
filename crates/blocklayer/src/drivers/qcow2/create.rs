//! Creating qcow2 images: `blockdev-create` with `driver: qcow2` (QEMU's
//! `BlockdevCreateOptionsQcow2`) formats an existing node; [`create`] is also what
//! `blockdev-snapshot-sync` formats its new overlays with.

use super::{image_error, NodeIo};
use crate::drivers::CreateWork;
use crate::error::{BlockError, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::options::coerce::Fields;
use std::sync::Arc;

/// Formats the node `file` as a qcow2 image (QEMU's `blockdev-create` with
/// `driver: qcow2`), from the control thread.
pub fn create(file: Arc<Node>, data: Option<Arc<Node>>, opts: qcow::CreateOptions) -> Result<()> {
    for n in std::iter::once(&file).chain(data.as_ref()) {
        if n.is_read_only() {
            return Err(BlockError::ReadOnly(n.name().to_string()));
        }
    }
    let io = NodeIo::new(file);
    let data = data.map(NodeIo::new);
    crate::aio::uring::block_on(async move {
        let image = match data {
            Some(d) => qcow::create_with_data_file(io, d, &opts).await,
            None => qcow::create(io, &opts).await,
        }
        .map_err(|e| match e {
            // Option errors are the user's, as QEMU words them.
            qcow::CreateError::Invalid(m) => BlockError::Graph(m),
            e => BlockError::Graph(format!("qcow2: {e}")),
        })?;
        image.close().await.map_err(image_error)
    })
}

/// `blockdev-create` with `driver: qcow2`: the table's create function of `qcow2`.
/// `file` (and `data-file`) name existing nodes, as in QEMU.
pub(super) fn blockdev_create(mut f: Fields, graph: &Graph) -> Result<CreateWork> {
    let file = f.required_string("file").map_err(|_| {
        BlockError::Graph(
            "Parameter 'options.file' must name an existing node (inline definitions are \
             not supported by vubd)"
                .into(),
        )
    })?;
    let size = f.unsigned("size")?;
    let size = f.required("size", size)?;
    let mut o = qcow::CreateOptions::new(size);
    if let Some(v) = f.enumeration(
        "version",
        &[("v2", qcow::Compat::V2), ("v3", qcow::Compat::V3)],
    )? {
        o.compat = v;
    }
    o.backing_file = f.string("backing-file")?;
    o.backing_fmt = f.string("backing-fmt")?;
    if let Some(cs) = f.unsigned("cluster-size")? {
        o.cluster_size = cs;
    }
    if let Some(p) = f.enumeration(
        "preallocation",
        &[
            ("off", qcow::Preallocation::Off),
            ("metadata", qcow::Preallocation::Metadata),
            ("falloc", qcow::Preallocation::Falloc),
            ("full", qcow::Preallocation::Full),
        ],
    )? {
        o.preallocation = p;
    }
    o.lazy_refcounts = f.bool("lazy-refcounts")?.unwrap_or(false);
    o.extended_l2 = f.bool("extended-l2")?.unwrap_or(false);
    if let Some(bits) = f.uint("refcount-bits")? {
        o.refcount_bits = bits as u32;
    }
    if let Some(c) = f.enumeration(
        "compression-type",
        &[
            ("zlib", qcow::CompressionType::Zlib),
            ("zstd", qcow::CompressionType::Zstd),
        ],
    )? {
        o.compression_type = c;
    }
    let data_file = f.string("data-file")?;
    o.data_file_raw = f.bool("data-file-raw")?.unwrap_or(false);
    let encrypt = f
        .object("encrypt")?
        .map(|e| super::encryption::create_params(e, graph.secrets()))
        .transpose()?;
    f.finish()?;
    if o.data_file_raw && data_file.is_none() {
        return Err(BlockError::Graph(
            "'data-file-raw' requires 'data-file'".into(),
        ));
    }
    let node = graph.lookup(&file)?;
    // The external data file is an existing node, as in QEMU; the header names its
    // file.
    let data = data_file.map(|name| graph.lookup(&name)).transpose()?;
    if let Some(d) = &data {
        o.data_file = Some(d.driver().filename());
    }
    Ok(Box::new(move || {
        if let Some(params) = &encrypt {
            o.encryption = Some(super::encryption::format_header(params)?);
        }
        create(node, data, o)
    }))
}
