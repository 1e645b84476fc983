//! The limits of a throttle group (QEMU's `ThrottleConfig`, util/throttle.c), the
//! QAPI `ThrottleLimits` object and the `x-*` properties of `throttle-group`
//! objects that set them, and QEMU 7.2's validity rules with its error texts.

use serde_json::{Map, Value};

/// The largest rate or burst rate (QEMU's `THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The six buckets, in QEMU's order (`BucketType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketType {
    BpsTotal = 0,
    BpsRead,
    BpsWrite,
    OpsTotal,
    OpsRead,
    OpsWrite,
}

pub const BUCKETS: usize = 6;

/// A request's direction (QEMU keeps one queue and one timer per direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// The buckets a request of a direction is checked against and charged to: bytes
/// first, then operations (total, then the direction's own).
pub(crate) const fn buckets_of(dir: Direction) -> [(BucketType, bool); 4] {
    match dir {
        Direction::Read => [
            (BucketType::BpsTotal, false),
            (BucketType::BpsRead, false),
            (BucketType::OpsTotal, true),
            (BucketType::OpsRead, true),
        ],
        Direction::Write => [
            (BucketType::BpsTotal, false),
            (BucketType::BpsWrite, false),
            (BucketType::OpsTotal, true),
            (BucketType::OpsWrite, true),
        ],
    }
}

/// One bucket's limits (QEMU's `LeakyBucket` without its levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// The sustained rate per second (0: unlimited).
    pub avg: u64,
    /// The burst rate per second (0: no burst beyond a tenth of a second of `avg`).
    pub max: u64,
    /// How many seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A group's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleConfig {
    pub buckets: [BucketConfig; BUCKETS],
    /// `iops-size`: requests larger than this count as several operations.
    pub op_size: u64,
}

/// Which part of a bucket a property sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Avg,
    Max,
    Length,
    OpSize,
}

/// The `ThrottleLimits` members, in QAPI order, with what each sets.
const FIELDS: &[(&str, Option<BucketType>, Part)] = {
    use BucketType::*;
    use Part::*;
    &[
        ("iops-total", Some(OpsTotal), Avg),
        ("iops-total-max", Some(OpsTotal), Max),
        ("iops-total-max-length", Some(OpsTotal), Length),
        ("iops-read", Some(OpsRead), Avg),
        ("iops-read-max", Some(OpsRead), Max),
        ("iops-read-max-length", Some(OpsRead), Length),
        ("iops-write", Some(OpsWrite), Avg),
        ("iops-write-max", Some(OpsWrite), Max),
        ("iops-write-max-length", Some(OpsWrite), Length),
        ("bps-total", Some(BpsTotal), Avg),
        ("bps-total-max", Some(BpsTotal), Max),
        ("bps-total-max-length", Some(BpsTotal), Length),
        ("bps-read", Some(BpsRead), Avg),
        ("bps-read-max", Some(BpsRead), Max),
        ("bps-read-max-length", Some(BpsRead), Length),
        ("bps-write", Some(BpsWrite), Avg),
        ("bps-write-max", Some(BpsWrite), Max),
        ("bps-write-max-length", Some(BpsWrite), Length),
        ("iops-size", None, OpSize),
    ]
};

/// The names of the `ThrottleLimits` members (the `x-` properties are these with the
/// prefix).
pub fn limit_names() -> impl Iterator<Item = &'static str> {
    FIELDS.iter().map(|(n, _, _)| *n)
}

impl ThrottleConfig {
    fn slot(&mut self, bucket: Option<BucketType>, part: Part) -> &mut u64 {
        match (bucket, part) {
            (Some(b), Part::Avg) => &mut self.buckets[b as usize].avg,
            (Some(b), Part::Max) => &mut self.buckets[b as usize].max,
            (Some(b), Part::Length) => &mut self.buckets[b as usize].burst_length,
            _ => &mut self.op_size,
        }
    }

    fn get(&self, bucket: Option<BucketType>, part: Part) -> u64 {
        let mut c = *self;
        *c.slot(bucket, part)
    }

    pub fn bucket(&self, b: BucketType) -> &BucketConfig {
        &self.buckets[b as usize]
    }

