//! A directory of spec files, watched with `notify` (debounced) and re-scanned
//! periodically, because file-system events can be missed (network file systems,
//! editors that replace files, a watcher that failed to start).

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{load::load_tree, Assembler, Snapshot, SourceChecks, SourceState};

/// A watched directory (or single file) of `FlowerCluster` specs.
#[derive(Debug, Clone)]
pub struct DirSource {
    /// Directory or file.
    pub root: PathBuf,
    /// Quiet time after the last file event before scanning.
    pub debounce: Duration,
    /// Full re-scan interval.
    pub rescan: Duration,
    /// Follow file-system events (off: periodic re-scan only).
    pub watch: bool,
}

impl DirSource {
    /// A source with the default debounce (500 ms) and re-scan (60 s).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            debounce: Duration::from_millis(500),
            rescan: Duration::from_secs(60),
            watch: true,
        }
    }

    /// Load once (for `plan` and `apply`).
    pub async fn load_once(&self) -> anyhow::Result<Snapshot> {
        let (_, result) = scan_with(Assembler::default(), self.root.clone(), None).await;
        result.map_err(anyhow::Error::msg)
    }

    /// Watch until `shutdown`, publishing a new [`SourceState`] whenever the revision,
    /// the errors or the scan error change.
    pub async fn run(self, tx: watch::Sender<SourceState>, shutdown: CancellationToken) {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
        let watcher = self.watch.then(|| {
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.map(|e| !e.kind.is_access()).unwrap_or(true) {
                    let _ = ev_tx.send(());
                }
            })
            .and_then(|mut w| w.watch(&self.root, RecursiveMode::Recursive).map(|()| w))
        });
        // Without events the periodic re-scan still converges: degrade, do not fail.
        let _watcher = match watcher {
            Some(Ok(w)) => Some(w),
            None => None,
            Some(Err(e)) => {
                tracing::warn!(root = %self.root.display(), error = %e, "file watch unavailable; relying on periodic re-scan");
                None
            }
        };
        let mut asm = Assembler::default();
        let mut rescan = tokio::time::interval(self.rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = rescan.tick() => {}
                Some(()) = ev_rx.recv() => {
                    // Trailing-edge debounce: scan once the tree has been quiet for `debounce`.
                    while let Ok(Some(())) = tokio::time::timeout(self.debounce, ev_rx.recv()).await {}
                }
            }
            let (next, result) = scan_with(asm, self.root.clone(), None).await;
            asm = next;
            publish(&tx, result, None);
        }
    }
}

/// Load `root` off the async threads. The revision is the tree digest unless `revision`
/// (a commit sha) is given.
pub(super) async fn scan_with(
    mut asm: Assembler,
    root: PathBuf,
    revision: Option<String>,
) -> (Assembler, Result<Snapshot, String>) {
    tokio::task::spawn_blocking(move || {
        let result = load_tree(&root).map(|tree| Snapshot {
            allow_delete: tree.allow_delete,
            ..asm.assemble(revision.unwrap_or(tree.revision), tree.loads)
        });
        (asm, result)
    })
    .await
    .unwrap_or_else(|e| (Assembler::default(), Err(format!("scan task failed: {e}"))))
}

