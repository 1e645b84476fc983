//! The command line (qemu-storage-daemon compatible) and the TOML config file.
