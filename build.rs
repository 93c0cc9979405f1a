//! Generates the gRPC types from `proto/registry/v1/registry.proto`, and the
//! etcd client (`proto/etcd/etcd.proto`, the subset of etcd's API the
//! replicas use), with a vendored `protoc`, so `cargo build` needs nothing
//! installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/registry/v1/registry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::RegistryCodec")
        .file_descriptor_set_path(out_dir.join("registry_descriptor.bin"))
        .compile_with_config(config, &[proto], &["proto"])?;

    let etcd = "proto/etcd/etcd.proto";
    println!("cargo:rerun-if-changed={etcd}");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &[etcd], &["proto"])?;
    Ok(())
}
