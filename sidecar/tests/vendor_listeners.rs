//! `--no-vendor-port`: the binary opens no per-vendor listener for the named vendors, while
//! `--<vendor>-port 0` still means an ephemeral port (what tests and benchmarks rely on).
use std::{
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_keybrake-sidecar");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_vendor_port_leaves_those_listeners_closed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keybrake.yaml");
    std::fs::write(&config, "upstreams: {}\nkeys: []\n").unwrap();
    let addr_file = dir.path().join("addrs.json");
    let mut running = Running(
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .args(["--proxy-port=0", "--admin-port=0"])
            .args(["--stripe-port=0", "--openai-port=0"])
            .args(["--twilio-port=0", "--resend-port=0"])
            .args(["--no-vendor-port", "stripe,twilio"])
            .args(["--addr-file", addr_file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let addrs: serde_json::Value = loop {
        if let Some(v) = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            break v;
        }
        assert!(
            running.0.try_wait().unwrap().is_none(),
            "the sidecar exited before listening"
        );
        assert!(Instant::now() < deadline, "no address file within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let vendors: Vec<(String, SocketAddr)> =
        serde_json::from_value(addrs["vendors"].clone()).expect("vendors: [[name, addr]]");
    let names: Vec<&str> = vendors.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(names, ["openai", "resend"], "{addrs}");
    for (vendor, addr) in &vendors {
        assert_ne!(addr.port(), 0, "{vendor}: port 0 binds an ephemeral port");
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("{vendor} listener {addr}: {e}"));
    }
    let proxy: SocketAddr = addrs["proxy"].as_str().unwrap().parse().unwrap();
    TcpStream::connect(proxy).expect("the prefix-routed proxy still listens");
}
