//! The fast path's own per-channel counters, read from the daemon's pinned map
//! ([`CHANNEL_STATS_MAP`] under its pin directory), so the demo can say which path carried the
//! packets: the API reports both paths added up, this map only what the XDP program forwarded.
//!
//! Invariant: **read-only.** The map is opened with `BPF_F_RDONLY` and only looked up; the
//! daemon stays its only user-space writer. Plain `bpf(2)` calls (`BPF_OBJ_GET`,
//! `BPF_OBJ_GET_INFO_BY_FD`, `BPF_MAP_LOOKUP_ELEM`) rather than a BPF loader: the demo needs
//! three commands, and the value layout comes from `relay-common` like everywhere else. The
//! map's key and value sizes are checked against that layout before any lookup.
use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use relay_common::{CHANNEL_STATS_MAP, ChannelState, ChannelStats, channel_index};

const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
/// `file_flags` of `BPF_OBJ_GET`: a descriptor that can only read the map.
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `union bpf_attr` as `BPF_OBJ_GET` reads it.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit, zeroed: the kernel rejects non-zero bytes after the last field it knows.
    _pad: u32,
}

/// `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info` (the kernel copies at most `info_len` bytes).
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` as `BPF_MAP_LOOKUP_ELEM` reads it.
#[repr(C)]
struct LookupAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the attribute layout `cmd` expects, and every pointer in it must be valid for
/// what the kernel reads or writes through it during the call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: forwarded from the caller; `attr` lives for the call and its size is exact.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A read-only handle on the fast path's per-channel state map.
#[derive(Debug)]
pub struct FastPathStats {
    fd: OwnedFd,
    path: PathBuf,
}

impl FastPathStats {
    /// Opens `<pin_dir>/HR_CHAN_STATE`, checking that it is the array the fast path writes.
    pub fn open(pin_dir: &Path) -> anyhow::Result<FastPathStats> {
        let path = pin_dir.join(CHANNEL_STATS_MAP);
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).context("pin path contains NUL")?;
        let mut attr = ObjGetAttr {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: BPF_F_RDONLY,
            path_fd: 0,
            _pad: 0,
        };
        // SAFETY: BPF_OBJ_GET reads `attr` and the NUL-terminated path it points to, which
        // `c_path` keeps alive for the call.
        let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let fd = i32::try_from(fd).context("descriptor out of range")?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };

        let mut info = MapInfoHead::default();
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfoHead>() as u32,
            info: std::ptr::from_mut(&mut info) as u64,
        };
        // SAFETY: the kernel writes at most `info_len` bytes to `info`, which is that large and
        // lives for the call.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }
            .with_context(|| format!("reading what {} is", path.display()))?;
        let value_size = std::mem::size_of::<ChannelState>();
        if info.map_type != BPF_MAP_TYPE_ARRAY
            || info.key_size != 4
            || info.value_size as usize != value_size
        {
            bail!(
                "{} is not the fast path's state array of this version (type {}, key {} bytes, \
                 value {} bytes; expected type {BPF_MAP_TYPE_ARRAY}, 4, {value_size})",
                path.display(),
                info.map_type,
                info.key_size,
                info.value_size
            );
        }
        Ok(FastPathStats { fd, path })
    }

    /// What the fast path forwarded on the channel owning `port`, by direction.
    pub fn get(&self, port: u16) -> anyhow::Result<ChannelStats> {
        let key = channel_index(port);
        let mut value = ChannelState::default();
        let mut attr = LookupAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: the map's key and value sizes were checked in `open` to be those of `key`
        // (u32) and `value` (ChannelState, plain integers: any bytes are a valid value); both
        // live for the call.
        unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }
            .with_context(|| format!("looking up channel {port} in {}", self.path.display()))?;
        Ok(value.stats)
    }
}
