//! Go `os.FileMode` bits as they travel in `fsutil.types.Stat.mode`.
//!
//! The fsutil wire format does not carry POSIX `st_mode`: it carries Go's
//! `os.FileMode` (permission bits in the low 9 bits, setuid/setgid/sticky
//! moved to high bits, the file type as single high bits). This module
//! converts between the two. Reference: Go `io/fs.FileMode` and
//! `tonistiigi/fsutil` `stat.go` (which stores `uint32(fi.Mode())`).

/// Go `fs.ModeDir`.
pub const MODE_DIR: u32 = 1 << 31;
/// Go `fs.ModeAppend` (never produced on Linux).
pub const MODE_APPEND: u32 = 1 << 30;
/// Go `fs.ModeExclusive` (never produced on Linux).
pub const MODE_EXCLUSIVE: u32 = 1 << 29;
/// Go `fs.ModeTemporary` (never produced on Linux).
pub const MODE_TEMPORARY: u32 = 1 << 28;
/// Go `fs.ModeSymlink`.
pub const MODE_SYMLINK: u32 = 1 << 27;
/// Go `fs.ModeDevice` (block device; with [`MODE_CHAR_DEVICE`] a character device).
pub const MODE_DEVICE: u32 = 1 << 26;
/// Go `fs.ModeNamedPipe`.
pub const MODE_NAMED_PIPE: u32 = 1 << 25;
/// Go `fs.ModeSocket`.
pub const MODE_SOCKET: u32 = 1 << 24;
/// Go `fs.ModeSetuid`.
pub const MODE_SETUID: u32 = 1 << 23;
/// Go `fs.ModeSetgid`.
pub const MODE_SETGID: u32 = 1 << 22;
/// Go `fs.ModeCharDevice` (set together with [`MODE_DEVICE`]).
pub const MODE_CHAR_DEVICE: u32 = 1 << 21;
/// Go `fs.ModeSticky`.
pub const MODE_STICKY: u32 = 1 << 20;
/// Go `fs.ModeIrregular`.
pub const MODE_IRREGULAR: u32 = 1 << 19;
/// Go `fs.ModeType`: every type bit. A mode without any of them is a regular file.
pub const MODE_TYPE: u32 = MODE_DIR
    | MODE_SYMLINK
    | MODE_NAMED_PIPE
    | MODE_SOCKET
    | MODE_DEVICE
    | MODE_CHAR_DEVICE
    | MODE_IRREGULAR;
/// Go `fs.ModePerm`.
pub const MODE_PERM: u32 = 0o777;

const S_IFMT: u32 = 0o170000;
const S_IFSOCK: u32 = 0o140000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;
const S_IFBLK: u32 = 0o060000;
const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFIFO: u32 = 0o010000;
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;

/// The kind of filesystem entry a Go mode describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Regular file (no type bits).
    Regular,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Block device.
    BlockDevice,
    /// Character device.
    CharDevice,
    /// Named pipe (FIFO).
    NamedPipe,
    /// Unix socket.
    Socket,
    /// Anything else (Go `ModeIrregular`).
    Irregular,
}

/// Converts a POSIX `st_mode` into Go `os.FileMode` bits (what Go's `os.Lstat` reports).
pub fn go_mode_from_posix(st_mode: u32) -> u32 {
    let mut m = st_mode & MODE_PERM;
    match st_mode & S_IFMT {
        S_IFBLK => m |= MODE_DEVICE,
        S_IFCHR => m |= MODE_DEVICE | MODE_CHAR_DEVICE,
        S_IFDIR => m |= MODE_DIR,
        S_IFIFO => m |= MODE_NAMED_PIPE,
        S_IFLNK => m |= MODE_SYMLINK,
        S_IFREG => {}
        S_IFSOCK => m |= MODE_SOCKET,
        _ => m |= MODE_IRREGULAR,
    }
    if st_mode & S_ISGID != 0 {
        m |= MODE_SETGID;
    }
    if st_mode & S_ISUID != 0 {
        m |= MODE_SETUID;
    }
    if st_mode & S_ISVTX != 0 {
        m |= MODE_STICKY;
    }
    m
}

