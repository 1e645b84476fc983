//! Typed blockdev options, QEMU's `BlockdevOptions` reduced to the drivers vubd has.
//!
//! The command line (`--blockdev`), the TOML file and (later) QMP `blockdev-add` all
//! produce a `serde_json::Value` in QEMU's shape; [`BlockdevOptions::from_json`] turns it
//! into these types. Values may be native JSON types or strings (the key=value syntax
//! yields strings only), as QEMU's keyval input visitor accepts.

use coerce::Fields;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

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

/// `locking=auto|on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockingMode {
    #[default]
    Auto,
    On,
    Off,
}

/// `aio=threads|native|io_uring`: accepted for compatibility; vubd always uses io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    Threads,
    Native,
    #[default]
    IoUring,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    pub filename: PathBuf,
    /// `aio`
    pub aio: AioMode,
    /// `locking`
    pub locking: LockingMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawOptions {
    pub file: BlockdevRef,
    /// `offset` in bytes (default 0)
    pub offset: u64,
    /// `size` in bytes (default: the rest of the child)
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    /// `size` in bytes (QEMU's default is 1 GiB)
    pub size: u64,
    /// `read-zeroes` (QEMU's default is off: reads leave the buffer as it is)
    pub read_zeroes: bool,
    /// `latency-ns`
    pub latency_ns: u64,
    /// Opened as `null-aio` (the same driver; only the name differs).
    pub aio: bool,
}

/// The request kinds a blkdebug rule applies to (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkdebugIoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

/// One `inject-error` rule of a blkdebug node (QEMU's `BlkdebugInjectErrorOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectErrorOptions {
    /// `event`: the request event that arms the rule (see the blkdebug driver).
    pub event: String,
    /// `state`: the rule applies only in this state (blkdebug starts in state 1).
    pub state: Option<i64>,
    /// `iotype`: the kind of request that fails (default: every kind but
    /// block-status).
    pub iotype: Option<BlkdebugIoType>,
    /// `errno` (default EIO)
    pub errno: i32,
    /// `sector`: only requests covering this sector fail (default -1: any).
    pub sector: i64,
    /// `once`: the rule is removed after it fired.
    pub once: bool,
    /// `immediately`: accepted (vubd always completes the failed request from the
    /// event loop).
    pub immediately: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlkdebugOptions {
    /// `image`: the child that requests go to.
    pub image: BlockdevRef,
    /// `align`: request alignment in bytes.
    pub align: Option<u32>,
    /// `max-transfer`: largest request in bytes.
    pub max_transfer: Option<u32>,
    pub inject_error: Vec<InjectErrorOptions>,
}

/// A `backing` option: absent (open what the image header names), `null` (no
/// backing file), or a node.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingRef {
    FromHeader,
    None,
    Node(BlockdevRef),
}

/// QEMU's `BlockdevOptionsQcow2`, as far as vubd implements it.
#[derive(Debug, Clone, PartialEq)]
pub struct Qcow2Options {
    pub file: BlockdevRef,
    pub backing: BackingRef,
    /// `data-file`: the external data file (default: the one the header names)
    pub data_file: Option<BlockdevRef>,
    /// `lazy-refcounts` (default: the image's compatible bit)
    pub lazy_refcounts: Option<bool>,
    /// `l2-cache-size` in bytes
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes
    pub refcount_cache_size: Option<u64>,
    /// `cache-size`: the two caches together
    pub cache_size: Option<u64>,
    /// `cache-clean-interval` in seconds: drop metadata cache entries unused for
    /// that long (0: never; default: 600, QEMU's on Linux)
    pub cache_clean_interval: Option<u64>,
    /// `pass-discard-request` (default on with discard=unmap), `pass-discard-snapshot`
    /// (default on), `pass-discard-other` (default off)
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: bool,
    pub pass_discard_other: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    File(FileOptions),
    /// `qcow2` (read-only so far)
    Qcow2(Qcow2Options),
    /// `blkdebug`: a filter that fails requests by rule
    Blkdebug(BlkdebugOptions),
    /// `host_device`: the file driver on a block device
    HostDevice(FileOptions),
    Raw(RawOptions),
    /// `null-co` (and `null-aio`, handled alike)
    Null(NullOptions),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    pub common: CommonOptions,
    pub driver: DriverOptions,
}

