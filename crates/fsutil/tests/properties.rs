//! Property tests for the parsers of untrusted input: patterns (from `.dockerignore` and
//! session headers) and receiver listings (from a peer). Neither may panic, and the receiver must
//! never write outside its destination.

use fsutil::patterns::PatternMatcher;
use fsutil::{receive, Error, Packet, ReceiveOptions, Stat};
use futures::StreamExt;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

proptest! {
    #[test]
    fn patterns_never_panic(pats in proptest::collection::vec("[a-z*?\\[\\]\\\\!./^-]{0,12}", 0..5), path in "[a-z./*]{0,16}") {
        if let Ok(m) = PatternMatcher::new(&pats) {
            let _ = m.matches_or_parent_matches(&path);
        }
    }

    #[test]
    fn literal_patterns_match_themselves_and_children(name in "[a-z]{1,8}(/[a-z]{1,8}){0,3}", child in "[a-z]{1,8}") {
        let m = PatternMatcher::new(&[name.as_str()]).unwrap();
        prop_assert!(m.matches_or_parent_matches(&name).unwrap());
        let c = format!("{name}/{child}");
        prop_assert!(m.matches_or_parent_matches(&c).unwrap());
        let neg = PatternMatcher::new(&[name.clone(), format!("!{name}")]).unwrap();
        prop_assert!(!neg.matches_or_parent_matches(&name).unwrap());
    }

    #[test]
    fn receiver_rejects_or_stays_inside(paths in proptest::collection::vec("(\\.\\./|/|[a-z]{1,3}/|\\./){0,3}[a-z.]{1,4}", 1..6), kinds in proptest::collection::vec(0u8..3, 6)) {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        let mut packets = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let mode = match kinds[i % kinds.len()] {
                0 => 0o644,
                1 => fsutil::filemode::MODE_DIR | 0o755,
                _ => fsutil::filemode::MODE_SYMLINK | 0o777,
            };
            packets.push(Packet::Stat(Some(Stat {
                path: p.clone(),
                mode,
                linkname: outside.path().display().to_string(),
                ..Default::default()
            })));
        }
        packets.push(Packet::Stat(None));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = rt.block_on(async {
            let (tx, rx) = mpsc::channel(64);
            let (otx, mut orx) = mpsc::channel(64);
            // answer every request with an empty file, then FIN, then end
            let feeder = tokio::spawn(async move {
                for p in packets {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
                while let Some(p) = orx.recv().await {
                    match p {
                        Packet::Req { id } => {
                            let _ = tx.send(Packet::Data { id, data: bytes::Bytes::from_static(b"x") }).await;
                            let _ = tx.send(Packet::Data { id, data: bytes::Bytes::new() }).await;
                        }
                        Packet::Fin => {
                            let _ = tx.send(Packet::Fin).await;
                            return;
                        }
                        _ => return,
                    }
                }
            });
            let r = receive(dest.clone(), ReceiveOptions::default(), otx, ReceiverStream::new(rx).map(Ok::<_, Error>)).await;
            let _ = feeder.await;
            r
        });
        prop_assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing may be written outside");
        for e in std::fs::read_dir(root.path()).unwrap() {
            prop_assert_eq!(e.unwrap().file_name(), "dest");
        }
    }
}
