//! Replays the checked-in fuzz corpus of the stream protocols (`fuzz/corpus/ws_*`,
//! `fuzz/corpus/stream_glue`) through the same library entry points the fuzz targets call, on
//! stable Rust.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("seed file");
        // Each seed also runs truncated, to cover partial input.
        for cut in [data.len(), data.len() / 2, data.len().min(3)] {
            let r = std::panic::catch_unwind(|| run(&data[..cut]));
            assert!(r.is_ok(), "{} (first {cut} bytes) panicked", f.display());
        }
    }
    // A little deterministic mutation on top (stable Rust has no coverage-guided fuzzer):
    // byte flips, insertions and deletions of every seed.
    let mut seed = 0x2545_f491u32;
    let mut rnd = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed as usize % n.max(1)
    };
    let mut runs = 0;
    for f in &files {
        let data = std::fs::read(f).expect("seed file");
        for _ in 0..mutations() {
            let mut m = data.clone();
            for _ in 0..1 + rnd(4) {
                match rnd(3) {
                    0 if !m.is_empty() => {
                        let i = rnd(m.len());
                        m[i] ^= 1 << rnd(8);
                    }
                    1 => {
                        let i = rnd(m.len() + 1);
                        m.insert(i, rnd(256) as u8);
                    }
                    _ if !m.is_empty() => {
                        let i = rnd(m.len());
                        m.remove(i);
                    }
                    _ => {}
                }
            }
            let r = std::panic::catch_unwind(|| run(&m));
            assert!(r.is_ok(), "mutation of {} panicked: {m:?}", f.display());
            runs += 1;
        }
    }
    println!("{target}: {} seeds replayed, {runs} mutations", files.len());
}

/// Mutations per seed: 300, or `LUNA_FUZZ_MUTATIONS` for a longer soak.
fn mutations() -> usize {
    std::env::var("LUNA_FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

#[test]
fn ws_upgrade_seeds() {
    replay("ws_upgrade", luna::proto::ws::fuzzing::upgrade);
}

#[test]
fn ws_connection_seeds() {
    replay("ws_connection", luna::proto::ws::fuzzing::connection);
}

#[test]
fn stream_glue_seeds() {
    replay("stream_glue", luna::proto::fuzzing::stream_glue);
}

#[test]
fn http_server_seeds() {
    replay("http_server", luna::proto::fuzzing::http_glue);
    replay("http_server", luna::proto::fuzzing::http_early_glue);
}

#[test]
fn multipart_seeds() {
    replay("multipart", luna::proto::fuzzing::multipart);
}

#[test]
fn http_client_seeds() {
    replay("http_client", luna::proto::fuzzing::http_client);
}
