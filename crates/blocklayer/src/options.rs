//! Typed blockdev options, QEMU's `BlockdevOptions`: what every driver takes
//! ([`CommonOptions`]), children ([`BlockdevRef`], [`BackingRef`]), the value coercion
//! all parsing shares ([`coerce`]), and [`BlockdevOptions`] itself. Each driver's own
//! options live in its folder under `drivers/` and are found through the driver table
//! ([`crate::drivers::DRIVERS`]).
//!
//! The command line (`--blockdev`), the TOML file and QMP `blockdev-add` all produce a
//! `serde_json::Value` in QEMU's shape; [`BlockdevOptions::from_json`] turns it into
//! these types. Values may be native JSON types or strings (the key=value syntax
//! yields strings only), as QEMU's keyval input visitor accepts.

use crate::driver::Driver;
use crate::drivers::{self, OpenCtx};
use coerce::Fields;
use serde_json::{json, Map, Value};
use std::any::Any;
use std::fmt::Debug;

/// Error parsing blockdev options; the message names the offending parameter the way
/// QEMU does ("Parameter 'x' is unexpected", "Parameter 'size' expects a size").
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    #[error("Parameter '{name}' expects {expected}")]
    Invalid { name: String, expected: String },
    #[error("Invalid parameter value for '{name}': {reason}")]
    BadValue { name: String, reason: String },
    /// An enum value QEMU does not know.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    BadEnum { name: String, value: String },
    /// A node added on its own (not as an inline child) needs a name.
    #[error("'node-name' must be specified for the root node")]
    NoRootNodeName,
    /// A value of the wrong JSON type where types are strict (QMP).
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    Type {
        name: String,
        expected: &'static str,
    },
}

pub type Result<T> = std::result::Result<T, OptionsError>;

/// `discard=ignore|unmap` (QEMU also accepts `off`/`on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    #[default]
    Ignore,
    Unmap,
}

/// `detect-zeroes=off|on|unmap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

/// Options every driver takes (QEMU's BlockdevOptions base).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommonOptions {
    /// `node-name`; required by vubd for top-level blockdevs (as qemu-storage-daemon).
    pub node_name: Option<String>,
    /// `discard`
    pub discard: DiscardMode,
    /// `cache.direct`
    pub cache_direct: bool,
    /// `cache.no-flush`
    pub cache_no_flush: bool,
    /// `read-only`
    pub read_only: bool,
    /// `auto-read-only`
    pub auto_read_only: bool,
    /// `force-share`
    pub force_share: bool,
    /// `detect-zeroes`
    pub detect_zeroes: DetectZeroes,
}

/// A child given either inline (a full options object) or by node-name reference.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    Reference(String),
    Inline(Box<BlockdevOptions>),
}

/// A `backing` option: absent (open what the image header names), `null` (no
/// backing file), or a node.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingRef {
    FromHeader,
    None,
    Node(BlockdevRef),
}

