//! Reading the files a config names (the config itself, the tag key, PEM certificates and
//! keys): whole, but never past a bound. A path that names a device or a stream that never
//! ends (`tag_key_file = "/dev/urandom"`) would otherwise be read until memory runs out,
//! and on a reload that is the running proxy's memory. Pipes are still read
//! (`--config <(envsubst < tpl)`), within the bound.

use std::io::{self, Read};
use std::path::Path;

/// The config file, and each PEM file (a CA bundle of every public root is ~200 KiB).
pub const MAX_FILE: u64 = 16 << 20;
/// The tag key file: a key is tens of bytes.
pub const MAX_KEY_FILE: u64 = 64 << 10;

/// The whole of the file at `path`, if it holds at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("longer than {} KiB: is it the file meant?", limit >> 10),
        ));
    }
    Ok(bytes)
}

/// [`read`] for text: UTF-8, or an error that says so.
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read(path, limit)?).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count();
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text: line {line} holds a byte that is not"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_not() {
        let dir = std::env::temp_dir().join(format!("ifmatch-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sixteen");
        std::fs::write(&path, [b'k'; 16]).unwrap();
        let (exact, over) = (read(&path, 16), read(&path, 15));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(exact.unwrap().len(), 16);
        assert_eq!(over.unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    }
}
