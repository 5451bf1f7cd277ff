//! `labvisor-boot`: joins the agent's parts into a memory file and executes it (see the
//! library docs for why, and why this file has neither std nor libc). Every failure is one
//! line on stderr and exit status 125.
//!
//! x86_64 Linux only: `_start` and the system calls are written here.

#![no_std]
#![no_main]
// The entry point, the system calls and the memory functions the compiler calls: no way
// around unsafe code without libc.
#![allow(unsafe_code)]

use core::ffi::CStr;
use core::fmt::{self, Write};

use labvisor_boot::{
    join, parts_dir_of, BootError, Errno, JoinIo, Manifest, ManifestError, PartName, EXIT_FAILURE,
    MANIFEST, MAX_MANIFEST, PARTS_ENV,
};

core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym start,
);

/// The process's start: `sp` points at `argc`, then `argv[..argc]`, NULL, `envp[..]`, NULL.
unsafe extern "C" fn start(sp: *mut usize) -> ! {
    // SAFETY: the kernel lays out the initial stack as described above.
    let (argv, envp) = unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *mut *const u8;
        (argv, argv.add(argc + 1) as *const *const u8)
    };
    // SAFETY: `argv` holds `argc` strings then NULL; an empty argv gives an empty name.
    let argv0 = unsafe {
        if (*argv).is_null() {
            &[][..]
        } else {
            c_bytes(*argv)
        }
    };
    let mut dir_buf = [0u8; 4096];
    // SAFETY: `envp` is the kernel's NULL-terminated array of NUL-terminated strings.
    let dir = unsafe { parts_dir(envp, argv0, &mut dir_buf) };
    // SAFETY: `argv` and `envp` are the kernel's arrays; `dir` is NUL-terminated.
    let err = unsafe { boot(dir, argv, envp) };
    let mut line = Line::default();
    let _ = write!(line, "labvisor-boot: ");
    // SAFETY: `dir` is NUL-terminated.
    line.push(unsafe { c_bytes(dir) });
    let _ = writeln!(line, ": {err}");
    line.print();
    sys::exit(EXIT_FAILURE.into())
}

/// `LABVISOR_BOOT_PARTS` when set and not empty, else `<argv[0]>.parts` (written into
/// `buf`); NUL-terminated.
unsafe fn parts_dir(envp: *const *const u8, argv0: &[u8], buf: &mut [u8; 4096]) -> *const u8 {
    let mut p = envp;
    // SAFETY: (caller) NULL-terminated array of NUL-terminated strings.
    unsafe {
        while !(*p).is_null() {
            let entry = c_bytes(*p);
            if let Some(value) = entry
                .strip_prefix(PARTS_ENV.as_bytes())
                .and_then(|v| v.strip_prefix(b"="))
            {
                if !value.is_empty() {
                    return value.as_ptr();
                }
            }
            p = p.add(1);
        }
    }
    let n = parts_dir_of(argv0, &mut buf[..]);
    buf[n] = 0;
    buf.as_ptr()
}

/// [`MANIFEST`] as the C string the kernel takes.
const MANIFEST_C: &CStr = c"manifest";
const _: () = assert!(same(MANIFEST_C, MANIFEST));

