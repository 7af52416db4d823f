//! Small I/O helpers shared by the on-disk formats.

use std::io::Read;

/// Reads until `buf` is full or the input ends; returns how much was read.
/// A short count means the input ended (a torn write at the end of a log).
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
