//! Every checked-in fuzz input through the same harness the fuzzer runs
//! (`flower_reconcile::fuzzing`), on stable, in the normal suite: the seed corpora
//! (`fuzz/corpus/<target>/`) and every crash found so far (`fuzz/regressions/<target>/`).
//!
//! A crash found by `e2e/fuzz.sh` is kept by copying its input (named for what it shows) to
//! `fuzz/regressions/<target>/`; from then on `fuzz_regressions_run_clean` fails until it is
//! fixed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use flower_reconcile::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The input files of one directory, sorted; a missing directory holds none.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"));
    files.sort();
    files
}

/// Feeds every file under `root/<target>/` to its target; returns `(inputs run, failures)`.
fn run_dir(root: &Path) -> (usize, Vec<String>) {
    let mut ran = 0;
    let mut failures = Vec::new();
    for (name, harness) in TARGETS {
        for file in inputs(&root.join(name)) {
            let data = std::fs::read(&file).expect("readable fuzz input");
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                failures.push(format!("{name}: {}", file.display()));
            }
        }
    }
    (ran, failures)
}

#[test]
fn every_target_has_a_seed_corpus_and_a_binary() {
    for (name, _) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            seeds.len() >= 3,
            "fuzz/corpus/{name} holds {} seeds",
            seeds.len()
        );
        let bin = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&bin).expect("a fuzz target per harness");
        assert!(
            text.contains(&format!("flower_reconcile::fuzzing::{name}(data)")),
            "{} does not call its harness",
            bin.display()
        );
    }
}

#[test]
fn seed_corpora_run_clean() {
    let (ran, failures) = run_dir(&fuzz_dir().join("corpus"));
    assert!(ran > 0);
    assert!(
        failures.is_empty(),
        "seeds that fail:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fuzz_regressions_run_clean() {
    let (ran, failures) = run_dir(&fuzz_dir().join("regressions"));
    assert!(ran >= 3, "the regressions of #12 item 12 are checked in");
    assert!(
        failures.is_empty(),
        "regressions that fail:\n{}",
        failures.join("\n")
    );
}