/// `c` without its NUL is `s` (checked at compile time).
const fn same(c: &CStr, s: &str) -> bool {
    let (a, b) = (c.to_bytes(), s.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Joins the parts of `dir` into a memory file and executes it; returns only on failure.
unsafe fn boot(dir: *const u8, argv: *mut *const u8, envp: *const *const u8) -> BootError {
    let dirfd = match sys::openat(sys::AT_FDCWD, dir, sys::O_RDONLY | sys::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(e) => return BootError::NoDir(e),
    };
    let manifest = match read_manifest(dirfd) {
        Ok(m) => m,
        Err(e) => return e,
    };
    // SAFETY: argv[0] (when there is one) is NUL-terminated, and so is its base name.
    let name = unsafe {
        if (*argv).is_null() {
            c"labvisor".as_ptr().cast()
        } else {
            base_name(*argv)
        }
    };
    let memfd = match sys::memfd_create(name) {
        Ok(fd) => fd,
        Err(e) => return BootError::Memfd(e),
    };
    let mut buf = [0u8; 64 * 1024];
    if let Err(e) = join(&mut Fds { dirfd, memfd }, &manifest, &mut buf) {
        return e;
    }
    sys::close(dirfd);
    // The program gets this binary's arguments, its name included.
    BootError::Exec(sys::execveat(memfd, argv, envp))
}

/// The manifest of the directory open at `dirfd`.
fn read_manifest(dirfd: i32) -> Result<Manifest, BootError> {
    let fd = sys::openat(dirfd, MANIFEST_C.as_ptr().cast(), sys::O_RDONLY)
        .map_err(BootError::NoManifest)?;
    let mut buf = [0u8; MAX_MANIFEST + 1];
    let mut len = 0;
    let read = loop {
        match sys::read(fd, &mut buf[len..]) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break Err(BootError::Manifest(ManifestError::Text));
                }
            }
            Err(e) => break Err(BootError::NoManifest(e)),
        }
    };
    sys::close(fd);
    read?;
    Manifest::parse(&buf[..len]).map_err(BootError::Manifest)
}

/// The parts directory and the memory file.
struct Fds {
    dirfd: i32,
    memfd: i32,
}

impl JoinIo for Fds {
    type Part = i32;

    fn open(&mut self, name: &PartName) -> Result<i32, Errno> {
        sys::openat(self.dirfd, name.as_c_bytes().as_ptr(), sys::O_RDONLY)
    }

    fn read(&mut self, part: &mut i32, buf: &mut [u8]) -> Result<usize, Errno> {
        sys::read(*part, buf)
    }

    fn close(&mut self, part: i32) {
        sys::close(part);
    }

