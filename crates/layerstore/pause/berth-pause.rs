//! berth's pin process: the only program of a `berth-pin-*` container (see
//! `src/dockerstore/pin.rs`). It keeps the container running, and so the container's image in
//! use, while costing nothing: one sleeping process with no memory of its own beyond its stack.
//!
//! It blocks SIGINT, SIGTERM and SIGCHLD and waits for them synchronously (`rt_sigtimedwait`):
//! no signal handler, so no restorer trampoline, and blocked signals are delivered even to a
//! PID-namespace init, which ignores unhandled ones. SIGINT/SIGTERM end it at once with exit code
//! 128 + signal (`docker stop` returns immediately); SIGCHLD reaps whatever was re-parented to
//! it. It sleeps in the kernel otherwise: no timer, no polling, no CPU.
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

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const RT_SIGPROCMASK: usize = 14;
    pub const RT_SIGTIMEDWAIT: usize = 128;
    pub const WAIT4: usize = 61;
    pub const EXIT_GROUP: usize = 231;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const RT_SIGPROCMASK: usize = 135;
    pub const RT_SIGTIMEDWAIT: usize = 137;
    pub const WAIT4: usize = 260;
    pub const EXIT_GROUP: usize = 94;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("berth's pin process supports x86_64 and aarch64 only");

/// A raw Linux syscall with up to four arguments; returns the kernel's result (`-errno` on error).
#[cfg(target_arch = "x86_64")]
fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    // SAFETY: the syscalls made here only read the signal set passed by pointer (a live local)
    // and write nothing to memory (wait4 gets NULL status and rusage pointers).
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

extern "C" fn main() -> ! {
    let set: u64 = bit(SIGINT) | bit(SIGTERM) | bit(SIGCHLD);
    let set_ptr = &set as *const u64 as usize;
    syscall4(nr::RT_SIGPROCMASK, SIG_BLOCK, set_ptr, 0, SIGSET_SIZE);
    loop {
        let sig = syscall4(nr::RT_SIGTIMEDWAIT, set_ptr, 0, 0, SIGSET_SIZE);
        if sig == SIGCHLD as isize {
            while syscall4(nr::WAIT4, usize::MAX, 0, WNOHANG, 0) > 0 {}
        } else if sig > 0 {
            syscall4(nr::EXIT_GROUP, 128 + sig as usize, 0, 0, 0);
        }
        // Negative: EINTR (a stop/continue); wait again.
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    syscall4(nr::EXIT_GROUP, 127, 0, 0, 0);
    loop {}
}