    /// Whether any limit is set (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's `throttle_is_valid`, with its texts.
    pub fn validate(&self) -> Result<(), String> {
        use BucketType::*;
        let b = |t: BucketType| self.bucket(t);
        let conflict = |f: fn(&BucketConfig) -> u64, total, read, write| {
            f(b(total)) != 0 && (f(b(read)) != 0 || f(b(write)) != 0)
        };
        let avg = |c: &BucketConfig| c.avg;
        let max = |c: &BucketConfig| c.max;
        if conflict(avg, BpsTotal, BpsRead, BpsWrite)
            || conflict(avg, OpsTotal, OpsRead, OpsWrite)
            || conflict(max, BpsTotal, BpsRead, BpsWrite)
            || conflict(max, OpsTotal, OpsRead, OpsWrite)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at \
                        the same time"
                    .into(),
            );
        }
        if self.op_size != 0 && b(OpsTotal).avg == 0 && b(OpsRead).avg == 0 && b(OpsWrite).avg == 0
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for c in &self.buckets {
            if c.avg > THROTTLE_VALUE_MAX || c.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if c.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if c.burst_length > 1 && c.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if c.max != 0 && c.burst_length > THROTTLE_VALUE_MAX / c.max {
                return Err("burst length too high for this burst rate".into());
            }
            if c.max != 0 && c.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if c.max != 0 && c.max < c.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }

    /// Sets the members of a `ThrottleLimits` object that it has (QEMU's
    /// `throttle_limits_to_config`; members it lacks keep their values), then
    /// validates the result. `limits` holds integers already type-checked.
    pub fn apply_limits(&mut self, limits: &[(String, i64)]) -> Result<(), String> {
        for (name, part_b, part) in FIELDS {
            let Some((_, v)) = limits.iter().find(|(n, _)| n == name) else {
                continue;
            };
            if *part == Part::Length && *v > i64::from(u32::MAX) {
                return Err(format!(
                    "{name} value must be in the range [0, {}]",
                    u32::MAX
                ));
            }
            // QAPI's int64 goes into QEMU's unsigned fields as C converts it.
            *self.slot(*part_b, *part) = *v as u64;
        }
        self.validate()
    }

    /// Sets the property `x-<name>` as `object-add` does before the group is
    /// complete (QEMU's `throttle_group_set`); `Ok(false)`: no such property.
    pub fn set_legacy(&mut self, prop: &str, v: i64) -> Result<bool, String> {
        let Some((name, b, part)) = prop
            .strip_prefix("x-")
            .and_then(|n| FIELDS.iter().find(|(f, _, _)| *f == n))
        else {
            return Ok(false);
        };
        if v < 0 {
            return Err("Property values cannot be negative".into());
        }
        if *part == Part::Length && v > i64::from(u32::MAX) {
            // QEMU's text lacks the space.
            return Err(format!(
                "x-{name} value must be in therange [0, {}]",
                u32::MAX
            ));
        }
        *self.slot(*b, *part) = v as u64;
        Ok(true)
    }

    /// The value of the property `x-<name>`, if it is one.
    pub fn get_legacy(&self, prop: &str) -> Option<i64> {
        let (_, b, part) = prop
            .strip_prefix("x-")
            .and_then(|n| FIELDS.iter().find(|(f, _, _)| *f == n))?;
        Some(self.get(*b, *part) as i64)
    }

    /// The `ThrottleLimits` object of every member (QEMU's `throttle_config_to_limits`).
    pub fn to_limits(&self) -> Value {
        let m: Map<String, Value> = FIELDS
            .iter()
            .map(|(n, b, p)| ((*n).to_string(), Value::from(self.get(*b, *p) as i64)))
            .collect();
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, i64)]) -> Result<ThrottleConfig, String> {
        let mut c = ThrottleConfig::default();
        let l: Vec<_> = pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        c.apply_limits(&l).map(|()| c)
    }

    #[test]
    fn qemus_validity_rules_and_texts() {
        assert!(with(&[]).is_ok());
        assert!(!with(&[]).unwrap().enabled());
        assert!(with(&[("iops-total", 10)]).unwrap().enabled());
        let e = |p: &[(&str, i64)]| with(p).unwrap_err();
        assert_eq!(
            e(&[("iops-total", 10), ("iops-read", 5)]),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(&[("bps-total", 1), ("bps-read-max", 5), ("bps-read", 1)]),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(&[("iops-size", 5)]),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            e(&[("iops-total", -1)]),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            e(&[("iops-total-max-length", 5_000_000_000)]),
            "iops-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            e(&[("iops-total-max-length", 0)]),
            "the burst length cannot be 0"
        );
        assert_eq!(
            e(&[("iops-total", 1), ("iops-total-max-length", 2)]),
            "burst length set without burst rate"
        );
        assert_eq!(
            e(&[
                ("iops-total", 10),
                ("iops-total-max", 200_000_000),
                ("iops-total-max-length", 200_000_000)
            ]),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            e(&[("iops-total-max", 10)]),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            e(&[("iops-total", 10), ("iops-total-max", 5)]),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
    }

    #[test]
    fn legacy_properties_and_limits_object() {
        let mut c = ThrottleConfig::default();
        assert_eq!(c.set_legacy("x-iops-total", 100), Ok(true));
        assert_eq!(c.set_legacy("x-bogus", 1), Ok(false));
        assert_eq!(c.set_legacy("iops-total", 1), Ok(false));
        assert_eq!(
            c.set_legacy("x-iops-read", -1).unwrap_err(),
            "Property values cannot be negative"
        );
        assert_eq!(
            c.set_legacy("x-bps-read-max-length", 1 << 33).unwrap_err(),
            "x-bps-read-max-length value must be in therange [0, 4294967295]"
        );
        assert_eq!(c.get_legacy("x-iops-total"), Some(100));
        assert_eq!(c.get_legacy("x-iops-total-max-length"), Some(1));
        let l = c.to_limits();
        assert_eq!(l.as_object().unwrap().len(), 19);
        assert_eq!(l["iops-total"], 100);
        assert_eq!(l["bps-write-max-length"], 1);
        // A partial update keeps the rest.
        c.apply_limits(&[("iops-total-max".into(), 150)]).unwrap();
        assert_eq!(c.bucket(BucketType::OpsTotal).avg, 100);
        assert_eq!(c.bucket(BucketType::OpsTotal).max, 150);
    }
}
