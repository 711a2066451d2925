//! Replays the RPC fuzz seed corpus (`fuzz/corpus/rpc_*`) through the same entry functions the
//! fuzz targets call, on stable Rust.

use std::path::PathBuf;

fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        entry(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
    n
}

#[test]
fn rpc_packet_seeds() {
    replay("rpc_packet", luna::proto::rpc::fuzzing::packet);
}

#[test]
fn rpc_handshake_seeds() {
    replay("rpc_handshake", luna::proto::rpc::fuzzing::handshake);
}

#[test]
fn rpc_session_seeds() {
    replay("rpc_session", luna::proto::rpc::fuzzing::session);
}

/// Cheap extra coverage beyond the corpus: every truncation and single-byte corruption of each
/// packet seed, through the packet decoders.
#[test]
fn rpc_packet_seed_mutations() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/rpc_packet");
    for e in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        for cut in 0..data.len().min(300) {
            luna::proto::rpc::fuzzing::packet(&data[..cut]);
        }
        let mut m = data.clone();
        for i in 0..m.len().min(300) {
            m[i] ^= 0xa5;
            luna::proto::rpc::fuzzing::packet(&m);
            m[i] ^= 0xa5;
        }
    }
}