/// What the driver table needs of any options value, implemented for every
/// `Clone + PartialEq` options type: copying, comparing and downcasting behind
/// `dyn DriverOptions`.
pub trait AnyOptions: Any + Debug + Send + Sync {
    fn clone_box(&self) -> Box<dyn DriverOptions>;
    fn eq_dyn(&self, other: &dyn DriverOptions) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: DriverOptions + Clone + PartialEq> AnyOptions for T {
    fn clone_box(&self) -> Box<dyn DriverOptions> {
        Box::new(self.clone())
    }

    fn eq_dyn(&self, other: &dyn DriverOptions) -> bool {
        other.as_any().downcast_ref::<T>() == Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// One driver's own options (QEMU's `BlockdevOptions<Driver>` members), parsed by the
/// driver's `parse` function in the table; they open the node they describe.
pub trait DriverOptions: AnyOptions {
    /// The QEMU driver name the options were given with.
    fn driver_name(&self) -> &'static str;

    /// The child a format or filter reads and writes through (`file` of raw and
    /// qcow2, `image` of blkdebug).
    fn child(&self) -> Option<&BlockdevRef> {
        None
    }

    /// Every child given in the options (`file`, `backing`, `image`...), first the
    /// one a filter or format reads through.
    fn children(&self) -> Vec<&BlockdevRef> {
        self.child().into_iter().collect()
    }

    /// Sets the children to those the open node has now, for a reopen that keeps
    /// them: `now(name)` is the node of the node's child `name`, by reference.
    fn keep_children(&mut self, _now: &dyn Fn(&str) -> Option<BlockdevRef>) {}

    /// Adds the driver's members of the canonical form (see
    /// [`BlockdevOptions::to_json`]).
    fn write_json(&self, m: &mut Map<String, Value>);

    /// Opens the driver on the children `ctx` opens or looks up.
    fn open(&self, ctx: &mut OpenCtx<'_>) -> crate::Result<Box<dyn Driver>>;
}

impl dyn DriverOptions {
    /// The options as the driver's own type, if they are of type `T`.
    pub fn downcast_ref<T: DriverOptions>(&self) -> Option<&T> {
        self.as_any().downcast_ref()
    }

    pub fn downcast_mut<T: DriverOptions>(&mut self) -> Option<&mut T> {
        self.as_any_mut().downcast_mut()
    }
}

impl Clone for Box<dyn DriverOptions> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl PartialEq for dyn DriverOptions {
    fn eq(&self, other: &Self) -> bool {
        self.eq_dyn(other)
    }
}

#[derive(Debug, Clone)]
pub struct BlockdevOptions {
    pub common: CommonOptions,
    pub driver: Box<dyn DriverOptions>,
}

// Written out: the derive cannot compare boxed trait objects (rust-lang/rust#31740).
impl PartialEq for BlockdevOptions {
    fn eq(&self, other: &Self) -> bool {
        self.common == other.common && *self.driver == *other.driver
    }
}

/// Coercion of option values as QEMU's keyval input visitor and QMP accept them: every
/// scalar may be a native JSON value or a string (the only type key=value syntax yields).
pub mod coerce {
    use super::{OptionsError, Result};
    use serde_json::{Map, Value};

    /// A QEMU boolean string: `on`/`yes`/`true`/`y` or `off`/`no`/`false`/`n`, any case.
    pub fn parse_bool(s: &str) -> Option<bool> {
        const TRUE: [&str; 4] = ["on", "yes", "true", "y"];
        const FALSE: [&str; 4] = ["off", "no", "false", "n"];
        if TRUE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
            Some(true)
        } else if FALSE.iter().any(|f| s.eq_ignore_ascii_case(f)) {
            Some(false)
        } else {
            None
        }
    }

    /// An unsigned integer as `strtoull(s, NULL, 0)` reads it (QEMU's keyval visitor):
    /// decimal, `0x` hexadecimal or `0` octal; no sign, no surrounding text.
    pub fn parse_uint(s: &str) -> Option<u64> {
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return parse_digits(hex, 16);
        }
        if s.len() > 1 && s.starts_with('0') {
            return parse_digits(&s[1..], 8);
        }
        parse_digits(s, 10)
    }

    fn parse_digits(s: &str, radix: u32) -> Option<u64> {
        if s.is_empty() || !s.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        u64::from_str_radix(s, radix).ok()
    }

    /// The multiplier of a size suffix (powers of 1024; `B` means bytes), any case.
    fn suffix_multiplier(suffix: char) -> Option<u64> {
        let exponent = match suffix.to_ascii_uppercase() {
            'B' => 0,
            'K' => 1,
            'M' => 2,
            'G' => 3,
            'T' => 4,
            'P' => 5,
            'E' => 6,
            _ => return None,
        };
        Some(1u64 << (10 * exponent))
    }

    /// A size as QEMU's `qemu_strtosz()` reads it: a decimal number with an optional
    /// fraction and an optional suffix `B`, `K`, `M`, `G`, `T`, `P` or `E` (any case,
    /// powers of 1024; a fraction needs a suffix other than `B`), or `0x` hexadecimal
    /// without fraction or suffix. Fractional results are rounded to the nearest byte.
    pub fn parse_size(s: &str) -> Option<u64> {
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return parse_digits(hex, 16);
        }
        let (number, multiplier) = match s.chars().last() {
            Some(c) if !c.is_ascii_digit() && c != '.' => {
                (&s[..s.len() - c.len_utf8()], suffix_multiplier(c)?)
            }
            _ => (s, 1),
        };
        let (int_part, frac_part) = match number.split_once('.') {
            Some((int_part, frac_part)) => (int_part, frac_part),
            None => (number, ""),
        };
        let all_digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
        if int_part.len() + frac_part.len() == 0 || !all_digits(int_part) || !all_digits(frac_part)
        {
            return None;
        }
        let whole = if int_part.is_empty() {
            0
        } else {
            int_part.parse::<u64>().ok()?
        };
        let fraction = fraction_bytes(frac_part, multiplier)?;
        whole.checked_mul(multiplier)?.checked_add(fraction)
    }

    /// `0.<digits> * multiplier`, rounded half up; `None` if a nonzero fraction would
    /// apply to plain bytes.
    fn fraction_bytes(digits: &str, multiplier: u64) -> Option<u64> {
        // 18 digits are far beyond double precision (what QEMU uses) and keep the
        // products below in u128 range.
        let digits = &digits[..digits.len().min(18)];
        if digits.is_empty() {
            return Some(0);
        }
        let numerator: u128 = digits.parse().ok()?;
        if numerator != 0 && multiplier == 1 {
            return None;
        }
        let denominator = 10u128.pow(digits.len() as u32);
        let bytes = (numerator * u128::from(multiplier) + denominator / 2) / denominator;
        u64::try_from(bytes).ok()
    }

    /// QEMU's `id_wellformed()`: a letter, then letters, digits, `-`, `.` and `_`.
    pub fn is_valid_id(s: &str) -> bool {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    }

    /// Checks a node name as QEMU does: a well-formed id of at most 31 characters.
    pub fn check_node_name(name: &str, value: &str) -> Result<()> {
        let reason = if !is_valid_id(value) {
            format!(
                "'{value}' is not a valid node name (it must start with a letter and \
                 contain only letters, digits, '-', '.' and '_')"
            )
        } else if value.len() > 31 {
            format!("node name '{value}' is longer than 31 characters")
        } else {
            return Ok(());
        };
        Err(OptionsError::BadValue {
            name: name.to_string(),
            reason,
        })
    }

    fn type_error(name: &str, expected: &'static str) -> OptionsError {
        OptionsError::Type {
            name: name.to_string(),
            expected,
        }
    }

    fn invalid(name: &str, expected: &str) -> OptionsError {
        OptionsError::Invalid {
            name: name.to_string(),
            expected: expected.to_string(),
        }
    }

    /// A boolean: JSON `true`/`false` or a string [`parse_bool`] accepts.
    pub fn to_bool(name: &str, v: &Value) -> Result<bool> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::String(s) => parse_bool(s).ok_or_else(|| invalid(name, "'on' or 'off'")),
            _ => Err(invalid(name, "a boolean")),
        }
    }

    /// A JSON number as u64, with the QEMU-style complaint for everything else.
    fn number_to_u64(name: &str, v: &Value) -> Result<u64> {
        match v.as_u64() {
            Some(n) => Ok(n),
            None if v.as_i64().is_some() => Err(invalid(name, "a non-negative integer")),
            None => Err(invalid(name, "an integer")),
        }
    }

    /// An unsigned integer: a JSON number or a string [`parse_uint`] accepts.
    pub fn to_uint(name: &str, v: &Value) -> Result<u64> {
        match v {
            Value::Number(_) => number_to_u64(name, v),
            Value::String(s) => parse_uint(s).ok_or_else(|| invalid(name, "an integer")),
            _ => Err(invalid(name, "an integer")),
        }
    }

    /// A signed integer (QAPI `int`): a JSON number or a decimal string.
    pub fn to_int(name: &str, v: &Value) -> Result<i64> {
        match v {
            Value::Number(n) => n.as_i64().ok_or_else(|| invalid(name, "an integer")),
            Value::String(s) => s.parse().map_err(|_| invalid(name, "an integer")),
            _ => Err(invalid(name, "an integer")),
        }
    }

    /// A size in bytes: a JSON number or a string [`parse_size`] accepts.
    pub fn to_size(name: &str, v: &Value) -> Result<u64> {
        match v {
            Value::Number(_) => number_to_u64(name, v).map_err(|_| invalid(name, "a size")),
            Value::String(s) => parse_size(s).ok_or_else(|| invalid(name, "a size")),
            _ => Err(invalid(name, "a size")),
        }
    }

    /// A string.
    pub fn to_string(name: &str, v: &Value) -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(invalid(name, "a string")),
        }
    }

    /// One of `choices`, named by its QEMU string.
    pub fn to_enum<T: Copy>(name: &str, v: &Value, choices: &[(&str, T)]) -> Result<T> {
        let Some(s) = v.as_str() else {
            return Err(invalid(name, "a string"));
        };
        choices
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, value)| *value)
            .ok_or_else(|| OptionsError::BadEnum {
                name: name.to_string(),
                value: s.to_string(),
            })
    }

    /// The members of one options object, consumed key by key; whatever is left at
    /// [`Fields::finish`] is unexpected. Error messages name keys by their full dotted
    /// path (`cache.direct`, `file.filename`).
    #[derive(Debug, Clone)]
    pub struct Fields {
        map: Map<String, Value>,
        prefix: String,
        /// QMP input: every value must have its JSON type (no strings for numbers or
        /// booleans, as the keyval syntax of the command line gives).
        strict: bool,
    }

    impl Fields {
        /// `v` must be an object; `name` is its dotted path ("" for the top level).
        pub fn new(v: &Value, name: &str) -> Result<Self> {
            match v {
                Value::Object(map) => Ok(Self::from_map(map.clone(), name)),
                _ if name.is_empty() => Err(invalid("options", "an object")),
                _ => Err(invalid(name, "an object")),
            }
        }

        pub fn from_map(map: Map<String, Value>, name: &str) -> Self {
            let prefix = if name.is_empty() {
                String::new()
            } else {
                format!("{name}.")
            };
            Self {
                map,
                prefix,
                strict: false,
            }
        }

        /// As [`Fields::new`] for QMP input, where JSON types are checked strictly.
        pub fn new_strict(v: &Value, name: &str) -> Result<Self> {
            match v {
                Value::Object(_) => {}
                _ if name.is_empty() => return Err(type_error("options", "object")),
                _ => return Err(type_error(name, "object")),
            }
            let mut f = Self::new(v, name)?;
            f.strict = true;
            Ok(f)
        }

        /// Whether JSON types are checked strictly (QMP input).
        pub fn is_strict(&self) -> bool {
            self.strict
        }

        /// Fields of a nested object `v` named `name`, as strict as these.
        pub fn nested(&self, v: &Value, name: &str) -> Result<Self> {
            if self.strict {
                Self::new_strict(v, name)
            } else {
                Self::new(v, name)
            }
        }

        /// In strict mode, refuses a value whose JSON type is not `expected`.
        fn check_type(&self, name: &str, v: &Value, expected: &'static str) -> Result<()> {
            if !self.strict {
                return Ok(());
            }
            let ok = match expected {
                "boolean" => v.is_boolean(),
                "integer" => v.is_number(),
                "string" => v.is_string(),
                _ => v.is_object(),
            };
            if ok {
                Ok(())
            } else {
                Err(type_error(name, expected))
            }
        }

        /// The full dotted name of `key`.
        pub fn name(&self, key: &str) -> String {
            format!("{}{key}", self.prefix)
        }

        pub fn contains(&self, key: &str) -> bool {
            self.map.contains_key(key)
        }

        /// Removes and returns the raw value of `key`.
        pub fn take(&mut self, key: &str) -> Option<Value> {
            self.map.remove(key)
        }

        fn take_with<T>(
            &mut self,
            key: &str,
            expected: &'static str,
            convert: impl FnOnce(&str, &Value) -> Result<T>,
        ) -> Result<Option<T>> {
            match self.map.remove(key) {
                Some(v) => {
                    let name = self.name(key);
                    self.check_type(&name, &v, expected)?;
                    convert(&name, &v).map(Some)
                }
                None => Ok(None),
            }
        }

        pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
            self.take_with(key, "boolean", to_bool)
        }

        pub fn uint(&mut self, key: &str) -> Result<Option<u64>> {
            self.take_with(key, "integer", to_uint)
        }

        pub fn int(&mut self, key: &str) -> Result<Option<i64>> {
            self.take_with(key, "integer", to_int)
        }

        pub fn size(&mut self, key: &str) -> Result<Option<u64>> {
            self.take_with(key, "integer", to_size)
        }

        /// An option of a QAPI unsigned type (`uint16`, `uint64`, `size`): QMP input of
        /// the wrong type gets QEMU's "Parameter 'x' expects uint64".
        pub fn unsigned(&mut self, key: &str) -> Result<Option<u64>> {
            if self.strict && self.map.get(key).is_some_and(|v| !v.is_u64()) {
                return Err(OptionsError::Invalid {
                    name: self.name(key),
                    expected: "uint64".into(),
                });
            }
            self.uint(key)
        }

        pub fn string(&mut self, key: &str) -> Result<Option<String>> {
            self.take_with(key, "string", to_string)
        }

        pub fn enumeration<T: Copy>(
            &mut self,
            key: &str,
            choices: &[(&str, T)],
        ) -> Result<Option<T>> {
            self.take_with(key, "string", |name, v| to_enum(name, v, choices))
        }

        /// The nested object `key`, as `Fields` of its own (finish it separately).
        pub fn object(&mut self, key: &str) -> Result<Option<Fields>> {
            let strict = self.strict;
            self.take_with(key, "object", |name, v| {
                let mut f = Fields::new(v, name)?;
                f.strict = strict;
                Ok(f)
            })
        }

        /// `Missing` unless `value` is present.
        pub fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
            value.ok_or_else(|| OptionsError::Missing(self.name(key)))
        }

        pub fn required_string(&mut self, key: &str) -> Result<String> {
            let value = self.string(key)?;
            self.required(key, value)
        }

        /// Fails naming the first key nobody consumed.
        pub fn finish(self) -> Result<()> {
            match self.map.keys().next() {
                Some(key) => Err(OptionsError::Unexpected(format!("{}{key}", self.prefix))),
                None => Ok(()),
            }
        }
    }
}

