//! The qcow2 image format. Filled in by the qcow2 work; empty for now.
