fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/raftmap.proto");
    tonic_prost_build::configure().compile_protos(&["proto/raftmap.proto"], &["proto"])?;
    Ok(())
}