    fn write_all(&mut self, mut buf: &[u8]) -> Result<(), Errno> {
        while !buf.is_empty() {
            let n = sys::write(self.memfd, buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }
}

/// The base name of the NUL-terminated path `p` (after its last `/`), NUL-terminated.
unsafe fn base_name(p: *const u8) -> *const u8 {
    // SAFETY: (caller) `p` is NUL-terminated.
    let bytes = unsafe { c_bytes(p) };
    let start = bytes.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
    // SAFETY: `start` is within the string or at its NUL.
    unsafe { p.add(start) }
}

/// The bytes of a NUL-terminated string, without the NUL.
unsafe fn c_bytes<'a>(p: *const u8) -> &'a [u8] {
    let mut n = 0;
    // SAFETY: (caller) `p` is NUL-terminated.
    unsafe {
        while *p.add(n) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

/// One line of stderr, at most 1 KiB (the rest is cut).
struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 1024],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn print(&self) {
        let _ = sys::write(2, &self.buf[..self.len]);
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    let _ = sys::write(2, b"labvisor-boot: internal error\n");
    sys::exit(EXIT_FAILURE.into())
}

/// The system calls (x86_64 Linux), each retried on EINTR where it can be interrupted.
mod sys {
    use core::arch::asm;
    use core::ffi::CStr;

    use labvisor_boot::Errno;

    pub const AT_FDCWD: i32 = -100;
    pub const O_RDONLY: i32 = 0;
    pub const O_DIRECTORY: i32 = 0o200000;
    const O_CLOEXEC: i32 = 0o2000000;
    const MFD_CLOEXEC: usize = 1;
    const AT_EMPTY_PATH: usize = 0x1000;
    const EINTR: i32 = 4;

    unsafe fn syscall(n: usize, a: [usize; 5]) -> isize {
        let ret: isize;
        // SAFETY: (caller) the arguments are valid for system call `n`.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a[0],
                in("rsi") a[1],
                in("rdx") a[2],
                in("r10") a[3],
                in("r8") a[4],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    fn result(ret: isize) -> Result<usize, Errno> {
        if (-4095..0).contains(&ret) {
            Err(Errno(-ret as i32))
        } else {
            Ok(ret as usize)
        }
    }

    fn retry(mut f: impl FnMut() -> isize) -> Result<usize, Errno> {
        loop {
            match result(f()) {
                Err(Errno(EINTR)) => continue,
                r => return r,
            }
        }
    }

    /// `openat(dirfd, path, flags | O_CLOEXEC)`; `path` NUL-terminated.
    pub fn openat(dirfd: i32, path: *const u8, flags: i32) -> Result<i32, Errno> {
        // SAFETY: `path` is NUL-terminated (every caller passes a literal or a kernel string).
        retry(|| unsafe {
            syscall(
                257,
                [
                    dirfd as usize,
                    path as usize,
                    (flags | O_CLOEXEC) as usize,
                    0,
                    0,
                ],
            )
        })
        .map(|fd| fd as i32)
    }

    pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        retry(|| unsafe { syscall(0, [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0]) })
    }

    pub fn write(fd: i32, buf: &[u8]) -> Result<usize, Errno> {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        retry(|| unsafe { syscall(1, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0]) })
    }

    pub fn close(fd: i32) {
        // SAFETY: closing a descriptor this binary opened.
        unsafe { syscall(3, [fd as usize, 0, 0, 0, 0]) };
    }

    /// `memfd_create(name, MFD_CLOEXEC)`.
    /// `name` NUL-terminated.
    pub fn memfd_create(name: *const u8) -> Result<i32, Errno> {
        // SAFETY: `name` is NUL-terminated (caller).
        result(unsafe { syscall(319, [name as usize, MFD_CLOEXEC, 0, 0, 0]) }).map(|fd| fd as i32)
    }

    /// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes the file open at `fd`; returns
    /// only its error. `fd` may be close-on-exec: the kernel holds the file for the new
    /// program before it closes it.
    pub fn execveat(fd: i32, argv: *const *const u8, envp: *const *const u8) -> Errno {
        let path = c"".as_ptr();
        // SAFETY: `path` is NUL-terminated, `argv` and `envp` NULL-terminated arrays of
        // NUL-terminated strings.
        let ret = unsafe {
            syscall(
                322,
                [
                    fd as usize,
                    path as usize,
                    argv as usize,
                    envp as usize,
                    AT_EMPTY_PATH,
                ],
            )
        };
        result(ret).err().unwrap_or(Errno(0))
    }

    pub fn exit(code: i32) -> ! {
        // SAFETY: exit_group does not return.
        unsafe {
            asm!("syscall", in("rax") 231, in("rdi") code as isize, options(noreturn, nostack));
        }
    }
}

// The memory functions the compiler may call (there is no libc). `rep movsb`/`rep stosb`, so
// the compiler cannot turn them back into calls to themselves.

/// `memcpy`.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: (caller) non-overlapping regions of `n` bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`: backwards when `dst` lies after `src` inside it.
#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: (caller) regions of `n` bytes; a forward copy is safe here.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: (caller) regions of `n` bytes; copied from the end, direction flag restored.
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            options(nostack),
        );
    }
    dst
}

/// `memset`.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: (caller) a region of `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: (caller) regions of `n` bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`.
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: (caller) regions of `n` bytes.
    unsafe { memcmp(a, b, n) }
}

/// `strlen` (`repne scasb`).
#[no_mangle]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let rest: usize;
    // SAFETY: (caller) `s` is NUL-terminated; the direction flag is clear.
    unsafe {
        core::arch::asm!(
            "repne scasb",
            inout("rcx") usize::MAX => rest,
            inout("rdi") s => _,
            in("al") 0u8,
            options(nostack, readonly),
        );
    }
    // rcx went down once per byte, the NUL included.
    !rest - 1
}
