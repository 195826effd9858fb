//! Compiles the C++ shim (csrc/fused_adamw.cpp: the fused AdamW kernels, ATen's `_fused_adamw_`, the gradient
//! sums of squares, dropping gradients, the per-thread thread limit; reached through src/shim.rs) against the
//! headers of the libtorch that torch-sys links. Without those headers the shim is left out (cfg
//! `gainguard_fused_shim` unset): the fused step falls back to the reference path, the gradient check to
//! libtorch norms, and `zero_grad` zeroes gradients instead of dropping them.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-check-cfg=cfg(gainguard_fused_shim)");

    // torch-sys (`links = "tch"`) exports the lib dir it linked; LIBTORCH is the project's setting.
    let lib_dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LIBTORCH").map(|p| PathBuf::from(p).join("lib")));
    let Some(lib_dir) = lib_dir else {
        println!("cargo:warning=gainguard: neither DEP_TCH_LIBTORCH_LIB nor LIBTORCH is set; the fused AdamW step is disabled");
        return;
    };
    let include = lib_dir.parent().map(|p| p.join("include")).unwrap_or_default();
    if !include.join("ATen/ops/_fused_adamw.h").exists() {
        println!(
            "cargo:warning=gainguard: {} has no ATen/ops/_fused_adamw.h; the fused AdamW step is disabled",
            include.display()
        );
        return;
    }

    cc::Build::new()
        .cpp(true)
        .file("csrc/fused_adamw.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // The PyPI wheels (2.11) are built with the new libstdc++ ABI: torch._C._GLIBCXX_USE_CXX11_ABI == True.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .opt_level(3)
        // Vectorizes std::sqrt (results unchanged: errno is never read) and keeps a·b + c from becoming
        // an FMA, whose single rounding departs from the reference path (libtorch rounds a·b, then adds).
        .flag("-fno-math-errno")
        .flag("-ffp-contract=off")
        // at::parallel_for is an inline template whose `#pragma omp parallel` (ATen/ParallelOpenMP.h) is
        // compiled into this object: without -fopenmp it silently runs on one thread.
        .flag("-fopenmp")
        .warnings(false)
        .extra_warnings(false)
        .compile("gainguard_fused_adamw");

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // The OpenMP runtime libtorch itself uses, so that the shim and ATen share one thread pool: the wheel's
    // torch/lib/libgomp.so.1 (no unversioned libgomp.so beside it), or the hashed libgomp-<hash>.so.1 of
    // the libtorch zip distributions; the system's libgomp only when libtorch ships none.
    let bundled = std::fs::read_dir(&lib_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
        .min_by_key(|n| n.len());
    match bundled {
        Some(name) => println!("cargo:rustc-link-lib=dylib:+verbatim={name}"),
        None => println!("cargo:rustc-link-lib=dylib=gomp"),
    }
    println!("cargo:rustc-cfg=gainguard_fused_shim");
}
