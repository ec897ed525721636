//! A FUSE view of the simulated `sys/` tree, where writes have the kernel's effects.
//!
//! [`SimMount::mount`] mounts the backing tree of a [`Kernel`] at a mount point. Reads,
//! directory listings, links and attributes pass through to the backing tree (links keep
//! their relative targets, so `bus/pci/devices/<BDF>/driver/unbind` resolves inside the
//! mount, as on `/sys`). A `write(2)` to a control file runs [`Kernel::write`] and returns
//! after its effect, or blocks for real while a fault rule hangs it: the hung request is
//! parked and answered when released, so the filesystem keeps serving everyone else.
//!
//! A write that needs the device lock a hung write holds (see [`super`]) is parked the
//! same way and answered when the hung write ends; so is a read of that device's
//! `driver_override`, whose show takes the lock too (answered with the file as it is then). Like a kernel write that is already
//! being serviced, a hung or waiting writer can't be killed: a SIGKILL takes effect once
//! the write is answered. Dropping the mount releases every
//! hung write with EIO, so nothing stays stuck behind a test.
//!
//! Control from other processes (the libvirt hook, a shell) goes through two files in the
//! mount's root that listings don't show: write commands (see [`Kernel::command`]) to
//! `.simctl`, read it for the fault rules and hung writes; read `.simlog` for the write log.
//!
//! Mounting needs `/dev/fuse` and root; unmounting at exit even after SIGKILL needs
//! `fusermount3` (Debian `fuse3`): without it the mount is made directly and only a clean
//! drop unmounts it. No libfuse is linked.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::{FaultRule, HangId, Kernel, Outcome, Release, WriteRecord};
use handoff::host::Host;

/// Where a process writes control commands, in the mount's root.
pub const CTL_FILE: &str = ".simctl";
/// Where a process reads the write log, in the mount's root.
pub const LOG_FILE: &str = ".simlog";

const CTL_INO: u64 = 2;
const LOG_INO: u64 = 3;
const FIRST_INO: u64 = 4;
/// Nothing is cached: the tree changes under every write.
const TTL: Duration = Duration::ZERO;

/// The kernel and the writes and reads it keeps waiting.
struct Shared {
    kernel: Kernel,
    parked: HashMap<HangId, (ReplyWrite, u32)>,
    /// Reads of `driver_override` waiting for a device lock, in arrival order.
    reads: Vec<ParkedRead>,
}

/// A read waiting for a device lock: answered with the file as it is once the lock is
/// free, as the kernel's show runs once it has the lock.
struct ParkedRead {
    rel: PathBuf,
    backing: PathBuf,
    offset: u64,
    size: u32,
    reply: ReplyData,
}

impl Shared {
    /// Answer the writers whose hung writes ended, then the readers whose lock is free.
    fn settle(&mut self) {
        for (id, result) in self.kernel.take_finished() {
            if let Some((reply, len)) = self.parked.remove(&id) {
                match result {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(fuser::Errno::from_i32(e.0)),
                }
            }
        }
        let (ready, waiting): (Vec<ParkedRead>, Vec<ParkedRead>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| self.kernel.read_waits_for(&r.rel).is_none());
        self.reads = waiting;
        for r in ready {
            reply_read(
                fs::read(&r.backing).map_err(|e| errno(&e)),
                r.offset,
                r.size,
                r.reply,
            );
        }
    }
}

