//! SIGTERM and SIGINT stop `rewind serve` cleanly within seconds whatever it is doing: waiting
//! for a frontend with its socket path removed, serving a frontend with requests in flight,
//! signalled twice, with its control sockets' paths removed, or running a recovery (which stops
//! and leaves no output). Each case runs several times, so a race shows.

mod common;

#[path = "common/vmm.rs"]
mod vmm;

use std::path::Path;
use std::time::Duration;

use common::Daemon;
use vm_memory::{Bytes, GuestAddress};
use vmm::{d, Vmm, DATA, F_WRITE};

const LIMIT: Duration = Duration::from_secs(10);
const ROUNDS: usize = 5;

fn start(dir: &Path) -> Daemon {
    Daemon::start(&dir.join("disk.img"), &dir.join("vhost.sock"), &["--size", "8M"])
}

fn signal(daemon: &Daemon, signal: i32) {
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(daemon.child.id() as i32, signal) }, 0);
}

/// Waits for the daemon to exit by itself within `LIMIT`; it must exit successfully.
fn expect_clean_exit(mut daemon: Daemon, what: &str) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            assert!(status.success(), "{what}: {status}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: still running {LIMIT:?} after the signal");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signal_stops_a_daemon_whose_socket_path_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    for (round, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().cycle().take(ROUNDS).enumerate() {
        let daemon = start(dir.path());
        std::fs::remove_file(&daemon.socket).unwrap();
        signal(&daemon, sig);
        expect_clean_exit(daemon, &format!("round {round}, signal {sig}"));
    }
}

#[test]
fn a_signal_stops_a_daemon_with_requests_in_flight_and_a_second_signal_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let daemon = start(dir.path());
        let mut vmm = Vmm::connect(&daemon.socket, 1, true);
        for i in 0..64u64 {
            let header = DATA + i * 16;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&1u32.to_le_bytes());
            h[8..16].copy_from_slice(&(i * 8).to_le_bytes());
            vmm.mem.write_slice(&h, GuestAddress(header)).unwrap();
            let head =
                vmm.place_chain(0, &[d(header, 16, 0), d(DATA + 0x10000, 4096, 0), d(DATA + 0x1000 + i, 1, F_WRITE)]);
            vmm.make_available(0, head, false);
        }
        vmm.kick(0);
        signal(&daemon, libc::SIGTERM);
        if round % 2 == 1 {
            signal(&daemon, libc::SIGTERM);
        }
        expect_clean_exit(daemon, &format!("round {round}"));
    }
}

#[test]
fn a_signal_stops_a_daemon_whose_control_sockets_were_removed_or_that_is_recovering() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // An adopted image with data, so a recovery has something to copy.
    std::fs::write(&image, vec![0xa5u8; 128 << 20]).unwrap();
    let original = std::fs::read(&image).unwrap();
    let (control, agent) = (dir.path().join("control.sock"), dir.path().join("agent.sock"));
    let args = ["--control", control.to_str().unwrap(), "--agent-socket", agent.to_str().unwrap()];
    for round in 0..ROUNDS {
        let daemon = Daemon::start(&image, &dir.path().join("vhost.sock"), &args);
        wait_for(&control);
        wait_for(&agent);
        let output = dir.path().join(format!("recovered-{round}.img"));
        if round % 2 == 0 {
            std::fs::remove_file(&control).unwrap();
            std::fs::remove_file(&agent).unwrap();
        } else {
            let mut client = rewind::qmp_client::QmpClient::connect(&control).unwrap();
            let target = rewind::recovery::RecoveryTarget::Seq(0);
            let recover = rewind::control::protocol::RecoverArgs::new(&target, output.clone());
            let _: serde_json::Value = client.execute(rewind::control::HostCommand::Recover(recover)).unwrap();
        }
        signal(&daemon, libc::SIGTERM);
        expect_clean_exit(daemon, &format!("round {round}"));
        // A recovery the signal stopped leaves nothing; one that finished first is whole.
        if output.exists() {
            assert!(std::fs::read(&output).unwrap() == original, "round {round}: a whole recovery");
            std::fs::remove_file(&output).unwrap();
        }
    }
}

fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + LIMIT;
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
