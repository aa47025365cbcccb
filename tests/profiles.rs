//! Every shipped example profile loads, and fits the example host it was written for.

mod fixture;

use std::path::Path;

#[test]
fn every_shipped_profile_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            pvetune::profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 4, "only {count} profiles in {}", dir.display());
}

#[test]
fn shipped_profiles_fit_their_example_hosts() {
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    for (profile, host, vmid) in [
        ("gaming-smt.yaml", "ryzen-5900x", "100"),
        ("database-numa.yaml", "xeon-2s", "200"),
        ("explicit-map.yaml", "guest-nocpufreq", "400"),
        ("minimal.yaml", "guest-nocpufreq", "400"),
        // The portable profile on three different CPUs.
        ("portable.yaml", "ryzen-5900x", "100"),
        ("portable.yaml", "intel-hybrid", "300"),
        ("portable.yaml", "xeon-2s", "200"),
    ] {
        let path = profiles.join(profile);
        let out = fixture::pvetune(
            &fixture::example_host(host),
            &["--profile", path.to_str().unwrap(), "check", vmid],
        );
        assert!(
            out.status.success(),
            "{profile} on {host}: {}",
            fixture::stderr(&out)
        );
        assert!(fixture::stdout(&out).contains("is valid on this host"));
    }
}
