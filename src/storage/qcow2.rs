//! Just enough of the qcow2 header to know an image's virtual size without running qemu-img.

use std::path::Path;

use tokio::io::AsyncReadExt;

use super::{io_err, Result, StorageError};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The size the guest sees: the qcow2 header's `size` field, or the file length of a raw image.
pub async fn virtual_size(path: &Path) -> Result<u64> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("open", path))?;
    let mut header = [0u8; 32];
    let n = read_up_to(&mut file, &mut header)
        .await
        .map_err(io_err("read", path))?;
    if let Some(size) = parse_header(&header[..n]) {
        return Ok(size);
    }
    if n >= 4 && &header[..4] == QCOW2_MAGIC {
        return Err(StorageError::Io {
            op: "parse qcow2 header of",
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated header"),
        });
    }
    let meta = file.metadata().await.map_err(io_err("stat", path))?;
    Ok(meta.len())
}

fn parse_header(header: &[u8]) -> Option<u64> {
    if header.len() < 32 || &header[..4] != QCOW2_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(header[24..32].try_into().ok()?))
}

async fn read_up_to(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_size_field_of_a_qcow2_header() {
        let mut header = [0u8; 32];
        header[..4].copy_from_slice(QCOW2_MAGIC);
        header[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());

        assert_eq!(parse_header(&header), Some(5 << 30));
    }

    #[test]
    fn anything_else_is_not_qcow2() {
        assert_eq!(parse_header(&[0u8; 32]), None);
        assert_eq!(parse_header(b"QFI\xfb"), None);
    }
}
