//! Generates the gRPC types from `proto/registry/v1/registry.proto` and
//! `proto/registry/admin/v1/admin.proto` with a vendored `protoc`, so
//! `cargo build` needs nothing installed. One descriptor set holds both, for
//! server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/registry/v1/registry.proto",
        "proto/registry/admin/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::RegistryCodec")
        .file_descriptor_set_path(out_dir.join("registry_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
