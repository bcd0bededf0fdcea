//! The fuzz targets' functions (`relay_sidecar::fuzzing`, run by cargo-fuzz
//! from `fuzz/` on nightly) over their seed corpus, on stable Rust, so the
//! seeds keep passing and the HPACK bomb stays among them. Seeds come from
//! `fuzz/make-seeds`; inputs the fuzzer finds go to `fuzz/corpus/`, and
//! those are run too when present.

mod support;

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = support::repo_root().join("fuzz");
    let mut all = Vec::new();
    for dir in ["seeds", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            all.push((name(&path), std::fs::read(&path).unwrap()));
        }
    }
    all
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn the_authority_seeds_pass_and_include_an_hpack_bomb() {
    let seeds = inputs("authority");
    assert!(
        seeds.iter().any(|(name, _)| name == "hpack-bomb"),
        "fuzz/seeds/authority/hpack-bomb is missing: run fuzz/make-seeds"
    );
    for (name, data) in &seeds {
        eprintln!("authority: {name} ({} bytes)", data.len());
        relay_sidecar::fuzzing::authority(data);
        // Every way of cutting it into reads, for the small ones.
        if data.len() < 1024 {
            for first in 0..=255u8 {
                let mut cut = data.clone();
                cut[0] = first;
                relay_sidecar::fuzzing::authority(&cut);
            }
        }
    }
}

#[test]
fn the_codec_seeds_pass() {
    let seeds = inputs("codec");
    assert!(
        seeds.len() >= 4,
        "fuzz/seeds/codec is missing: run fuzz/make-seeds"
    );
    for (name, data) in &seeds {
        eprintln!("codec: {name} ({} bytes)", data.len());
        relay_sidecar::fuzzing::codec(data);
    }
}
