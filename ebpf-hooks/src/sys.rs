//! The few bpf(2) commands that need run-time key and value sizes, which aya's typed maps
//! (sizes fixed at compile time) cannot express. Every `unsafe` block of the crate is here.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr that outlives the call, and the size
    // passed is its size; the kernel reads and writes only within it and the user buffers
    // whose addresses the callers put in it (each valid for the sizes the map declares).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed() -> bpf_attr {
    // SAFETY: bpf_attr is a plain-old-data union of integer fields; all-zero is its documented
    // "unused" value.
    unsafe { std::mem::zeroed() }
}

/// BPF_MAP_CREATE.
pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = zeroed();
    // SAFETY (field access): writing fields of the union variant BPF_MAP_CREATE reads.
    let a = unsafe { &mut attr.__bindgen_anon_1 };
    a.map_type = map_type;
    a.key_size = key_size;
    a.value_size = value_size;
    a.max_entries = max_entries;
    for (dst, src) in a.map_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    let fd = sys_bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: on success BPF_MAP_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn elem_attr(fd: BorrowedFd<'_>, key: *const u8, value: u64, flags: u64) -> bpf_attr {
    let mut attr = zeroed();
    // SAFETY (field access): the element commands read this union variant.
    let a = unsafe { &mut attr.__bindgen_anon_2 };
    a.map_fd = fd.as_raw_fd() as u32;
    a.key = key as u64;
    a.__bindgen_anon_1.value = value;
    a.flags = flags;
    attr
}

/// BPF_MAP_LOOKUP_ELEM into `value` (exactly the map's value size). `Ok(false)`: no such key.
pub(crate) fn lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = elem_attr(fd, key.as_ptr(), value.as_mut_ptr() as u64, 0);
    match sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// BPF_MAP_UPDATE_ELEM with `flags` (BPF_ANY, BPF_NOEXIST, BPF_EXIST).
pub(crate) fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = elem_attr(fd, key.as_ptr(), value.as_ptr() as u64, flags);
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// BPF_MAP_DELETE_ELEM. `Ok(false)`: there was no such key.
pub(crate) fn delete(fd: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    let mut attr = elem_attr(fd, key.as_ptr(), 0, 0);
    match sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// BPF_MAP_GET_NEXT_KEY: the key after `key` (the first key when `None`) into `next`.
/// `Ok(false)`: no more keys.
pub(crate) fn next_key(
    fd: BorrowedFd<'_>,
    key: Option<&[u8]>,
    next: &mut [u8],
) -> io::Result<bool> {
    let key_ptr = key.map_or(std::ptr::null(), <[u8]>::as_ptr);
    let mut attr = elem_attr(fd, key_ptr, next.as_mut_ptr() as u64, 0);
    match sys_bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// BPF_PROG_TEST_RUN: runs the program once on `data`; returns its return value.
pub(crate) fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8]) -> io::Result<u32> {
    let mut attr = zeroed();
    // SAFETY (field access): BPF_PROG_TEST_RUN reads this union variant; `data` outlives the call
    // and no output buffer is given.
    let t = unsafe { &mut attr.test };
    t.prog_fd = prog.as_raw_fd() as u32;
    t.data_in = data.as_ptr() as u64;
    t.data_size_in = data.len() as u32;
    t.repeat = 1;
    sys_bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    // SAFETY: the kernel filled in `retval` of the same variant.
    Ok(unsafe { attr.test.retval })
}

/// Waits until `fd` is readable or `timeout_ms` passes; whether it is readable.
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, borrowed for the call; the descriptor outlives it.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// The first value of a `BPF_F_MMAPABLE` array map of `u32`, mapped into this process: shared
/// with the BPF programs, read and written with atomic operations on both sides.
pub(crate) struct MappedU32 {
    ptr: std::ptr::NonNull<libc::c_void>,
}

// SAFETY: the mapping is plain shared memory, only accessed through `AtomicU32`.
unsafe impl Send for MappedU32 {}

/// One page: an array's values start at offset 0 of its mapping, page aligned.
const PAGE: usize = 4096;

