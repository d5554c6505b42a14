//! Generates the gRPC code from `proto/mesh.proto` with the vendored protoc.
//!
//! protoc is handed to prost-build here and nowhere else: exporting `PROTOC`
//! for the whole build would also reach raft's own build script, which
//! rejects a protoc that is not 3.x (see DEPENDENCIES.md).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/mesh.proto");
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Golden-signal edges are map keys and sorted for stable tables.
        .type_attribute("trellis.v1.EdgeKey", "#[derive(PartialOrd, Ord)]")
        .bytes(".trellis.v1.WatchEvent.value_json")
        // Smaller encode buffers: a server holds one per watching proxy.
        .codec_path("crate::codec::TrellisCodec")
        .compile_with_config(cfg, &["proto/mesh.proto"], &["proto"])?;
    Ok(())
}