/// Converts Go `os.FileMode` bits into a POSIX `st_mode` (type and permission bits).
///
/// `ModeIrregular` has no POSIX equivalent; it maps to a regular file type.
pub fn posix_from_go_mode(go: u32) -> u32 {
    let mut m = go & MODE_PERM;
    m |= match kind(go) {
        FileKind::Regular | FileKind::Irregular => S_IFREG,
        FileKind::Dir => S_IFDIR,
        FileKind::Symlink => S_IFLNK,
        FileKind::BlockDevice => S_IFBLK,
        FileKind::CharDevice => S_IFCHR,
        FileKind::NamedPipe => S_IFIFO,
        FileKind::Socket => S_IFSOCK,
    };
    if go & MODE_SETUID != 0 {
        m |= S_ISUID;
    }
    if go & MODE_SETGID != 0 {
        m |= S_ISGID;
    }
    if go & MODE_STICKY != 0 {
        m |= S_ISVTX;
    }
    m
}

/// The permission bits plus setuid/setgid/sticky in POSIX form (what `chmod` takes).
pub fn posix_perm_from_go_mode(go: u32) -> u32 {
    posix_from_go_mode(go) & 0o7777
}

/// The entry kind of a Go mode.
pub fn kind(go: u32) -> FileKind {
    if go & MODE_DIR != 0 {
        FileKind::Dir
    } else if go & MODE_SYMLINK != 0 {
        FileKind::Symlink
    } else if go & MODE_DEVICE != 0 {
        if go & MODE_CHAR_DEVICE != 0 {
            FileKind::CharDevice
        } else {
            FileKind::BlockDevice
        }
    } else if go & MODE_CHAR_DEVICE != 0 {
        FileKind::CharDevice
    } else if go & MODE_NAMED_PIPE != 0 {
        FileKind::NamedPipe
    } else if go & MODE_SOCKET != 0 {
        FileKind::Socket
    } else if go & MODE_IRREGULAR != 0 {
        FileKind::Irregular
    } else {
        FileKind::Regular
    }
}

/// Whether the receiver may request data for an entry with this mode (no type bits set).
///
/// This must agree between sender and receiver: it decides which entries are numbered as requestable.
pub fn can_request_data(go: u32) -> bool {
    go & MODE_TYPE == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_to_go_table() {
        // (st_mode, Go FileMode) pairs as Go's os.Lstat reports them.
        let table: &[(u32, u32)] = &[
            (0o100644, 0o644),
            (0o100755, 0o755),
            (0o040755, MODE_DIR | 0o755),
            (0o120777, MODE_SYMLINK | 0o777),
            (0o104755, MODE_SETUID | 0o755),
            (0o102755, MODE_SETGID | 0o755),
            (0o041777, MODE_DIR | MODE_STICKY | 0o777),
            (0o020666, MODE_DEVICE | MODE_CHAR_DEVICE | 0o666),
            (0o060660, MODE_DEVICE | 0o660),
            (0o010644, MODE_NAMED_PIPE | 0o644),
            (0o140755, MODE_SOCKET | 0o755),
        ];
        for &(posix, go) in table {
            assert_eq!(go_mode_from_posix(posix), go, "posix {posix:o}");
            assert_eq!(posix_from_go_mode(go), posix, "go {go:#x}");
        }
    }

    #[test]
    fn known_go_values() {
        // Values printed by Go: uint32(os.ModeDir|0755) == 2147484141.
        assert_eq!(MODE_DIR | 0o755, 2_147_484_141);
        assert_eq!(MODE_SYMLINK | 0o777, 134_218_239);
        assert_eq!(
            posix_perm_from_go_mode(MODE_DIR | MODE_STICKY | 0o1777),
            0o1777
        );
    }

    #[test]
    fn kinds_and_requestable() {
        let table: &[(u32, FileKind, bool)] = &[
            (0o644, FileKind::Regular, true),
            (MODE_SETUID | 0o755, FileKind::Regular, true),
            (MODE_DIR | 0o755, FileKind::Dir, false),
            (MODE_SYMLINK | 0o777, FileKind::Symlink, false),
            (MODE_DEVICE | 0o600, FileKind::BlockDevice, false),
            (
                MODE_DEVICE | MODE_CHAR_DEVICE | 0o600,
                FileKind::CharDevice,
                false,
            ),
            (MODE_NAMED_PIPE | 0o600, FileKind::NamedPipe, false),
            (MODE_SOCKET | 0o600, FileKind::Socket, false),
            (MODE_IRREGULAR, FileKind::Irregular, false),
        ];
        for &(m, k, req) in table {
            assert_eq!(kind(m), k, "mode {m:#x}");
            assert_eq!(can_request_data(m), req, "mode {m:#x}");
        }
    }
}