/// Publish `result` if it differs from what is published. A failed scan keeps the last
/// good snapshot and reports the error next to it. `checks` replace the published ones
/// (`None`: nothing was fetched to check, they stay).
pub(super) fn publish(
    tx: &watch::Sender<SourceState>,
    result: Result<Snapshot, String>,
    checks: Option<SourceChecks>,
) {
    tx.send_if_modified(|state| {
        let checks = checks.unwrap_or_else(|| state.checks.clone());
        let changed = state.checks != checks
            || match &result {
                Ok(snap) => state.error.is_some() || state.snapshot.as_deref() != Some(snap),
                Err(e) => state.error.as_ref() != Some(e),
            };
        if changed {
            state.checks = checks;
            match result {
                Ok(snap) => {
                    state.snapshot = Some(snap.into());
                    state.error = None;
                }
                Err(e) => state.error = Some(e),
            }
            state.generation += 1;
        }
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::load::tests::spec_yaml;
    use crate::source::tests::{next_state, next_state_where};

    #[tokio::test]
    async fn dir_source_follows_create_modify_delete_debounced_and_holds_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), spec_yaml("alpha", 2)).unwrap();
        let source = DirSource {
            root: dir.path().to_path_buf(),
            debounce: Duration::from_millis(300),
            rescan: Duration::from_secs(3600),
            watch: true,
        };
        let (tx, mut rx) = watch::channel(SourceState::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, stop.clone()));

        let s = next_state(&mut rx).await;
        assert_eq!(s.generation, 1);
        let snap = s.snapshot.unwrap();
        assert_eq!(snap.clusters.keys().collect::<Vec<_>>(), vec!["alpha"]);
        let rev1 = snap.revision.clone();

        // A burst of writes (create + modify) inside the debounce window: one new snapshot.
        for count in [3, 4, 5] {
            std::fs::write(dir.path().join("a.yaml"), spec_yaml("alpha", count)).unwrap();
        }
        std::fs::write(dir.path().join("b.yaml"), spec_yaml("beta", 1)).unwrap();
        let s = next_state(&mut rx).await;
        assert_eq!(s.generation, 2, "the burst was debounced into one scan");
        let snap = s.snapshot.unwrap();
        assert_ne!(snap.revision, rev1);
        assert_eq!(snap.clusters["alpha"].cluster.spec.supernodes.count, 5);
        assert!(snap.clusters.contains_key("beta"));

        // a.yaml turns invalid: alpha is held, not dropped.
        std::fs::write(dir.path().join("a.yaml"), "metadata: [broken\n").unwrap();
        let snap = next_state(&mut rx).await.snapshot.unwrap();
        assert!(!snap.clusters.contains_key("alpha"));
        assert_eq!(snap.held.get("alpha"), Some(&PathBuf::from("a.yaml")));
        assert_eq!(snap.errors.len(), 1);
        assert!(snap.clusters.contains_key("beta"), "good files still load");

        // b.yaml deleted: beta is gone (not held), alpha still held.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let snap = next_state(&mut rx).await.snapshot.unwrap();
        assert!(!snap.clusters.contains_key("beta"));
        assert!(!snap.held.contains_key("beta"));
        assert!(snap.held.contains_key("alpha"));

        stop.cancel();
        task.await.unwrap();
    }

    // Real time: paused time would auto-advance while the blocking scan runs.
    #[tokio::test]
    async fn periodic_rescan_catches_changes_without_file_events() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, spec_yaml("alpha", 2)).unwrap();
        let (tx, mut rx) = watch::channel(SourceState::default());
        // A single file as root, events off: the change lands through the re-scan alone.
        let source = DirSource {
            root: file.clone(),
            debounce: Duration::from_millis(100),
            rescan: Duration::from_millis(300),
            watch: false,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, stop.clone()));
        assert_eq!(next_state(&mut rx).await.generation, 1);
        std::fs::write(&file, spec_yaml("alpha", 7)).unwrap();
        // A re-scan before the write republishes the old revision confirmed: skipped.
        let changed = |s: &SourceState| {
            s.snapshot
                .as_ref()
                .is_some_and(|x| x.clusters["alpha"].cluster.spec.supernodes.count == 7)
        };
        let snap = next_state_where(&mut rx, changed).await.snapshot.unwrap();
        assert!(!snap.confirmed, "first read of a new revision");
        let again = next_state(&mut rx).await.snapshot.unwrap();
        assert!(again.confirmed, "the next re-scan confirms it");
        assert_eq!(again.revision, snap.revision);
        assert_eq!(snap.clusters["alpha"].cluster.spec.supernodes.count, 7);
        stop.cancel();
        task.await.unwrap();
    }
}
