//! QMP replies. The reply reader (`Qmp::read_message`) and the raw reply types are private,
//! so this target drives the public client, `Qmp::connect_with` then `query_cpus_fast`,
//! `query_iothreads` and `execute`, against a Unix socket whose peer sends the fuzz input as
//! the whole byte stream from QEMU (greeting, replies, events, garbage), then closes its
//! sending side and reads until the client leaves. That covers the greeting check, the line
//! cap, the per-reply line limit, event and stale-id skipping, `error` mapping, the
//! deserialisation of `query-cpus-fast` / `query-iothreads` replies and thread-id checks.
//!
//! One listening socket and one peer thread serve every input of the process; the client's
//! deadlines are the real ones (`CONNECT_BUDGET`, `SESSION_DEADLINE`), so an input that made
//! the client wait would show up as a slow unit. SIGPIPE is ignored, as Rust's `main` does
//! for the pvetune binary (libFuzzer's `main` does not).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pvetune::qmp::{CONNECT_BUDGET, Qmp, SESSION_DEADLINE};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};

struct Peer {
    path: PathBuf,
    inputs: Sender<Vec<u8>>,
    done: Mutex<Receiver<()>>,
}

fn peer() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let dir = std::env::temp_dir().join(format!("pvetune-fuzz-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the socket directory");
        let path = dir.join("100.qmp");
        let listener = UnixListener::bind(&path).expect("bind the QMP socket");
        let (inputs, input_rx) = channel::<Vec<u8>>();
        let (done_tx, done) = channel::<()>();
        std::thread::spawn(move || {
            for input in input_rx {
                if let Ok((mut stream, _)) = listener.accept() {
                    let _ = stream.write_all(&input);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    let _ = stream.read_to_end(&mut Vec::new());
                }
                let _ = done_tx.send(());
            }
        });
        Peer {
            path,
            inputs,
            done: Mutex::new(done),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let peer = peer();
    let done = peer.done.lock().unwrap();
    peer.inputs.send(data.to_vec()).unwrap();
    if let Ok(mut qmp) = Qmp::connect_with(&peer.path, CONNECT_BUDGET, SESSION_DEADLINE) {
        match qmp.query_cpus_fast() {
            Ok(cpus) => {
                let _ = format!("{cpus:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        match qmp.query_iothreads() {
            Ok(io) => {
                let _ = format!("{io:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        let _ = qmp.execute("query-status", None).map_err(|e| e.to_string());
    }
    // The peer has sent everything and sees the client leave (the Qmp was dropped above).
    done.recv().unwrap();
});
