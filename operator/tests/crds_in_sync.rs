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

#[test]
fn helm_chart_ships_the_same_crds() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let crds = std::fs::read_to_string(format!("{root}/crds/granary.dev.yaml")).unwrap();
    let chart = std::fs::read_to_string(format!("{root}/helm/granary/crds/granary.dev.yaml"))
        .expect("helm/granary/crds/granary.dev.yaml exists");
    assert!(
        crds == chart,
        "helm/granary/crds is stale: cp crds/granary.dev.yaml helm/granary/crds/"
    );
}

#[test]
fn chart_version_follows_the_crate_version() {
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/granary/Chart.yaml"
    ))
    .unwrap();
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        chart.lines().any(|l| l.trim() == format!("version: {v}")),
        "Chart.yaml version must be {v}"
    );
    assert!(
        chart
            .lines()
            .any(|l| l.trim().trim_matches('"') == format!("appVersion: {v}")
                || l.trim() == format!("appVersion: \"{v}\"")),
        "Chart.yaml appVersion must be {v}"
    );
}
