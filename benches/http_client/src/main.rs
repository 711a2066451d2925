//! `ureq-get URL N`: N sequential GETs of URL on one keep-alive agent, the whole body read each
//! time; prints `requests=N seconds=S rate=R bytes=B`.
use std::io::Read;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: ureq-get URL N");
    let n: u64 = args.next().and_then(|n| n.parse().ok()).expect("usage: ureq-get URL N");
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
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
