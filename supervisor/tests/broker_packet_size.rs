//! The managed broker accepts every submission a SUT may take: packets up to
//! `labvisor_protocol::MAX_PACKET_SIZE` (the largest `max_payload`, 8 MiB, plus 64 KiB),
//! proven with a real mosquitto started by `ManagedBroker` and real `mosquitto_pub`/`_sub`.

use std::net::IpAddr;
use std::process::Command;

use labvisor_protocol::topics::Topics;
use labvisor_protocol::MAX_PACKET_SIZE;
use labvisor_supervisor::broker::{ManagedBroker, LOCAL_PASSWORD_FILE, LOCAL_USER};
use labvisor_tests::{free_port, temp_file};

#[test]
fn the_managed_broker_carries_an_eight_mebibyte_submission() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    // A second loopback address stands in for the labvisor network's gateway.
    let gateway: IpAddr = "127.0.0.2".parse().unwrap();
    let broker = ManagedBroker::start(
        &state.path().join("broker"),
        port,
        gateway,
        &Topics::new(),
        None,
    )
    .expect("start the managed broker");
    // No anonymous client: the local tools' login, as the CLI uses it.
    let password = std::fs::read_to_string(broker.dir().join(LOCAL_PASSWORD_FILE)).unwrap();
    let login = ["-u", LOCAL_USER, "-P", password.trim()];
    // The largest max_payload; retained, so the subscriber gets it whenever it subscribes.
    let size = 8 * 1024 * 1024;
    let (_dir, file) = temp_file("payload", &vec![b'x'; size]);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(login)
        .args(["-r", "-t", "big/submit", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(login)
        .args(["-t", "big/submit", "-C", "1", "-W", "20", "-v"])
        .output()
        .unwrap();
    assert!(got.status.success(), "{got:?}");
    let line = String::from_utf8(got.stdout).unwrap();
    assert_eq!(line.trim_end().len(), "big/submit ".len() + size);
    let conf = std::fs::read_to_string(broker.dir().join("mosquitto.conf")).unwrap();
    assert!(
        conf.lines()
            .any(|l| l == format!("max_packet_size {MAX_PACKET_SIZE}")),
        "{conf}"
    );
}
