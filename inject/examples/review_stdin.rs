//! Reads one AdmissionReview on stdin and writes the injector's answer on stdout, with the
//! default configuration. For checking the patch against a real apiserver by hand (see
//! tests/data/README.md): a throw-away webhook server pipes each request through it.
use std::io::{Read, Write};

use keybrake_inject::{InjectionConfig, InjectionResult, review_json};

fn main() -> std::io::Result<()> {
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let config = InjectionConfig::new(
        "ghcr.io/keybrake/sidecar:0.1.0",
        "https://keybrake-controller-streams.keybrake-system.svc:8443",
    );
    let (answer, outcome) = review_json(&body, &config, &|_: InjectionResult| {});
    eprintln!("{:?} {:?}", outcome.result, outcome.failure);
    std::io::stdout().write_all(&answer)
}