impl MappedU32 {
    /// Maps the array map `fd` (which must be `BPF_F_MMAPABLE`, with `u32` values). The mapping
    /// keeps the map alive after `fd` is closed.
    pub(crate) fn map(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: a new shared mapping of one page of the map; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::NonNull::new(ptr)
            .map(|ptr| Self { ptr })
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))
    }

    pub(crate) fn value(&self) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: the mapping is page aligned, at least 4 bytes long and lives as long as
        // `self`; the kernel side only accesses it atomically or with aligned 4-byte loads.
        unsafe { &*self.ptr.as_ptr().cast::<std::sync::atomic::AtomicU32>() }
    }
}

impl Drop for MappedU32 {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page mapped in `map`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr(), PAGE) };
    }
}

/// Lets this thread's short sleeps be short (the default slack is 50 us).
pub(crate) fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
}

/// BPF_MAP_LOOKUP_BATCH: copies up to `*count` entries after `in_token` (from the start when
/// `None`) into `keys` and `values`, sets `*count` to the number copied and `out_token` to where
/// to resume. `Ok(false)`: the walk is complete (the entries copied are the last ones).
/// Raises the calling thread's nice value by `by` (at most to 19; on Linux niceness is per
/// thread): it yields the CPU to the process's other threads, whatever niceness they run at.
pub(crate) fn lower_thread_priority(by: i32) -> io::Result<()> {
    // SAFETY: plain system calls on the calling thread's own id; no memory is passed. errno is
    // cleared first because -1 is also a valid getpriority result.
    let ret = unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19))
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn lookup_batch(
    fd: BorrowedFd<'_>,
    in_token: Option<&[u8]>,
    out_token: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: &mut u32,
) -> io::Result<bool> {
    let mut attr = zeroed();
    // SAFETY (field access): BPF_MAP_LOOKUP_BATCH reads this union variant. The key and value
    // buffers hold `*count` entries of the map's sizes, the tokens are at least as large as the
    // map's key (and 8 bytes), all outliving the call.
    let b = unsafe { &mut attr.batch };
    b.map_fd = fd.as_raw_fd() as u32;
    b.in_batch = in_token.map_or(0, |t| t.as_ptr() as u64);
    b.out_batch = out_token.as_mut_ptr() as u64;
    b.keys = keys.as_mut_ptr() as u64;
    b.values = values.as_mut_ptr() as u64;
    b.count = *count;
    let res = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
    // SAFETY: the kernel wrote back `count` in the same variant.
    *count = unsafe { attr.batch.count };
    match res {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// BPF_MAP_DELETE_BATCH: deletes `*count` keys from `keys` (packed, the map's key size); on
/// return `*count` is the number deleted (it stops at the first missing key, ENOENT).
pub(crate) fn delete_batch(fd: BorrowedFd<'_>, keys: &[u8], count: &mut u32) -> io::Result<()> {
    let mut attr = zeroed();
    // SAFETY (field access): BPF_MAP_DELETE_BATCH reads this union variant; the buffer holds
    // `*count` packed keys of the map's key size and outlives the call.
    let b = unsafe { &mut attr.batch };
    b.map_fd = fd.as_raw_fd() as u32;
    b.keys = keys.as_ptr() as u64;
    b.count = *count;
    let res = sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr);
    // SAFETY: the kernel wrote back `count` in the same variant.
    *count = unsafe { attr.batch.count };
    res.map(drop)
}

/// BPF_MAP_UPDATE_BATCH: writes `*count` entries from `keys` and `values` (packed, the map's
/// sizes); on return `*count` is the number written.
pub(crate) fn update_batch(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: &mut u32,
) -> io::Result<()> {
    let mut attr = zeroed();
    // SAFETY (field access): BPF_MAP_UPDATE_BATCH reads this union variant; the buffers hold
    // `*count` packed keys and values of the map's sizes and outlive the call.
    let b = unsafe { &mut attr.batch };
    b.map_fd = fd.as_raw_fd() as u32;
    b.keys = keys.as_ptr() as u64;
    b.values = values.as_ptr() as u64;
    b.count = *count;
    let res = sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr);
    // SAFETY: the kernel wrote back `count` in the same variant.
    *count = unsafe { attr.batch.count };
    res.map(drop)
}
