//! Just enough of the qcow2 header to know an image's virtual size and backing file without
//! running qemu-img.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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

/// An image's backing file and its format (`qcow2`, `raw`), from the qcow2 header and its
/// "backing file format" extension; `None` for an image without one (or not qcow2).
pub fn backing(path: &Path) -> std::io::Result<Option<(PathBuf, String)>> {
    let mut f = std::fs::File::open(path)?;
    let mut h = [0u8; 104];
    let n = f.read(&mut h)?;
    if n < 72 || &h[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    let version = be32(&h[4..]);
    let offset = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    let size = be32(&h[16..]) as usize;
    if offset == 0 || size == 0 || size > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; size];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    let file = PathBuf::from(std::ffi::OsString::from(
        String::from_utf8_lossy(&name).into_owned(),
    ));
    // Header extensions follow the header: (type, length, data padded to 8 bytes).
    let header_len = if version >= 3 && n >= 104 {
        be32(&h[100..]) as u64
    } else {
        72
    };
    let mut format = None;
    let mut at = header_len;
    for _ in 0..64 {
        let mut ext = [0u8; 8];
        f.seek(SeekFrom::Start(at))?;
        if f.read_exact(&mut ext).is_err() {
            break;
        }
        let (kind, len) = (be32(&ext[..4]), be32(&ext[4..]) as u64);
        if kind == 0 || len > 4096 {
            break;
        }
        if kind == 0xE279_2ACA {
            let mut data = vec![0u8; len as usize];
            f.read_exact(&mut data)?;
            format = Some(String::from_utf8_lossy(&data).into_owned());
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(Some((file, format.unwrap_or_else(|| "raw".into()))))
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