impl DriverOptions {
    /// The child of a format or filter driver (`file` of raw, `image` of blkdebug).
    pub fn child(&self) -> Option<&BlockdevRef> {
        match self {
            DriverOptions::Raw(r) => Some(&r.file),
            DriverOptions::Blkdebug(b) => Some(&b.image),
            DriverOptions::Qcow2(q) => Some(&q.file),
            _ => None,
        }
    }

    /// Every child given in the options (`file`, `backing`, `image`).
    pub fn children(&self) -> Vec<&BlockdevRef> {
        let mut out: Vec<&BlockdevRef> = self.child().into_iter().collect();
        if let DriverOptions::Qcow2(q) = self {
            if let BackingRef::Node(b) = &q.backing {
                out.push(b);
            }
            if let Some(d) = &q.data_file {
                out.push(d);
            }
        }
        out
    }

    /// The QEMU driver name.
    pub fn driver_name(&self) -> &'static str {
        match self {
            DriverOptions::File(_) => "file",
            DriverOptions::HostDevice(_) => "host_device",
            DriverOptions::Raw(_) => "raw",
            DriverOptions::Null(n) if n.aio => "null-aio",
            DriverOptions::Null(_) => "null-co",
            DriverOptions::Blkdebug(_) => "blkdebug",
            DriverOptions::Qcow2(_) => "qcow2",
        }
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

const LOCKING_CHOICES: &[(&str, LockingMode)] = &[
    ("auto", LockingMode::Auto),
    ("on", LockingMode::On),
    ("off", LockingMode::Off),
];

const AIO_CHOICES: &[(&str, AioMode)] = &[
    ("threads", AioMode::Threads),
    ("native", AioMode::Native),
    ("io_uring", AioMode::IoUring),
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

/// QEMU's default size of a null-co/null-aio node: 1 GiB.
pub const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// The QEMU string of an enum value (the first name listed for it).
fn choice_name<T: Copy + PartialEq>(choices: &[(&'static str, T)], value: T) -> &'static str {
    choices
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("", |(name, _)| name)
}

fn bad_value(name: &str, reason: impl Into<String>) -> OptionsError {
    OptionsError::BadValue {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl CommonOptions {
    /// Consumes the keys every driver takes.
    fn take_from(f: &mut Fields) -> Result<Self> {
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
    fn inherit_into(&self, child: &mut Map<String, Value>) {
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

impl FileOptions {
    fn take_from(f: &mut Fields) -> Result<Self> {
        let filename = f.required_string("filename")?;
        let options = FileOptions {
            filename: PathBuf::from(filename),
            aio: f.enumeration("aio", AIO_CHOICES)?.unwrap_or_default(),
            locking: f
                .enumeration("locking", LOCKING_CHOICES)?
                .unwrap_or_default(),
        };
        // Accepted for compatibility and ignored: vubd sizes its own io_uring batches.
        f.uint("aio-max-batch")?;
        Ok(options)
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("filename".into(), json!(self.filename.to_string_lossy()));
        m.insert("aio".into(), json!(choice_name(AIO_CHOICES, self.aio)));
        m.insert(
            "locking".into(),
            json!(choice_name(LOCKING_CHOICES, self.locking)),
        );
    }
}

impl BlockdevRef {
    fn take_from(f: &mut Fields, key: &str, parent: &CommonOptions) -> Result<Self> {
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

    fn to_json(&self) -> Value {
        match self {
            BlockdevRef::Reference(node) => json!(node),
            BlockdevRef::Inline(child) => child.to_json(),
        }
    }
}

impl RawOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let options = RawOptions {
            file: BlockdevRef::take_from(f, "file", common)?,
            offset: f.size("offset")?.unwrap_or(0),
            size: f.size("size")?,
        };
        if options.size.is_some_and(|size| !size.is_multiple_of(512)) {
            return Err(bad_value(
                &f.name("size"),
                "Specified size is not multiple of 512",
            ));
        }
        Ok(options)
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
        m.insert("offset".into(), json!(self.offset));
        if let Some(size) = self.size {
            m.insert("size".into(), json!(size));
        }
    }
}

impl NullOptions {
    fn take_from(f: &mut Fields) -> Result<Self> {
        Ok(NullOptions {
            size: f.size("size")?.unwrap_or(NULL_DEFAULT_SIZE),
            read_zeroes: f.bool("read-zeroes")?.unwrap_or(false),
            latency_ns: f.unsigned("latency-ns")?.unwrap_or(0),
            aio: false,
        })
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("size".into(), json!(self.size));
        m.insert("read-zeroes".into(), json!(self.read_zeroes));
        m.insert("latency-ns".into(), json!(self.latency_ns));
    }
}

const IOTYPE_CHOICES: &[(&str, BlkdebugIoType)] = &[
    ("read", BlkdebugIoType::Read),
    ("write", BlkdebugIoType::Write),
    ("write-zeroes", BlkdebugIoType::WriteZeroes),
    ("discard", BlkdebugIoType::Discard),
    ("flush", BlkdebugIoType::Flush),
    ("block-status", BlkdebugIoType::BlockStatus),
];

/// QEMU 7.2's `BlkdebugEvent` names.
pub const BLKDEBUG_EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// The events vubd raises: a rule armed by any other event could never fire.
pub const BLKDEBUG_RAISED_EVENTS: &[&str] = &[
    "read_aio",
    "write_aio",
    "pwritev",
    "pwritev_zero",
    "flush_to_os",
    "flush_to_disk",
    "none",
];

impl InjectErrorOptions {
    fn take_from(f: &mut Fields) -> Result<Self> {
        let event = f.required_string("event")?;
        if !BLKDEBUG_EVENTS.contains(&event.as_str()) {
            return Err(OptionsError::BadEnum {
                name: f.name("event"),
                value: event,
            });
        }
        if !BLKDEBUG_RAISED_EVENTS.contains(&event.as_str()) {
            return Err(bad_value(
                &f.name("event"),
                format!(
                    "event '{event}' never occurs in vubd (it has {})",
                    BLKDEBUG_RAISED_EVENTS.join(", ")
                ),
            ));
        }
        let state = f.uint("state")?.map(|s| s as i64);
        let iotype = f.enumeration("iotype", IOTYPE_CHOICES)?;
        let errno = f.uint("errno")?.unwrap_or(libc::EIO as u64);
        let errno = i32::try_from(errno)
            .ok()
            .filter(|e| *e > 0)
            .ok_or_else(|| bad_value(&f.name("errno"), "not a valid errno"))?;
        let sector = match f.take("sector") {
            None => -1,
            Some(v) => match v.as_i64() {
                Some(n) if n >= -1 => n,
                _ => match coerce::to_uint(&f.name("sector"), &v) {
                    Ok(n) => i64::try_from(n)
                        .map_err(|_| bad_value(&f.name("sector"), "out of range"))?,
                    Err(_) if v.as_str() == Some("-1") => -1,
                    Err(e) => return Err(e),
                },
            },
        };
        Ok(InjectErrorOptions {
            event,
            state,
            iotype,
            errno,
            sector,
            once: f.bool("once")?.unwrap_or(false),
            immediately: f.bool("immediately")?.unwrap_or(false),
        })
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), json!(self.event));
        if let Some(state) = self.state {
            m.insert("state".into(), json!(state));
        }
        if let Some(t) = self.iotype {
            m.insert("iotype".into(), json!(choice_name(IOTYPE_CHOICES, t)));
        }
        m.insert("errno".into(), json!(self.errno));
        m.insert("sector".into(), json!(self.sector));
        m.insert("once".into(), json!(self.once));
        m.insert("immediately".into(), json!(self.immediately));
        Value::Object(m)
    }
}

impl BlkdebugOptions {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let image = BlockdevRef::take_from(f, "image", common)?;
        let pow2 = |f: &mut Fields, key: &str| -> Result<Option<u32>> {
            match f.size(key)? {
                None => Ok(None),
                Some(n) if n.is_power_of_two() && n <= u64::from(u32::MAX) => Ok(Some(n as u32)),
                Some(n) => Err(bad_value(
                    &f.name(key),
                    format!("{n} is not a power of two that fits in 32 bits"),
                )),
            }
        };
        let align = pow2(f, "align")?;
        let max_transfer = match f.size("max-transfer")? {
            None => None,
            Some(n) if n > 0 && n <= u64::from(u32::MAX) => Some(n as u32),
            Some(n) => {
                return Err(bad_value(
                    &f.name("max-transfer"),
                    format!("{n} is out of range"),
                ))
            }
        };
        let mut inject_error = Vec::new();
        let name = f.name("inject-error");
        match f.take("inject-error") {
            None => {}
            Some(Value::Array(rules)) => {
                for (i, rule) in rules.iter().enumerate() {
                    let mut rf = f.nested(rule, &format!("{name}.{i}"))?;
                    inject_error.push(InjectErrorOptions::take_from(&mut rf)?);
                    rf.finish()?;
                }
            }
            Some(_) => {
                return Err(OptionsError::Invalid {
                    name,
                    expected: "a list of rules".into(),
                })
            }
        }
        for key in [
            "config",
            "set-state",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
            "take-child-perms",
            "unshare-child-perms",
        ] {
            if f.contains(key) {
                return Err(bad_value(
                    &f.name(key),
                    "this blkdebug option is not supported by vubd",
                ));
            }
        }
        Ok(BlkdebugOptions {
            image,
            align,
            max_transfer,
            inject_error,
        })
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("image".into(), self.image.to_json());
        if let Some(a) = self.align {
            m.insert("align".into(), json!(a));
        }
        if let Some(t) = self.max_transfer {
            m.insert("max-transfer".into(), json!(t));
        }
        m.insert(
            "inject-error".into(),
            Value::Array(self.inject_error.iter().map(|r| r.to_json()).collect()),
        );
    }
}

impl Qcow2Options {
    fn take_from(f: &mut Fields, common: &CommonOptions) -> Result<Self> {
        let file = BlockdevRef::take_from(f, "file", common)?;
        let backing = match f.take("backing") {
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
        };
        let data_file = if f.contains("data-file") {
            Some(BlockdevRef::take_from(f, "data-file", common)?)
        } else {
            None
        };
        let options = Qcow2Options {
            file,
            backing,
            data_file,
            lazy_refcounts: f.bool("lazy-refcounts")?,
            l2_cache_size: f.size("l2-cache-size")?,
            refcount_cache_size: f.size("refcount-cache-size")?,
            cache_size: f.size("cache-size")?,
            cache_clean_interval: f.uint("cache-clean-interval")?,
            pass_discard_request: f.bool("pass-discard-request")?,
            pass_discard_snapshot: f.bool("pass-discard-snapshot")?.unwrap_or(true),
            pass_discard_other: f.bool("pass-discard-other")?.unwrap_or(false),
        };
        // Accepted and without effect: vubd checks every metadata write against the
        // metadata ranges.
        let _ = f.take("overlap-check");
        if options
            .cache_clean_interval
            .is_some_and(|v| v > u64::from(u32::MAX))
        {
            return Err(bad_value(
                &f.name("cache-clean-interval"),
                "Cache clean interval too big",
            ));
        }
        for key in ["encrypt", "l2-cache-entry-size"] {
            if f.contains(key) {
                return Err(bad_value(
                    &f.name(key),
                    "this qcow2 option is not supported by vubd yet",
                ));
            }
        }
        Ok(options)
    }

    fn write_json(&self, m: &mut Map<String, Value>) {
        m.insert("file".into(), self.file.to_json());
        if let Some(d) = &self.data_file {
            m.insert("data-file".into(), d.to_json());
        }
        match &self.backing {
            BackingRef::FromHeader => {}
            BackingRef::None => {
                m.insert("backing".into(), Value::Null);
            }
            BackingRef::Node(b) => {
                m.insert("backing".into(), b.to_json());
            }
        }
        let opt = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        opt(m, "lazy-refcounts", self.lazy_refcounts.map(Value::Bool));
        opt(m, "l2-cache-size", self.l2_cache_size.map(|v| json!(v)));
        opt(
            m,
            "refcount-cache-size",
            self.refcount_cache_size.map(|v| json!(v)),
        );
        opt(m, "cache-size", self.cache_size.map(|v| json!(v)));
        opt(
            m,
            "cache-clean-interval",
            self.cache_clean_interval.map(|v| json!(v)),
        );
        opt(
            m,
            "pass-discard-request",
            self.pass_discard_request.map(Value::Bool),
        );
        m.insert(
            "pass-discard-snapshot".into(),
            json!(self.pass_discard_snapshot),
        );
        m.insert("pass-discard-other".into(), json!(self.pass_discard_other));
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
    /// at the top, "file" for raw's child).
    fn parse(f: &Fields) -> Result<Self> {
        let mut f = f.clone();
        let driver = f.required_string("driver")?;
        let common = CommonOptions::take_from(&mut f)?;
        let driver = match driver.as_str() {
            "file" => DriverOptions::File(FileOptions::take_from(&mut f)?),
            "host_device" => DriverOptions::HostDevice(FileOptions::take_from(&mut f)?),
            "raw" => DriverOptions::Raw(RawOptions::take_from(&mut f, &common)?),
            "null-co" | "null-aio" => {
                let mut null = NullOptions::take_from(&mut f)?;
                null.aio = driver == "null-aio";
                DriverOptions::Null(null)
            }
            "blkdebug" => DriverOptions::Blkdebug(BlkdebugOptions::take_from(&mut f, &common)?),
            "qcow2" => DriverOptions::Qcow2(Qcow2Options::take_from(&mut f, &common)?),
            other if QEMU_DRIVERS.contains(&other) => {
                return Err(bad_value(
                    &f.name("driver"),
                    format!(
                        "driver '{other}' is not supported by vubd yet (vubd has file, \
                         host_device, raw, null-co, null-aio and blkdebug)"
                    ),
                ))
            }
            other => {
                return Err(OptionsError::BadEnum {
                    name: f.name("driver"),
                    value: other.to_string(),
                })
            }
        };
        f.finish()?;
        Ok(BlockdevOptions { common, driver })
    }

    /// The canonical QEMU form with native JSON types and every option explicit;
    /// [`BlockdevOptions::from_json`] of it gives back an equal value.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("driver".into(), json!(self.driver.driver_name()));
        self.common.write_json(&mut m);
        match &self.driver {
            DriverOptions::File(file) | DriverOptions::HostDevice(file) => file.write_json(&mut m),
            DriverOptions::Raw(raw) => raw.write_json(&mut m),
            DriverOptions::Null(null) => null.write_json(&mut m),
            DriverOptions::Blkdebug(b) => b.write_json(&mut m),
            DriverOptions::Qcow2(q) => q.write_json(&mut m),
        }
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
    fn file_keyval_and_json_forms_agree() {
        let keyval = json!({
            "driver": "file", "node-name": "file0", "filename": "/tmp/disk.img",
            "cache": {"direct": "on", "no-flush": "off"}, "aio": "native",
            "locking": "off", "discard": "on", "read-only": "yes", "force-share": "on",
            "auto-read-only": "false", "detect-zeroes": "unmap", "aio-max-batch": "32",
        });
        let native = json!({
            "driver": "file", "node-name": "file0", "filename": "/tmp/disk.img",
            "cache": {"direct": true, "no-flush": false}, "aio": "native",
            "locking": "off", "discard": "unmap", "read-only": true, "force-share": true,
            "auto-read-only": false, "detect-zeroes": "unmap", "aio-max-batch": 32,
        });
        let a = parse(keyval).unwrap();
        assert_eq!(a, parse(native).unwrap());
        assert_eq!(
            a,
            BlockdevOptions {
                common: CommonOptions {
                    node_name: Some("file0".into()),
                    discard: DiscardMode::Unmap,
                    cache_direct: true,
                    cache_no_flush: false,
                    read_only: true,
                    auto_read_only: false,
                    force_share: true,
                    detect_zeroes: DetectZeroes::Unmap,
                },
                driver: DriverOptions::File(FileOptions {
                    filename: "/tmp/disk.img".into(),
                    aio: AioMode::Native,
                    locking: LockingMode::Off,
                }),
            }
        );
        assert_eq!(parse(a.to_json()).unwrap(), a);
    }

    #[test]
    fn defaults() {
        let file = parse(json!({"driver": "host_device", "filename": "/dev/sdb"})).unwrap();
        assert_eq!(file.common, CommonOptions::default());
        assert_eq!(
            file.driver,
            DriverOptions::HostDevice(FileOptions {
                filename: "/dev/sdb".into(),
                aio: AioMode::IoUring,
                locking: LockingMode::Auto,
            })
        );
        let null = parse(json!({"driver": "null-aio"})).unwrap();
        assert_eq!(
            null.driver,
            DriverOptions::Null(NullOptions {
                size: 1073741824,
                read_zeroes: false,
                latency_ns: 0,
                aio: true,
            })
        );
        assert_eq!(null.driver.driver_name(), "null-aio");
    }

    #[test]
    fn null_keyval_and_json_forms_agree() {
        let keyval = json!({"driver": "null-co", "node-name": "n", "size": "1G",
                            "read-zeroes": "on", "latency-ns": "0x10"});
        let native = json!({"driver": "null-co", "node-name": "n", "size": 1073741824u64,
                            "read-zeroes": true, "latency-ns": 16});
        let a = parse(keyval).unwrap();
        assert_eq!(a, parse(native).unwrap());
        assert_eq!(parse(a.to_json()).unwrap(), a);
    }

    #[test]
    fn raw_by_reference() {
        let keyval = json!({"driver": "raw", "node-name": "disk0", "file": "file0",
                            "offset": "1M", "size": "2G"});
        let native = json!({"driver": "raw", "node-name": "disk0", "file": "file0",
                            "offset": 1048576, "size": 2147483648u64});
        let a = parse(keyval).unwrap();
        assert_eq!(a, parse(native).unwrap());
        assert_eq!(
            a.driver,
            DriverOptions::Raw(RawOptions {
                file: BlockdevRef::Reference("file0".into()),
                offset: 1 << 20,
                size: Some(2 << 30),
            })
        );
        assert_eq!(a.references(), vec!["file0"]);
        assert_eq!(a.node_names(), vec!["disk0"]);
        assert_eq!(parse(a.to_json()).unwrap(), a);
    }

    #[test]
    fn qcow2_cache_clean_interval() {
        let keyval = json!({"driver": "qcow2", "node-name": "q", "file": "f",
                            "cache-clean-interval": "30"});
        let a = parse(keyval).unwrap();
        let DriverOptions::Qcow2(q) = &a.driver else {
            panic!("{a:?}");
        };
        assert_eq!(q.cache_clean_interval, Some(30));
        assert_eq!(parse(a.to_json()).unwrap(), a);
        let b = parse(json!({"driver": "qcow2", "node-name": "q", "file": "f"})).unwrap();
        let DriverOptions::Qcow2(q) = &b.driver else {
            panic!("{b:?}");
        };
        assert_eq!(q.cache_clean_interval, None);
        let e = error(json!({"driver": "qcow2", "node-name": "q", "file": "f",
                             "cache-clean-interval": 1u64 << 32}));
        assert!(e.contains("Cache clean interval too big"), "{e}");
    }

    #[test]
    fn raw_with_inline_file() {
        let keyval = json!({"driver": "raw", "node-name": "disk0", "read-only": "on",
                            "cache": {"direct": "on"},
                            "file": {"driver": "file", "filename": "/img", "node-name": "f0"}});
        let a = parse(keyval).unwrap();
        let DriverOptions::Raw(raw) = &a.driver else {
            panic!("not raw: {a:?}");
        };
        let BlockdevRef::Inline(child) = &raw.file else {
            panic!("not inline: {raw:?}");
        };
        // Inherited from the parent, discard=unmap on the lower layer.
        assert!(child.common.read_only);
        assert!(child.common.cache_direct);
        assert!(!child.common.cache_no_flush);
        assert_eq!(child.common.discard, DiscardMode::Unmap);
        assert_eq!(child.common.node_name.as_deref(), Some("f0"));
        assert_eq!(a.node_names(), vec!["disk0", "f0"]);
        assert!(a.references().is_empty());
        assert_eq!(parse(a.to_json()).unwrap(), a);

        // The child's own settings win; node-name is optional in the child.
        let b = parse(json!({"driver": "raw", "read-only": true,
                             "file": {"driver": "file", "filename": "/img",
                                      "read-only": false, "discard": "ignore"}}))
        .unwrap();
        let DriverOptions::Raw(RawOptions {
            file: BlockdevRef::Inline(child),
            ..
        }) = &b.driver
        else {
            panic!("not inline raw: {b:?}");
        };
        assert!(!child.common.read_only);
        assert_eq!(child.common.discard, DiscardMode::Ignore);
        assert_eq!(child.common.node_name, None);
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
                json!({"driver": "nbd"}),
                "Invalid parameter value for 'driver': driver 'nbd' is not supported by \
                 vubd yet (vubd has file, host_device, raw, null-co, null-aio and blkdebug)",
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
