//! Keeps `src/generated/` in step with `relay/v1/relay.proto`: regenerates the code and the
//! descriptor set into a temporary directory and compares them byte for byte with the committed
//! copies. With `HOMERELAY_REGENERATE_PROTO=1` it rewrites the committed copies instead.
//!
//! Needs `protoc` (Debian's `protobuf-compiler` with `libprotobuf-dev` for the well-known types,
//! installed by `scripts/bootstrap.sh`); without it the test fails and says so.
use std::path::{Path, PathBuf};

const GENERATED: [&str; 2] = ["relay.v1.rs", "relay_v1_descriptor.bin"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the code generator with the settings the committed code was made with.
fn generate(out: &Path) {
    let dir = crate_dir();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .file_descriptor_set_path(out.join("relay_v1_descriptor.bin"))
        .compile_protos(&[dir.join(proto::PROTO_FILE)], &[dir])
        .unwrap_or_else(|e| {
            panic!("code generation failed (is protoc installed? run scripts/bootstrap.sh): {e}")
        });
}

#[test]
fn generated_code_matches_the_proto_file() {
    let committed = crate_dir().join("src/generated");
    if std::env::var_os("HOMERELAY_REGENERATE_PROTO").is_some() {
        generate(&committed);
        return;
    }
    let tmp = std::env::temp_dir().join(format!("homerelay-proto-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("create a temporary directory");
    generate(&tmp);
    let mut drifted = Vec::new();
    for name in GENERATED {
        let fresh = std::fs::read(tmp.join(name)).expect("read the regenerated file");
        let old = std::fs::read(committed.join(name)).unwrap_or_default();
        if fresh != old {
            drifted.push(name);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        drifted.is_empty(),
        "src/generated/{drifted:?} differ from what relay/v1/relay.proto generates: run \
         `HOMERELAY_REGENERATE_PROTO=1 cargo test -p proto --test codegen` and commit the result"
    );
}

#[test]
fn descriptor_set_describes_the_service_with_its_comments() {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
        .expect("the committed descriptor set decodes");
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "relay.v1")
        .expect("relay.v1 is in the set");
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "ChannelService")
        .expect("ChannelService is described");
    let rpcs: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        rpcs,
        [
            "Allocate",
            "Update",
            "Release",
            "Get",
            "List",
            "Watch",
            "PoolStatus"
        ]
    );
    // The imports travel with it, so reflection clients can resolve Duration and Timestamp.
    for dep in [
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
    ] {
        assert!(set.file.iter().any(|f| f.name() == dep), "{dep} missing");
    }
    assert!(
        file.source_code_info.is_some(),
        "source comments are kept for reflection clients"
    );
}

/// Every service, rpc, message, field and enum value carries a doc comment.
#[test]
fn every_element_of_the_proto_is_documented() {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("decode");
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "relay.v1")
        .expect("relay.v1");
    let info = file.source_code_info.as_ref().expect("source info");
    let documented = |path: &[i32]| {
        info.location
            .iter()
            .any(|l| l.path == path && !l.leading_comments().trim().is_empty())
    };
    // Field numbers of FileDescriptorProto / DescriptorProto / ... (descriptor.proto).
    const MESSAGE: i32 = 4;
    const ENUM: i32 = 5;
    const SERVICE: i32 = 6;
    const FIELD: i32 = 2;
    const NESTED_ENUM_VALUE: i32 = 2;
    const METHOD: i32 = 2;
    let mut missing = Vec::new();
    for (i, m) in file.message_type.iter().enumerate() {
        let p = [MESSAGE, i as i32];
        if !documented(&p) {
            missing.push(m.name().to_owned());
        }
        for (j, f) in m.field.iter().enumerate() {
            if !documented(&[MESSAGE, i as i32, FIELD, j as i32]) {
                missing.push(format!("{}.{}", m.name(), f.name()));
            }
        }
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        if !documented(&[ENUM, i as i32]) {
            missing.push(e.name().to_owned());
        }
        for (j, v) in e.value.iter().enumerate() {
            if !documented(&[ENUM, i as i32, NESTED_ENUM_VALUE, j as i32]) {
                missing.push(v.name().to_owned());
            }
        }
    }
    for (i, s) in file.service.iter().enumerate() {
        if !documented(&[SERVICE, i as i32]) {
            missing.push(s.name().to_owned());
        }
        for (j, m) in s.method.iter().enumerate() {
            if !documented(&[SERVICE, i as i32, METHOD, j as i32]) {
                missing.push(format!("{}.{}", s.name(), m.name()));
            }
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}
