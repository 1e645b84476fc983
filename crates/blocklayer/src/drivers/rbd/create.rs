//! `blockdev-create` with `driver: rbd` (QEMU's `BlockdevCreateOptionsRbd`):
//! `location`, `size` and the object size `cluster-size`.

use super::conn::{connect, cstr};
use super::options::RbdLocation;
use crate::drivers::CreateWork;
use crate::error::{strerror, BlockError, Result};
use crate::graph::Graph;
use crate::options::coerce::Fields;
use crate::options::OptionsError;

pub(super) fn blockdev_create(mut f: Fields, graph: &Graph) -> Result<CreateWork> {
    let mut lf = f
        .object("location")?
        .ok_or_else(|| OptionsError::Missing(f.name("location")))?;
    let loc = RbdLocation::take_from(&mut lf)?;
    lf.finish()?;
    let size = f.unsigned("size")?;
    let size = f.required("size", size)?;
    let cluster_size = f.size("cluster-size")?;
    if f.contains("encrypt") {
        return Err(BlockError::Graph(
            "RBD image encryption is not supported by vubd".into(),
        ));
    }
    f.finish()?;
    let secrets = graph.secrets().clone();
    Ok(Box::new(move || {
        let mut order: i32 = 0;
        if let Some(objsize) = cluster_size.filter(|s| *s != 0) {
            if !objsize.is_power_of_two() {
                return Err(BlockError::Graph("obj size needs to be power of 2".into()));
            }
            if objsize < 4096 {
                return Err(BlockError::Graph("obj size too small".into()));
            }
            order = objsize.trailing_zeros() as i32;
        }
        let conn = connect(&loc, false, &secrets)?;
        let name = cstr("image", &loc.image)?;
        // SAFETY: live ioctx, NUL-terminated name, and `order` a local in/out value.
        let r = unsafe { (conn.lib.rbd_create)(conn.ioctx, name.as_ptr(), size, &mut order) };
        if r < 0 {
            return Err(BlockError::Graph(format!(
                "error rbd create: {}",
                strerror(-r)
            )));
        }
        Ok(())
    }))
}
