//! `crds/granary.dev.yaml` must be exactly what the Rust types generate.
//! Regenerate with: `cargo run -p granary-operator -- crd > crds/granary.dev.yaml`.

#[test]
fn checked_in_crds_match_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/granary.dev.yaml");
    let on_disk = std::fs::read_to_string(path).expect("crds/granary.dev.yaml exists");
    let generated = granary_operator::crd::crds_yaml().unwrap();
    assert!(
        on_disk == generated,
        "crds/granary.dev.yaml is stale: run `cargo run -p granary-operator -- crd > crds/granary.dev.yaml`"
    );
}
