//! `ureq-get URL N [CA.pem]`: N sequential GETs of URL on one keep-alive agent, the whole body
//! read each time, https verified against CA.pem when given; prints
//! `requests=N seconds=S rate=R bytes=B`.
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use ureq::tls::{Certificate, RootCerts, TlsConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: ureq-get URL N [CA.pem]");
    let n: u64 = args.next().and_then(|n| n.parse().ok()).expect("usage: ureq-get URL N [CA.pem]");
    let mut config = ureq::Agent::config_builder();
    if let Some(ca) = args.next() {
        let pem = std::fs::read(&ca).expect("the CA file");
        let cert = Certificate::from_pem(&pem).expect("a PEM certificate");
        let tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![cert]))).build();
        config = config.tls_config(tls);
    }
    let agent: ureq::Agent = config.build().into();
    let mut bytes = 0u64;
    let mut body = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        let mut response = agent.get(&url).call().expect("GET");
        body.clear();
        response.body_mut().as_reader().read_to_end(&mut body).expect("body");
        bytes += body.len() as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("requests={n} seconds={seconds:.3} rate={:.0} bytes={bytes}", n as f64 / seconds);
}
