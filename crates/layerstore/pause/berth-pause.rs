//! berth's pin process: the only program of a `berth-pin-*` container (see
//! `src/dockerstore/pin.rs`). It keeps the container running, and so the container's image in
//! use, while costing nothing: one sleeping process with no memory of its own beyond its stack.
//!
//! It lives exactly as long as two things allow:
//! * **Its stdin**, which berthd holds open through an attach to the container (the container is
//!   created with `OpenStdin` and `StdinOnce`): when the attach ends, dockerd closes the
//!   container's stdin, and end-of-file on it ends the process with exit code 0. So a berthd
//!   that is killed (SIGKILL, a crash: the kernel closes its connection to dockerd) takes its
//!   pins with it without doing anything, and the container, created with `AutoRemove`, goes
//!   too. Bytes on stdin are read and ignored.
//! * **SIGINT/SIGTERM**: they end it at once with exit code 128 + signal (`docker stop` returns
//!   immediately). SIGCHLD reaps whatever was re-parented to it.
//!
//! The signals are blocked and read from a `signalfd` (no signal handler, so no restorer
//! trampoline; blocked signals reach even a PID-namespace init, which ignores unhandled ones),
//! and one `ppoll` waits on both descriptors: it sleeps in the kernel, no timer, no polling, no
//! CPU.
//!
//! `#![no_std]`, `#![no_main]`, raw syscalls: a static ELF of about a kilobyte that needs nothing
//! from the image (it runs in `scratch`-like images) and nothing but rustc and the target's
//! linker driver to build (`build.rs`); neither a musl target nor static C libraries are assumed.
#![no_std]
#![no_main]

use core::arch::{asm, naked_asm};

const SIGINT: usize = 2;
const SIGTERM: usize = 15;
const SIGCHLD: usize = 17;
const SIG_BLOCK: usize = 0;
const WNOHANG: usize = 1;
/// `sizeof(kernel_sigset_t)` on Linux.
const SIGSET_SIZE: usize = 8;

/// `POLLIN`, `POLLERR`, `POLLHUP`, `POLLNVAL` (`poll(2)`).
const POLLIN: i16 = 0x1;
const POLLERR: i16 = 0x8;
const POLLHUP: i16 = 0x10;
const POLLNVAL: i16 = 0x20;
/// `-EINTR`, `-EAGAIN`.
const EINTR: isize = -4;
const EAGAIN: isize = -11;
/// `sizeof(struct signalfd_siginfo)`.
const SIGINFO_SIZE: usize = 128;

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const READ: usize = 0;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const WAIT4: usize = 61;
    pub const EXIT_GROUP: usize = 231;
    pub const PPOLL: usize = 271;
    pub const SIGNALFD4: usize = 289;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const READ: usize = 63;
    pub const RT_SIGPROCMASK: usize = 135;
    pub const WAIT4: usize = 260;
    pub const EXIT_GROUP: usize = 94;
    pub const PPOLL: usize = 73;
    pub const SIGNALFD4: usize = 74;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("berth's pin process supports x86_64 and aarch64 only");

/// A raw Linux syscall with up to four arguments; returns the kernel's result (`-errno` on error).
#[cfg(target_arch = "x86_64")]
fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    // SAFETY: the syscalls made here read the signal set and the poll array and write the poll
    // array's `revents` and read buffers, all live locals of `main` whose sizes are passed
    // along; wait4 gets NULL status and rusage pointers. No `nomem`: the compiler assumes memory
    // is read and written.
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a, in("rsi") b,
             in("rdx") c, in("r10") d, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

#[cfg(target_arch = "aarch64")]
fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    // SAFETY: as on x86_64.
    unsafe {
        asm!("svc 0", in("x8") n, inlateout("x0") a as isize => r, in("x1") b, in("x2") c,
             in("x3") d, options(nostack));
    }
    r
}

/// Entry point: aligns the stack as a call expects and enters `main`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn _start() -> ! {
    naked_asm!("xor ebp, ebp", "and rsp, -16", "call {main}", "ud2", main = sym main)
}

#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn _start() -> ! {
    naked_asm!("mov x29, xzr", "mov x30, xzr", "bl {main}", "brk #0", main = sym main)
}

const fn bit(sig: usize) -> u64 {
    1u64 << (sig - 1)
}

/// One entry of `ppoll`'s array (`struct pollfd`).
#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

fn exit(code: usize) -> ! {
    syscall4(nr::EXIT_GROUP, code, 0, 0, 0);
    loop {}
}

extern "C" fn main() -> ! {
    let set: u64 = bit(SIGINT) | bit(SIGTERM) | bit(SIGCHLD);
    let set_ptr = &set as *const u64 as usize;
    syscall4(nr::RT_SIGPROCMASK, SIG_BLOCK, set_ptr, 0, SIGSET_SIZE);
    let sfd = syscall4(nr::SIGNALFD4, usize::MAX, set_ptr, SIGSET_SIZE, 0);
    if sfd < 0 {
        exit(126);
    }
    let mut fds = [
        PollFd {
            fd: 0,
            events: POLLIN,
            revents: 0,
        },
        PollFd {
            fd: sfd as i32,
            events: POLLIN,
            revents: 0,
        },
    ];
    let mut buf = [0u8; SIGINFO_SIZE];
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        let n = syscall4(nr::PPOLL, fds.as_mut_ptr() as usize, 2, 0, 0);
        if n < 0 {
            // EINTR (a stop/continue): wait again; anything else cannot get better.
            if n == EINTR {
                continue;
            }
            exit(125);
        }
        if fds[1].revents & POLLIN != 0 {
            let r = syscall4(nr::READ, sfd as usize, buf.as_mut_ptr() as usize, SIGINFO_SIZE, 0);
            if r == SIGINFO_SIZE as isize {
                // `ssi_signo`, the first field.
                let sig = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if sig == SIGCHLD {
                    while syscall4(nr::WAIT4, usize::MAX, 0, WNOHANG, 0) > 0 {}
                } else {
                    exit(128 + sig);
                }
            }
        }
        if fds[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL) != 0 {
            let r = syscall4(nr::READ, 0, buf.as_mut_ptr() as usize, buf.len(), 0);
            // 0: end of file (berthd's attach ended); an error other than a retry: no stdin.
            if r == 0 || (r < 0 && r != EINTR && r != EAGAIN) {
                exit(0);
            }
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(127)
}
