//! Reading handoff's own small files (the config, `state.json`, the restore records)
//! without trusting what sits at their path.
//!
//! The root hook reads them on every VM start, and the surfaces on every refresh. A plain
//! `fs::read` follows whatever is there: a FIFO in place of `state.json` blocks it for
//! ever (libvirtd then waits on the hook), a symlink to `/dev/zero` grows it until memory
//! runs out. So [`read`] opens without blocking (`O_NONBLOCK`: opening a FIFO returns at
//! once), checks the open file with `fstat` (a regular file, no larger than [`MAX_LEN`])
//! and reads at most that much. With [`Links::Refuse`] it does not follow a symlink at the
//! last component either (`O_NOFOLLOW`): the files under `[host] run` are written by
//! rename and are never links, so a link there is someone else's.
//!
//! Errors are `io::Error`s whose text says what was found ("a FIFO, not a regular file"),
//! so the callers' own errors, which name the path, stay as they are; `NotFound` keeps its
//! kind, because a missing file means "no record" or "defaults" to them.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest file read: a config or a record is a few KiB; anything near this is not one.
pub const MAX_LEN: u64 = 1 << 20;

/// Whether a symlink at the file's own name is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it (the config: `/etc/handoff/config.toml` may be a link into a managed tree).
    Follow,
    /// Refuse it (`ELOOP`): the files under `[host] run`, which handoff writes by rename.
    Refuse,
}

/// The bytes of the regular file at `path`, at most [`MAX_LEN`] of them, read without ever
/// blocking on a FIFO or a device.
pub fn read(path: &Path, links: Links) -> io::Result<Vec<u8>> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if links == Links::Refuse => io::Error::new(
                io::ErrorKind::InvalidData,
                "it is a symbolic link, and handoff writes this file itself, never as a link; remove it",
            ),
            _ => e,
        })?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {what}, not a regular file; remove it"),
        ));
    }
    too_large(meta.len())?;
    read_capped(file, meta.len())
}

/// [`read`] as text; bytes that are not UTF-8 are an error that says so.
pub fn read_to_string(path: &Path, links: Links) -> io::Result<String> {
    String::from_utf8(read(path, links)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

fn too_large(len: u64) -> io::Result<()> {
    if len > MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it is {len} bytes, larger than the {} KiB any of handoff's files can be; it is not one of them",
                MAX_LEN / 1024
            ),
        ));
    }
    Ok(())
}

/// Reads at most [`MAX_LEN`] bytes: a file may grow between `fstat` and `read`.
fn read_capped(file: File, hint: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(hint.min(MAX_LEN) as usize);
    file.take(MAX_LEN + 1).read_to_end(&mut bytes)?;
    too_large(bytes.len() as u64)?;
    Ok(bytes)
}

/// Reads at most `cap` bytes from a stream (the domain XML libvirt writes to the hook's
/// stdin); more than that is an error rather than unbounded memory.
pub fn read_stream(stream: &mut dyn Read, cap: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    stream.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {} KiB", cap / 1024),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        std::fs::write(&p, b"{}").unwrap();
        assert_eq!(read(&p, Links::Refuse).unwrap(), b"{}");
        assert_eq!(read_to_string(&p, Links::Follow).unwrap(), "{}");
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        nix::unistd::mkfifo(c.as_c_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = Instant::now();
        let e = read(&p, Links::Follow).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("a FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn a_device_behind_a_link_is_refused_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("restore.json");
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let e = read(&p, Links::Follow).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = read(&p, Links::Refuse).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_file_larger_than_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        let f = File::create(&p).unwrap();
        f.set_len(MAX_LEN + 1).unwrap();
        let e = read(&p, Links::Follow).unwrap_err();
        assert!(e.to_string().contains("larger than the 1024 KiB"), "{e}");
    }

    #[test]
    fn a_missing_file_keeps_its_kind() {
        let e = read(Path::new("/nonexistent/state.json"), Links::Refuse).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_stream_is_read_up_to_its_cap() {
        assert_eq!(read_stream(&mut &b"<domain/>"[..], 64).unwrap(), b"<domain/>");
        let mut zeros = io::repeat(0);
        let e = read_stream(&mut zeros, 1024).unwrap_err();
        assert!(e.to_string().contains("more than 1 KiB"), "{e}");
    }
}