const DISCARD_CHOICES: &[(&str, DiscardMode)] = &[
    ("ignore", DiscardMode::Ignore),
    ("off", DiscardMode::Ignore),
    ("unmap", DiscardMode::Unmap),
    ("on", DiscardMode::Unmap),
];

const DETECT_ZEROES_CHOICES: &[(&str, DetectZeroes)] = &[
    ("off", DetectZeroes::Off),
    ("on", DetectZeroes::On),
    ("unmap", DetectZeroes::Unmap),
];

/// QEMU 7.2's `BlockdevDriver` names: a driver QEMU knows but vubd does not have gets
/// a message saying so; any other name is refused as QEMU refuses it.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The QEMU string of an enum value (the first name listed for it).
pub fn choice_name<T: Copy + PartialEq>(choices: &[(&'static str, T)], value: T) -> &'static str {
    choices
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("", |(name, _)| name)
}

/// "Invalid parameter value for 'name': reason".
pub fn bad_value(name: &str, reason: impl Into<String>) -> OptionsError {
    OptionsError::BadValue {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl CommonOptions {
    /// Consumes the keys every driver takes.
    pub(crate) fn take_from(f: &mut Fields) -> Result<Self> {
        let node_name = f.string("node-name")?;
        if let Some(name) = &node_name {
            coerce::check_node_name(&f.name("node-name"), name)?;
        }
        let mut common = CommonOptions {
            node_name,
            discard: f
                .enumeration("discard", DISCARD_CHOICES)?
                .unwrap_or_default(),
            read_only: f.bool("read-only")?.unwrap_or(false),
            auto_read_only: f.bool("auto-read-only")?.unwrap_or(false),
            force_share: f.bool("force-share")?.unwrap_or(false),
            detect_zeroes: f
                .enumeration("detect-zeroes", DETECT_ZEROES_CHOICES)?
                .unwrap_or_default(),
            ..CommonOptions::default()
        };
        if let Some(mut cache) = f.object("cache")? {
            common.cache_direct = cache.bool("direct")?.unwrap_or(false);
            common.cache_no_flush = cache.bool("no-flush")?.unwrap_or(false);
            cache.finish()?;
        }
        common.check(f)?;
        Ok(common)
    }

    /// The combinations QEMU refuses.
    fn check(&self, f: &Fields) -> Result<()> {
        if self.detect_zeroes == DetectZeroes::Unmap && self.discard != DiscardMode::Unmap {
            return Err(bad_value(
                &f.name("detect-zeroes"),
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap",
            ));
        }
        if self.force_share && !self.read_only {
            return Err(bad_value(
                &f.name("force-share"),
                "force-share=on can only be used with read-only images",
            ));
        }
        Ok(())
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        if let Some(name) = &self.node_name {
            m.insert("node-name".into(), json!(name));
        }
        m.insert(
            "discard".into(),
            json!(choice_name(DISCARD_CHOICES, self.discard)),
        );
        m.insert(
            "cache".into(),
            json!({ "direct": self.cache_direct, "no-flush": self.cache_no_flush }),
        );
        m.insert("read-only".into(), json!(self.read_only));
        m.insert("auto-read-only".into(), json!(self.auto_read_only));
        m.insert("force-share".into(), json!(self.force_share));
        m.insert(
            "detect-zeroes".into(),
            json!(choice_name(DETECT_ZEROES_CHOICES, self.detect_zeroes)),
        );
    }

    /// Fills in what an inline child of this (format) node inherits unless it sets the
    /// option itself, as QEMU's `bdrv_inherited_options()`: read-only, auto-read-only,
    /// force-share and the cache options; and discard defaults to unmap on the lower
    /// layer (the format node applies the user's discard policy).
    pub fn inherit_into(&self, child: &mut Map<String, Value>) {
        let defaults = [
            ("read-only", json!(self.read_only)),
            ("auto-read-only", json!(self.auto_read_only)),
            ("force-share", json!(self.force_share)),
            ("discard", json!("unmap")),
        ];
        for (key, value) in defaults {
            child.entry(key).or_insert(value);
        }
        let cache = child
            .entry("cache")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(cache) = cache {
            cache.entry("direct").or_insert(json!(self.cache_direct));
            cache
                .entry("no-flush")
                .or_insert(json!(self.cache_no_flush));
        }
    }
}

impl BlockdevRef {
    pub fn take_from(f: &mut Fields, key: &str, parent: &CommonOptions) -> Result<Self> {
        let name = f.name(key);
        match f.take(key) {
            None => Err(OptionsError::Missing(name)),
            Some(Value::String(node)) => Ok(BlockdevRef::Reference(node)),
            Some(Value::Object(mut child)) => {
                parent.inherit_into(&mut child);
                let child = BlockdevOptions::parse(&f.nested(&Value::Object(child), &name)?)?;
                Ok(BlockdevRef::Inline(Box::new(child)))
            }
            Some(_) => Err(OptionsError::Invalid {
                name,
                expected: "a node name or an object".into(),
            }),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            BlockdevRef::Reference(node) => json!(node),
            BlockdevRef::Inline(child) => child.to_json(),
        }
    }
}

impl BackingRef {
    /// The `backing` option of a format with backing files: a node name, an inline
    /// node (read-only unless it says otherwise), or null.
    pub fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        Ok(match f.take("backing") {
            None => BackingRef::FromHeader,
            Some(Value::Null) => BackingRef::None,
            // The keyval syntax cannot write JSON null; QEMU reads "null" as null.
            Some(Value::String(s)) if s == "null" && !f.is_strict() => BackingRef::None,
            Some(Value::String(node)) => BackingRef::Node(BlockdevRef::Reference(node)),
            Some(Value::Object(mut child)) => {
                // A backing file is read-only unless it says otherwise.
                child.entry("read-only").or_insert(Value::Bool(true));
                common.inherit_into(&mut child);
                let name = f.name("backing");
                let child = BlockdevOptions::parse(&f.nested(&Value::Object(child), &name)?)?;
                BackingRef::Node(BlockdevRef::Inline(Box::new(child)))
            }
            Some(_) => {
                return Err(OptionsError::Invalid {
                    name: f.name("backing"),
                    expected: "a node name, an object or null".into(),
                })
            }
        })
    }

    /// The node given, if any.
    pub fn node(&self) -> Option<&BlockdevRef> {
        match self {
            BackingRef::Node(b) => Some(b),
            _ => None,
        }
    }

    /// Adds `backing` to the canonical form (absent when read from the header).
    pub fn write_json(&self, m: &mut Map<String, Value>) {
        match self {
            BackingRef::FromHeader => {}
            BackingRef::None => {
                m.insert("backing".into(), Value::Null);
            }
            BackingRef::Node(b) => {
                m.insert("backing".into(), b.to_json());
            }
        }
    }
}

impl BlockdevOptions {
    /// Parses QEMU `BlockdevOptions` (the `blockdev-add` argument, the `--blockdev`
    /// option after keyval parsing). `node-name` is optional here; see
    /// [`BlockdevOptions::from_json_root`].
    pub fn from_json(v: &Value) -> Result<Self> {
        Self::parse(&Fields::new(v, "")?)
    }

    /// As [`BlockdevOptions::from_json_root`] for QMP input (`blockdev-add`), where
    /// every value must have its JSON type.
    pub fn from_qmp(v: &Value) -> Result<Self> {
        let options = Self::parse(&Fields::new_strict(v, "")?)?;
        if options.common.node_name.is_none() {
            return Err(OptionsError::NoRootNodeName);
        }
        Ok(options)
    }

    /// Whether QEMU has a block driver of this name (which vubd may lack).
    pub fn is_qemu_driver(name: &str) -> bool {
        QEMU_DRIVERS.contains(&name)
    }

    /// As [`BlockdevOptions::from_qmp`] for one element of a list argument
    /// (`blockdev-reopen`'s `options`): errors name `prefix.key`, and `node-name` is
    /// left for the caller to check.
    pub fn from_qmp_at(v: &Value, prefix: &str) -> Result<Self> {
        Self::parse(&Fields::new_strict(v, prefix)?)
    }

    /// As [`BlockdevOptions::from_json`] for a node of its own (not an inline child),
    /// which needs a `node-name` as in QEMU's `blockdev-add`.
    pub fn from_json_root(v: &Value) -> Result<Self> {
        let options = Self::from_json(v)?;
        if options.common.node_name.is_none() {
            return Err(OptionsError::NoRootNodeName);
        }
        Ok(options)
    }

    /// Parses the options in `f` (whose prefix is the dotted path of this object: ""
    /// at the top, "file" for raw's child): the common options, then the driver's
    /// own through its entry in the driver table.
    fn parse(f: &Fields) -> Result<Self> {
        let mut f = f.clone();
        let driver = f.required_string("driver")?;
        let common = CommonOptions::take_from(&mut f)?;
        let Some((entry, name)) = drivers::find(&driver) else {
            if QEMU_DRIVERS.contains(&driver.as_str()) {
                return Err(bad_value(
                    &f.name("driver"),
                    format!(
                        "driver '{driver}' is not supported by vubd yet (vubd has {})",
                        drivers::names_text(|_| true)
                    ),
                ));
            }
            return Err(OptionsError::BadEnum {
                name: f.name("driver"),
                value: driver,
            });
        };
        let driver = (entry.parse)(&mut f, &common, name)?;
        f.finish()?;
        Ok(BlockdevOptions { common, driver })
    }

    /// The canonical QEMU form with native JSON types and every option explicit;
    /// [`BlockdevOptions::from_json`] of it gives back an equal value.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("driver".into(), json!(self.driver.driver_name()));
        self.common.write_json(&mut m);
        self.driver.write_json(&mut m);
        Value::Object(m)
    }

    /// This node's name and those of its inline children, outermost first.
    pub fn node_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.common.node_name.as_deref().into_iter().collect();
        for child in self.driver.children() {
            if let BlockdevRef::Inline(child) = child {
                names.extend(child.node_names());
            }
        }
        names
    }

    /// The node names this node refers to (not inline children), its own and its
    /// inline children's.
    pub fn references(&self) -> Vec<&str> {
        self.driver
            .children()
            .into_iter()
            .flat_map(|c| match c {
                BlockdevRef::Reference(node) => vec![node.as_str()],
                BlockdevRef::Inline(child) => child.references(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::coerce::{parse_bool, parse_size, parse_uint};
    use super::*;

    fn parse(v: Value) -> Result<BlockdevOptions> {
        BlockdevOptions::from_json(&v)
    }

    fn error(v: Value) -> String {
        match parse(v) {
            Ok(options) => panic!("expected an error, got {options:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bools() {
        for s in ["on", "yes", "true", "y", "ON", "True"] {
            assert_eq!(parse_bool(s), Some(true), "{s}");
        }
        for s in ["off", "no", "false", "n", "OFF"] {
            assert_eq!(parse_bool(s), Some(false), "{s}");
        }
        for s in ["", "1", "0", "onn", "enable"] {
            assert_eq!(parse_bool(s), None, "{s}");
        }
    }

    #[test]
    fn uints() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("4096"), Some(4096));
        assert_eq!(parse_uint("0x1000"), Some(4096));
        assert_eq!(parse_uint("0X1f"), Some(31));
        assert_eq!(parse_uint("010"), Some(8));
        assert_eq!(parse_uint("18446744073709551615"), Some(u64::MAX));
        for s in [
            "",
            "-1",
            "+1",
            "1k",
            "0x",
            "08",
            " 1",
            "18446744073709551616",
        ] {
            assert_eq!(parse_uint(s), None, "{s}");
        }
    }

    #[test]
    fn sizes() {
        let cases = [
            ("0", 0),
            ("512", 512),
            ("512b", 512),
            ("512B", 512),
            ("1k", 1024),
            ("1K", 1024),
            ("2M", 2 << 20),
            ("1G", 1 << 30),
            ("1g", 1 << 30),
            ("3T", 3 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("1.5G", 3 << 29),
            (".5K", 512),
            ("0.5k", 512),
            ("1.", 1),
            ("1.0", 1),
            ("0x200", 512),
            ("010", 10),
            ("1.0009765625K", 1025),
            ("0.0001k", 0),
            ("0.0005k", 1),
            ("15E", 15 << 60),
        ];
        for (s, expected) in cases {
            assert_eq!(parse_size(s), Some(expected), "{s}");
        }
        for s in [
            "", "k", ".", "1.5", "1.5b", "1x", "-1", "1 G", "0x10k", "1.2.3G", "16E",
        ] {
            assert_eq!(parse_size(s), None, "{s}");
        }
    }

    #[test]
    fn ids() {
        assert!(coerce::is_valid_id("a"));
        assert!(coerce::is_valid_id("disk-0.a_b"));
        assert!(!coerce::is_valid_id(""));
        assert!(!coerce::is_valid_id("0disk"));
        assert!(!coerce::is_valid_id("#block1"));
        assert!(!coerce::is_valid_id("a b"));
    }

    #[test]
    fn root_needs_node_name() {
        let v = json!({"driver": "null-co"});
        assert!(BlockdevOptions::from_json(&v).is_ok());
        let e = BlockdevOptions::from_json_root(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "'node-name' must be specified for the root node"
        );
    }

    #[test]
    fn errors() {
        let cases = [
            (json!({"node-name": "x"}), "Parameter 'driver' is missing"),
            (
                json!({"driver": "file", "node-name": "x"}),
                "Parameter 'filename' is missing",
            ),
            (
                json!({"driver": "file", "filename": "f", "foo": "1"}),
                "Parameter 'foo' is unexpected",
            ),
            (
                json!({"driver": "file", "filename": "f", "cache": {"foo": "1"}}),
                "Parameter 'cache.foo' is unexpected",
            ),
            (
                json!({"driver": "file", "filename": "f", "cache": "on"}),
                "Parameter 'cache' expects an object",
            ),
            (
                json!({"driver": "file", "filename": "f", "read-only": "maybe"}),
                "Parameter 'read-only' expects 'on' or 'off'",
            ),
            (
                json!({"driver": "file", "filename": "f", "read-only": 1}),
                "Parameter 'read-only' expects a boolean",
            ),
            (
                json!({"driver": "null-co", "size": "1Q"}),
                "Parameter 'size' expects a size",
            ),
            (
                json!({"driver": "null-co", "size": -1}),
                "Parameter 'size' expects a size",
            ),
            (
                json!({"driver": "null-co", "latency-ns": "ten"}),
                "Parameter 'latency-ns' expects an integer",
            ),
            (
                json!({"driver": "file", "filename": "f", "aio": "posix"}),
                "Parameter 'aio' does not accept value 'posix'",
            ),
            (
                json!({"driver": "file", "filename": 5}),
                "Parameter 'filename' expects a string",
            ),
            (
                json!({"driver": "foo"}),
                "Parameter 'driver' does not accept value 'foo'",
            ),
            (
                json!({"driver": "nfs"}),
                "Invalid parameter value for 'driver': driver 'nfs' is not supported by \
                 vubd yet (vubd has file, host_device, raw, null-co, null-aio, nbd, blkdebug, \
                 qcow2, luks, copy-on-read, copy-before-write, snapshot-access, throttle and rbd)",
            ),
            (
                json!({"driver": "null-co", "node-name": "0bad"}),
                "Invalid parameter value for 'node-name': '0bad' is not a valid node name \
                 (it must start with a letter and contain only letters, digits, '-', '.' \
                 and '_')",
            ),
            (
                json!({"driver": "null-co", "node-name": "a234567890123456789012345678901b"}),
                "Invalid parameter value for 'node-name': node name \
                 'a234567890123456789012345678901b' is longer than 31 characters",
            ),
            (json!({"driver": "raw"}), "Parameter 'file' is missing"),
            (
                json!({"driver": "raw", "file": 3}),
                "Parameter 'file' expects a node name or an object",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "file", "filename": "f",
                                                 "cache": {"direct": "x"}}}),
                "Parameter 'file.cache.direct' expects 'on' or 'off'",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "file", "filename": "f",
                                                 "bogus": true}}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver": "raw", "file": "f", "size": "1000"}),
                "Invalid parameter value for 'size': Specified size is not multiple of 512",
            ),
            (
                json!({"driver": "null-co", "detect-zeroes": "unmap"}),
                "Invalid parameter value for 'detect-zeroes': setting detect-zeroes to unmap \
                 is not allowed without setting discard operation to unmap",
            ),
            (
                json!({"driver": "null-co", "force-share": "on"}),
                "Invalid parameter value for 'force-share': force-share=on can only be used \
                 with read-only images",
            ),
            (json!("null-co"), "Parameter 'options' expects an object"),
        ];
        for (v, expected) in cases {
            assert_eq!(error(v.clone()), expected, "{v}");
        }
    }
}
