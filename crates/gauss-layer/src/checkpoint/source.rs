//! Random-access byte sources for the loader: a file read with positioned reads (no memory
//! map, so a file truncated while it is read gives an I/O error, never a bus error) or bytes
//! already in memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// Bytes addressable by offset.
pub(crate) trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from `offset`; an error when the bytes are not there.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// An open file and the length it had when opened.
pub(crate) struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub(crate) fn new(file: File, len: u64) -> Self {
        Self { file, len }
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(buf)
    }
}

/// Bytes in memory.
pub(crate) struct BytesSource<'a>(pub(crate) &'a [u8]);

impl Source for BytesSource<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s <= self.0.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let bytes = self.0[start..]
            .get(..buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}
