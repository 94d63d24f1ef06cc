//! Compiles the BPF programs in `bpf/` with clang into `OUT_DIR`, to be embedded in the binary.

#![allow(clippy::expect_used)] // a build script reports failure by panicking

use std::path::PathBuf;
use std::process::Command;

fn clang() -> String {
    if let Ok(c) = std::env::var("CLANG") {
        return c;
    }
    for c in ["clang-19", "clang"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!(
        "clang not found: install clang-19 and libbpf-dev (scripts/install-deps.sh), or set CLANG"
    );
}

/// Every program in `bpf/`, by file stem.
const PROGRAMS: &[&str] = &["conntrack", "capture_syscall", "capture_fexit"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = clang();
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=bpf/raftmap.h");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for name in PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args([
                "-target",
                "bpf",
                "-O2",
                // Atomic exchange (the reader's wakeup flag): ISA v3, kernels 5.12 and later.
                "-mcpu=v3",
                "-g",
                "-Wall",
                "-Werror",
                "-D__TARGET_ARCH_x86",
                "-c",
            ])
            .arg(format!("-I{arch_include}"))
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("running {clang}: {e}"));
        assert!(status.success(), "{clang} failed to compile {src}");
    }
}
