//! Embeds libtorch's library directory as an rpath, so the binaries find libtorch at run time without
//! LD_LIBRARY_PATH. The path is absolute, so a binary copied elsewhere (`cargo install`) keeps working
//! as long as the libtorch it was built against stays where it is. Links are kept as they are: with the
//! default set-up the rpath names `.venv/libtorch/lib`, which stays valid when the set-up is redone.
//! A second entry names the directory of the PyTorch wheel's NCCL (see `nccl.rs`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::path::absolute(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // NCCL from PyTorch's wheel (site-packages/nvidia/nccl/lib beside site-packages/torch), which
        // the worker loads at run time for --collective nccl; scripts/setup.sh links libnccl.so there.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.join("../../nvidia/nccl/lib").display());
    }
}
