//! The vubd block layer: a graph of driver nodes and the shared request path.

pub mod options;
