//! Compiles `cluster/v1/*.proto` into OUT_DIR with a protoc shipped by the protoc-bin-vendored crate,
//! so that no system protobuf compiler is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let protos = ["cluster/v1/coordinator.proto", "cluster/v1/worker.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // Collective payloads decode as `Bytes` (reference-counted slices of the receive buffer, no copy).
        .bytes(".simclr.cluster.v1.TransferChunk.data")
        .compile_protos(&protos, &["."])?;
    // TensorBoard's event records (messages only).
    println!("cargo:rerun-if-changed=tensorboard/event.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["tensorboard/event.proto"], &["."])?;
    Ok(())
}
