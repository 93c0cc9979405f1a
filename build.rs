//! Generates the gRPC types from `proto/registry/v1/registry.proto` and
//! `proto/registry/admin/v1/admin.proto` with a vendored `protoc`, so
//! `cargo build` needs nothing installed. One descriptor set holds both, for
//! server reflection. The etcd client (`proto/etcd/etcd.proto`, the subset
//! of etcd's API the replicas use) is generated the same way.

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
    // Messages and clients; the servers are generated below.
    tonic_prost_build::configure()
        .build_server(false)
        .codec_path("crate::codec::RegistryCodec")
        .file_descriptor_set_path(out_dir.join("registry_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    // The servers, over the messages above, in a directory of their own
    // (the files are named by package). The server sends `WatchExecutors`
    // messages as `server::wire::WatchMessage`: the same wire message, whose
    // snapshot chunks are encoded straight from the registry's entries.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let servers = out_dir.join("servers");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&servers)
        .extern_path(".registry.v1", "crate::proto")
        .extern_path(".registry.admin.v1", "crate::proto::admin")
        .extern_path(
            ".registry.v1.WatchExecutorsResponse",
            "crate::server::wire::WatchMessage",
        )
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::RegistryCodec")
        .compile_with_config(config, &protos, &["proto"])?;

    let etcd = "proto/etcd/etcd.proto";
    println!("cargo:rerun-if-changed={etcd}");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &[etcd], &["proto"])?;
    Ok(())
}
