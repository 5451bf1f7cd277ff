//! Link flags of the `no_std` boot binary (feature `static`, built by `cargo static-boot`): no C
//! start files, no libc, a static executable at a fixed address.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_STATIC").is_some() {
        for arg in [
            "-nostartfiles",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}
