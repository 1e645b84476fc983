//! QEMU keyval syntax (`driver=file,node-name=x,cache.direct=on`) into JSON.