/// Answer a read at `offset` of at most `size` bytes from the whole file's `content`.
fn reply_read(content: Result<Vec<u8>, fuser::Errno>, offset: u64, size: u32, reply: ReplyData) {
    match content {
        Ok(bytes) => {
            let start = (offset as usize).min(bytes.len());
            let end = start.saturating_add(size as usize).min(bytes.len());
            reply.data(&bytes[start..end]);
        }
        Err(e) => reply.error(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Inode numbers for paths under `sys/`, handed out on lookup. Paths, not backing
/// inodes: a removed device that comes back at the same path keeps its number.
#[derive(Default)]
struct Inodes {
    paths: Vec<PathBuf>,
    by_path: HashMap<PathBuf, u64>,
}

impl Inodes {
    fn ino(&mut self, rel: &Path) -> u64 {
        if rel.as_os_str().is_empty() {
            return INodeNo::ROOT.0;
        }
        if let Some(ino) = self.by_path.get(rel) {
            return *ino;
        }
        let ino = FIRST_INO + self.paths.len() as u64;
        self.paths.push(rel.to_owned());
        self.by_path.insert(rel.to_owned(), ino);
        ino
    }

    fn path(&self, ino: INodeNo) -> Option<PathBuf> {
        match ino.0 {
            1 => Some(PathBuf::new()),
            n if n >= FIRST_INO => self.paths.get((n - FIRST_INO) as usize).cloned(),
            _ => None,
        }
    }
}

struct SysfsView {
    backing: PathBuf,
    shared: Arc<Mutex<Shared>>,
    inodes: Mutex<Inodes>,
}

fn attr(ino: u64, m: &fs::Metadata) -> FileAttr {
    let time = |secs: i64, nsecs: i64| {
        UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn virtual_attr(ino: u64, size: usize) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: size as u64,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o600,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &io::Error) -> fuser::Errno {
    fuser::Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl SysfsView {
    fn virtual_text(&self, ino: u64) -> String {
        let shared = lock(&self.shared);
        match ino {
            CTL_INO => shared.kernel.status(),
            _ => shared.kernel.log_text(),
        }
    }

    fn rel(&self, ino: INodeNo) -> Result<PathBuf, fuser::Errno> {
        lock(&self.inodes).path(ino).ok_or(fuser::Errno::ENOENT)
    }

    fn stat(&self, ino: INodeNo) -> Result<FileAttr, fuser::Errno> {
        if matches!(ino.0, CTL_INO | LOG_INO) {
            return Ok(virtual_attr(ino.0, self.virtual_text(ino.0).len()));
        }
        let rel = self.rel(ino)?;
        let m = fs::symlink_metadata(self.backing.join(rel)).map_err(|e| errno(&e))?;
        Ok(attr(ino.0, &m))
    }

    fn control(&self, data: &[u8]) -> Result<(), fuser::Errno> {
        let mut shared = lock(&self.shared);
        let text = String::from_utf8_lossy(data);
        let mut result = Ok(());
        for line in text.lines() {
            if let Err(why) = shared.kernel.command(line) {
                tracing::warn!("{CTL_FILE}: {why}");
                result = Err(fuser::Errno::EINVAL);
            }
        }
        shared.settle();
        result
    }
}

impl Filesystem for SysfsView {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT {
            let ino = match name.to_str() {
                Some(CTL_FILE) => Some(CTL_INO),
                Some(LOG_FILE) => Some(LOG_INO),
                _ => None,
            };
            if let Some(ino) = ino {
                return reply.entry(
                    &TTL,
                    &virtual_attr(ino, self.virtual_text(ino).len()),
                    Generation(0),
                );
            }
        }
        let rel = match self.rel(parent) {
            Ok(p) => p.join(name),
            Err(e) => return reply.error(e),
        };
        match fs::symlink_metadata(self.backing.join(&rel)) {
            Ok(m) => {
                let ino = lock(&self.inodes).ino(&rel);
                reply.entry(&TTL, &attr(ino, &m), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    /// sysfs ignores truncation (`echo x > file` opens with O_TRUNC), and so do we.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.stat(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .rel(ino)
            .and_then(|rel| fs::read_link(self.backing.join(rel)).map_err(|e| errno(&e)))
        {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: every read and write reaches us, sized as the caller made it.
        match self.stat(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if matches!(ino.0, CTL_INO | LOG_INO) {
            return reply_read(Ok(self.virtual_text(ino.0).into_bytes()), offset, size, reply);
        }
        let rel = match self.rel(ino) {
            Ok(rel) => rel,
            Err(e) => return reply.error(e),
        };
        let backing = self.backing.join(&rel);
        let mut shared = lock(&self.shared);
        if shared.kernel.read_waits_for(&rel).is_some() {
            // `driver_override` of a device a hung write holds: the reader blocks, like
            // one in `device_lock`, until `settle` finds the lock free.
            shared.reads.push(ParkedRead {
                rel,
                backing,
                offset,
                size,
                reply,
            });
            return;
        }
        drop(shared);
        reply_read(fs::read(&backing).map_err(|e| errno(&e)), offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let len = data.len() as u32;
        match ino.0 {
            CTL_INO => {
                return match self.control(data) {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(e),
                };
            }
            LOG_INO => return reply.error(fuser::Errno::EACCES),
            _ => {}
        }
        let rel = match self.rel(ino) {
            Ok(rel) => rel,
            Err(e) => return reply.error(e),
        };
        let mut shared = lock(&self.shared);
        match shared.kernel.write(&rel, data) {
            Outcome::Done(Ok(())) => reply.written(len),
            Outcome::Done(Err(e)) => reply.error(fuser::Errno::from_i32(e.0)),
            Outcome::Hung(id) => {
                shared.parked.insert(id, (reply, len));
            }
        }
        shared.settle();
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let rel = match self.rel(ino) {
            Ok(rel) => rel,
            Err(e) => return reply.error(e),
        };
        let mut names: Vec<(PathBuf, FileType)> = match fs::read_dir(self.backing.join(&rel)) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| {
                    let kind = e
                        .file_type()
                        .ok()
                        .and_then(FileType::from_std)
                        .unwrap_or(FileType::RegularFile);
                    (PathBuf::from(e.file_name()), kind)
                })
                .collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut inodes = lock(&self.inodes);
        let parent = rel.parent().map_or(INodeNo::ROOT.0, |p| inodes.ino(p));
        let mut entries = vec![
            (ino.0, FileType::Directory, PathBuf::from(".")),
            (parent, FileType::Directory, PathBuf::from("..")),
        ];
        for (name, kind) in names {
            entries.push((inodes.ino(&rel.join(&name)), kind, name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    /// sysfs files carry no extended attributes (`ls -l` asks for SELinux labels).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(fuser::Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }
}

/// A [`Kernel`] mounted as a sysfs view. Dropping it releases hung writes with EIO and
/// unmounts (lazily, so a process still inside can't keep the mount).
pub struct SimMount {
    shared: Arc<Mutex<Shared>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    /// The thread that ends sound unbinds once their holders close (see [`node_watcher`]).
    watcher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// Wait for a removed device node's last holder to close it, then let the kernel finish
/// what waited for that ([`Kernel::nodes_changed`]) and answer its writer. A `write(2)` to
/// the mount can wait for a process that is not writing, so nothing inside a FUSE handler
/// can wake it: this thread does, and it only polls an inotify queue and takes the same
/// lock the handlers take (never while a handler waits on anything). Stops within 100 ms
/// of `stop`.
fn node_watcher(shared: Arc<Mutex<Shared>>, events: OwnedFd, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(n) if n > 0 => {
                    let mut shared = lock(&shared);
                    shared.kernel.nodes_changed();
                    shared.settle();
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!("simulated kernel: polling for closed device nodes: {e}");
                    return;
                }
            }
        }
    })
}

impl SimMount {
    /// Mount `kernel`'s `sys/` at `mountpoint` (an existing empty directory) and serve it
    /// on a background thread.
    pub fn mount(kernel: Kernel, mountpoint: &Path) -> io::Result<SimMount> {
        let backing = kernel.sim().sysfs();
        let events = kernel.node_events();
        let shared = Arc::new(Mutex::new(Shared {
            kernel,
            parked: HashMap::new(),
            reads: Vec::new(),
        }));
        let view = || SysfsView {
            backing: backing.clone(),
            shared: shared.clone(),
            inodes: Mutex::new(Inodes::default()),
        };
        let config = |auto_unmount: bool| {
            let mut c = Config::default();
            c.mount_options = vec![
                MountOption::FSName("handoff-sim".into()),
                MountOption::Subtype("handoff-sim".into()),
            ];
            if auto_unmount {
                c.mount_options.push(MountOption::AutoUnmount);
            }
            // The libvirt hook and the test may be different users of the same mount.
            c.acl = SessionACL::All;
            c
        };
        let session = match fuser::spawn_mount(view(), mountpoint, &config(true)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "mounting {} with auto-unmount (fusermount3, Debian fuse3) failed: {e}; \
                     mounting directly, so only a clean exit unmounts it",
                    mountpoint.display()
                );
                fuser::spawn_mount(view(), mountpoint, &config(false)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "mounting the simulated sysfs at {}: {e} (needs root and /dev/fuse)",
                            mountpoint.display()
                        ),
                    )
                })?
            }
        };
        let watcher = events.map(|fd| {
            let stop = Arc::new(AtomicBool::new(false));
            (stop.clone(), node_watcher(shared.clone(), fd, stop))
        });
        Ok(SimMount {
            shared,
            mountpoint: mountpoint.to_owned(),
            session: Some(session),
            watcher,
        })
    }

    /// The mount point: the simulated `/sys`.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Roots for the library: this mount as sysfs, the simulation's `/dev` and `/run`.
    pub fn host(&self) -> Host {
        let sim = self.kernel(|k| k.sim().clone());
        Host {
            sysfs: self.mountpoint.clone(),
            ..sim.host()
        }
    }

    /// Use the kernel (inject faults, read the log, load drivers, …); writers whose hung
    /// writes ended meanwhile get their answers.
    pub fn kernel<R>(&self, f: impl FnOnce(&mut Kernel) -> R) -> R {
        let mut shared = lock(&self.shared);
        let r = f(&mut shared.kernel);
        shared.settle();
        r
    }

    pub fn inject(&self, rule: FaultRule) {
        self.kernel(|k| k.inject(rule));
    }

    /// End every hung write.
    pub fn release(&self, how: Release) {
        self.kernel(|k| k.release(None, how));
    }

    pub fn log(&self) -> Vec<WriteRecord> {
        self.kernel(|k| k.log().to_vec())
    }

    /// Writes hung by a fault rule.
    pub fn hung(&self) -> Vec<HangId> {
        self.kernel(|k| k.hung())
    }

    /// Writes waiting behind a hung write for a device lock.
    pub fn blocked(&self) -> Vec<HangId> {
        self.kernel(|k| k.blocked())
    }

    /// Wait until at least `n` writes are blocked behind hung ones; false on timeout.
    pub fn wait_for_blocked(&self, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.blocked().len() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads waiting for a device lock (reads of a locked device's `driver_override`).
    pub fn blocked_reads(&self) -> usize {
        lock(&self.shared).reads.len()
    }

    /// Wait until at least `n` reads wait for a device lock; false on timeout.
    pub fn wait_for_blocked_reads(&self, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.blocked_reads() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until at least `n` writes are hung; false on timeout.
    pub fn wait_for_hung(&self, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.hung().len() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Unmount now (what dropping does).
    pub fn unmount(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some((stop, thread)) = self.watcher.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        let Some(session) = self.session.take() else {
            return;
        };
        // Writes that were waiting behind a hung one may hang in turn (a hang rule matched
        // them): end those too, so no writer stays parked.
        for _ in 0..64 {
            let stuck = self.kernel(|k| !k.hung().is_empty() || !k.blocked().is_empty());
            if !stuck {
                break;
            }
            self.release(Release::Fail(super::Errno::EIO));
        }
        if let Ok(c) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path; umount2 touches nothing else.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                tracing::debug!(
                    "unmounting {}: {}",
                    self.mountpoint.display(),
                    io::Error::last_os_error()
                );
            }
        }
        let guard = &session.guard;
        let end = Instant::now() + Duration::from_secs(2);
        while !guard.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(session);
    }
}

impl Drop for SimMount {
    fn drop(&mut self) {
        self.shutdown();
    }
}
