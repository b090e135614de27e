//! Embeds libtorch's library directory as an rpath, so the binaries find libtorch at run time without
//! LD_LIBRARY_PATH. The path is absolute, so a binary copied elsewhere (`cargo install`) keeps working
//! as long as the libtorch it was built against stays where it is. Links are kept as they are: with the
//! default set-up the rpath names `.venv/libtorch/lib`, which stays valid when the set-up is redone.
//! A second entry names the directory of the PyTorch wheel's NCCL (see `nccl.rs`).
//!
//! Compiles `csrc/` (synchronised BatchNorm as a libtorch autograd function, which tch cannot define;
//! the autocast, TF32 and memory-format switches and the gradient hooks tch does not expose) against
//! the headers of the same libtorch, with the flags torch-sys uses for its own C++.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports libtorch's lib directory");
    let lib = std::path::absolute(&lib).unwrap_or_else(|_| lib.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // NCCL from PyTorch's wheel (site-packages/nvidia/nccl/lib beside site-packages/torch), which
    // the worker loads at run time for --collective nccl; scripts/setup.sh links libnccl.so there.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.join("../../nvidia/nccl/lib").display());
    let include = lib.join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/sync_batch_norm.cpp")
        .file("csrc/numerics.cpp")
        .file("csrc/grad_hooks.cpp")
        .compile("simclr_csrc");
}
