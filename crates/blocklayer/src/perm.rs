//! Permissions on graph edges (QEMU's `BLK_PERM_*`): what a user of a node does with
//! it, and what it lets other users do at the same time.
//!
//! Every edge (a parent node's child, an export's or a job's root) carries the
//! permissions it takes and the set it shares. A node is consistent when, for every
//! pair of its parents, each one's taken permissions are shared by the other.

use std::fmt;

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// Reads see data that no one else changes underneath (QEMU: consistent-read).
    pub const CONSISTENT_READ: Perm = Perm(1 << 0);
    /// Writes that change what readers see.
    pub const WRITE: Perm = Perm(1 << 1);
    /// Writes that leave the data as readers see it (copy-on-read, stream).
    pub const WRITE_UNCHANGED: Perm = Perm(1 << 2);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(1 << 3);
    /// Changing the node's children (deprecated in QEMU, kept for its texts).
    pub const GRAPH_MOD: Perm = Perm(1 << 4);
    pub const NONE: Perm = Perm(0);
    pub const ALL: Perm = Perm(0x1f);

    /// The permissions a filter passes from its parents to its child.
    pub const PASSTHROUGH: Perm =
        Perm(Self::CONSISTENT_READ.0 | Self::WRITE.0 | Self::WRITE_UNCHANGED.0 | Self::RESIZE.0);

    /// The names QMP uses (`BlockPermission`), in QEMU's order; graph-mod is not in
    /// QEMU 7.2's enum and is never listed.
    const NAMES: [(Perm, &'static str, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent-read", "consistent read"),
        (Perm::WRITE, "write", "write"),
        (Perm::WRITE_UNCHANGED, "write-unchanged", "write unchanged"),
        (Perm::RESIZE, "resize", "resize"),
    ];

    pub const fn bits(self) -> u8 {
        self.0
    }

    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & Self::ALL.0)
    }

    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QMP's list of `BlockPermission` names, in the order QEMU prints them.
    pub fn qmp_names(self, reverse: bool) -> Vec<&'static str> {
        let mut v: Vec<_> = Self::NAMES
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, n, _)| *n)
            .collect();
        if reverse {
            v.reverse();
        }
        v
    }

    /// The names QEMU's error texts use ("write, resize").
    pub fn text(self) -> String {
        Self::NAMES
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, _, t)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl std::ops::BitOrAssign for Perm {
    fn bitor_assign(&mut self, o: Perm) {
        self.0 |= o.0;
    }
}

impl std::ops::BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl std::ops::BitAndAssign for Perm {
    fn bitand_assign(&mut self, o: Perm) {
        self.0 &= o.0;
    }
}

impl std::ops::Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Self::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.qmp_names(false).join("|"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sets() {
        let p = Perm::WRITE | Perm::CONSISTENT_READ;
        assert_eq!(p.qmp_names(false), ["consistent-read", "write"]);
        assert_eq!(Perm::ALL.qmp_names(true)[0], "resize");
        assert_eq!((Perm::WRITE | Perm::RESIZE).text(), "write, resize");
        assert!(!(!Perm::WRITE).contains(Perm::WRITE));
        assert!(Perm::ALL.contains(p));
        assert_eq!(Perm::from_bits(0xff), Perm::ALL);
    }
}
