//! Runs the pyone conformance script (e2e/onesim/conformance/test_pyone.py) against onesim.
//! Requires FLOWER_VENV (a virtualenv with pyone); fails clearly without it.

mod common;

use std::path::PathBuf;

use common::*;

#[tokio::test]
async fn pyone_accepts_every_response() {
    let venv = std::env::var("FLOWER_VENV").unwrap_or_else(|_| {
        panic!("FLOWER_VENV is not set: run e2e/test-all.sh (it creates target/flower-venv with pyone) or export FLOWER_VENV")
    });
    let python = PathBuf::from(&venv).join("bin/python");
    assert!(
        python.exists(),
        "{} does not exist: FLOWER_VENV must point to a virtualenv with pyone",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance/test_pyone.py");
    let h = start().await;
    let url = h.urls().xmlrpc.clone();
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&url)
        .arg(AUTH)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pyone conformance failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("pyone conformance: all checks passed"),
        "{stdout}"
    );
    h.shutdown().await;
}
