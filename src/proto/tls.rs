//! TLS for any stream, over rustls 0.23 (ring provider), sans-IO.
//!
//! Configs are built from bytes: [`server_config`] from a PEM certificate chain and key,
//! [`client_config`] from a root store ([`root_store`]: certificates the caller loaded, e.g. the
//! system's, plus PEM CA text) or none (accept any certificate). Reading files and the system
//! trust store is the caller's job (`bind/`); build a config once and share the `Arc`. ALPN
//! protocols are chosen by the caller.
//!
//! The pump, [`Tls`], wraps a rustls client or server connection: the driver feeds bytes read
//! from the socket to [`Tls::handle_ciphertext`], passes [`Tls::read_plaintext`] output up to
//! the protocol, hands plaintext to send to [`Tls::write_plaintext`] (it is buffered while the
//! handshake is still running) and writes whatever [`Tls::take_ciphertext`] yields (poll for
//! writability while [`Tls::wants_write`]). Nothing ever blocks.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, RootCertStore};
use rustls::{ServerConfig, ServerConnection, SignatureScheme};
use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

/// Drained plaintext buffers larger than this are given back.
const SHRINK_THRESHOLD: usize = 8 * 1024;

/// What can go wrong with TLS. Messages are meant to be shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A certificate, key or CA could not be used: no certificate in it, no (or an
    /// unsupported) private key, or a key that does not match the certificate. The message
    /// names the input (as the caller labelled it) and the problem.
    Config(String),
    /// The TLS session failed (handshake, certificate verification, a received alert, a
    /// corrupt record). Certificate problems read like `certificate verify failed: UnknownIssuer`.
    Session(String),
    /// Not a usable TLS server name (a DNS name or an IP address).
    ServerName(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) => write!(f, "TLS configuration error: {m}"),
            Error::Session(m) => write!(f, "TLS error: {m}"),
            Error::ServerName(name) => write!(f, "'{name}' is not a valid TLS server name"),
        }
    }
}

impl std::error::Error for Error {}

/// PEM text and what to call it in messages (e.g. `certificate file 'cert.pem'`).
#[derive(Debug, Clone, Copy)]
pub struct Pem<'a> {
    pub bytes: &'a [u8],
    pub label: &'a str,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(pem: Pem<'_>) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem.bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{} is not valid PEM: {e}", pem.label)))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "no certificate found in {} (expected a PEM 'BEGIN CERTIFICATE' block)",
            pem.label
        )));
    }
    Ok(certs)
}

fn parse_key(pem: Pem<'_>) -> Result<PrivateKeyDer<'static>, Error> {
    match rustls_pemfile::private_key(&mut &pem.bytes[..]) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => {
            let text = String::from_utf8_lossy(pem.bytes);
            Err(Error::Config(if text.contains("ENCRYPTED PRIVATE KEY") {
                format!(
                    "private key {} is encrypted; encrypted keys are not supported \
                     (decrypt it with `openssl pkey -in KEY -out KEY.plain`)",
                    pem.label
                )
            } else {
                format!(
                    "no private key found in {} (expected a PEM 'PRIVATE KEY', \
                     'RSA PRIVATE KEY' or 'EC PRIVATE KEY' block)",
                    pem.label
                )
            }))
        }
        Err(e) => Err(Error::Config(format!("private key {} is not valid PEM: {e}", pem.label))),
    }
}

/// A server config from a PEM certificate chain (leaf first) and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1; RSA, ECDSA or Ed25519), offering `alpn` (most preferred first; empty: none).
/// Errors name the input and the problem (no certificate, no or unsupported key, key not
/// matching the certificate).
pub fn server_config(cert: Pem<'_>, key: Pem<'_>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, Error> {
    let certs = parse_certs(cert)?;
    let private = parse_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?
        .with_no_client_auth();
    let mut config = builder.with_single_cert(certs, private).map_err(|e| {
        Error::Config(match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("private key {} does not match the certificate in {}", key.label, cert.label)
            }
            other => format!("unsupported private key in {}: {other}", key.label),
        })
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The certificates a client trusts: `system` (already loaded by the caller, e.g. with
/// rustls-native-certs; unusable ones are skipped) plus every certificate in `extra`.
pub fn root_store(
    system: Vec<CertificateDer<'static>>,
    extra: Option<Pem<'_>>,
) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system);
    if let Some(pem) = extra {
        for cert in parse_certs(pem)? {
            roots
                .add(cert)
                .map_err(|e| Error::Config(format!("{} holds an unusable certificate: {e}", pem.label)))?;
        }
    }
    Ok(roots)
}

/// A certificate verifier that accepts **any** server certificate, for development only:
/// it gives no protection against an active attacker. Selected by `client_config(_, false)`.
#[derive(Debug)]
pub struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // The certificate is not checked, but the handshake signatures still are: the peer must hold
    // the key of the certificate it presented.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config that verifies servers against `roots`, or with `None` accepts **any**
/// certificate ([`AcceptAnyServerCert`]: an explicit, insecure opt-out for development; the
/// handshake signatures are still checked). Offers `alpn` (empty: no ALPN).
pub fn client_config(roots: Option<RootCertStore>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions");
    let mut config = match roots {
        Some(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Readable text for a rustls error (certificate problems first).
pub fn describe_tls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!("certificate verify failed: {c}"),
        rustls::Error::AlertReceived(a) => format!("peer sent TLS alert: {a:?}"),
        rustls::Error::NoCertificatesPresented => "peer presented no certificate".into(),
        other => other.to_string(),
    }
}

/// A sans-IO TLS session (client or server). See the module documentation.
#[derive(Debug)]
pub struct Tls {
    conn: Connection,
    plain_in: Vec<u8>,
    error: Option<Error>,
    peer_closed: bool,
    eof: bool,
}

impl Tls {
    fn wrap(mut conn: Connection) -> Self {
        // rustls refuses plaintext beyond 64 KiB of unsent records by default; the layer above
        // (the WebSocket outgoing bound) already limits how much is queued.
        conn.set_buffer_limit(None);
        Tls { conn, plain_in: Vec::new(), error: None, peer_closed: false, eof: false }
    }

    /// A server session.
    pub fn server(config: Arc<ServerConfig>) -> Result<Self, Error> {
        let c = ServerConnection::new(config).map_err(|e| Error::Session(describe_tls_error(&e)))?;
        Ok(Self::wrap(c.into()))
    }

    /// A client session for `host`: a DNS name (sent as SNI and verified) or an IP literal
    /// without brackets (no SNI; verified against the certificate's IP addresses).
    pub fn client(config: Arc<ClientConfig>, host: &str) -> Result<Self, Error> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|_| Error::ServerName(host.to_string()))?;
        let c = ClientConnection::new(config, name).map_err(|e| Error::Session(describe_tls_error(&e)))?;
        Ok(Self::wrap(c.into()))
    }

    /// Feed bytes read from the socket. All of `data` is consumed; decrypted bytes become
    /// available through [`read_plaintext`](Self::read_plaintext). On error (bad record,
    /// certificate rejected, alert received) the session is dead: send what
    /// [`take_ciphertext`](Self::take_ciphertext) yields (the alert), then close. The same
    /// error is returned by every later call.
    pub fn handle_ciphertext(&mut self, data: &[u8]) -> Result<(), Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut rd = data;
        while !rd.is_empty() {
            match self.conn.read_tls(&mut rd) {
                Ok(0) => break, // after close_notify / EOF: ignore trailing bytes
                Ok(_) => {}
                Err(e) => return Err(self.fail(Error::Session(e.to_string()))),
            }
            self.process()?;
        }
        Ok(())
    }

    /// The transport reached end of stream.
    pub fn handle_eof(&mut self) {
        self.eof = true;
        if self.error.is_none() {
            let _ = self.conn.read_tls(&mut &[][..]);
            let _ = self.process();
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.error = Some(e.clone());
        e
    }

    fn process(&mut self) -> Result<(), Error> {
        let state = match self.conn.process_new_packets() {
            Ok(s) => s,
            Err(e) => {
                let e = Error::Session(describe_tls_error(&e));
                return Err(self.fail(e));
            }
        };
        let n = state.plaintext_bytes_to_read();
        if state.peer_has_closed() {
            self.peer_closed = true;
        }
        if n > 0 {
            let old = self.plain_in.len();
            self.plain_in.resize(old + n, 0);
            if let Err(e) = self.conn.reader().read_exact(&mut self.plain_in[old..]) {
                self.plain_in.truncate(old);
                return Err(self.fail(Error::Session(e.to_string())));
            }
        }
        Ok(())
    }

    /// Append all decrypted bytes received so far to `out`; returns how many.
    pub fn read_plaintext(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.plain_in.len();
        if out.is_empty() && out.capacity() <= self.plain_in.capacity() {
            std::mem::swap(out, &mut self.plain_in);
        } else {
            out.extend_from_slice(&self.plain_in);
            self.plain_in.clear();
        }
        if self.plain_in.capacity() > SHRINK_THRESHOLD {
            self.plain_in = Vec::new();
        }
        n
    }

    /// Decrypted bytes waiting in [`read_plaintext`](Self::read_plaintext).
    pub fn plaintext_len(&self) -> usize {
        self.plain_in.len()
    }

    /// Queue plaintext for encryption (buffered until the handshake completes).
    pub fn write_plaintext(&mut self, data: &[u8]) -> Result<(), Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.conn.writer().write_all(data).map_err(|e| Error::Session(e.to_string()))
    }

    /// Append every pending TLS record (handshake messages, encrypted data, alerts) to `out`;
    /// returns how many bytes were appended.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        while self.conn.wants_write() {
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        out.len() - start
    }

    /// Whether records are waiting for [`take_ciphertext`](Self::take_ciphertext).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether the handshake has completed (application data flows).
    pub fn is_handshake_complete(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// The error that killed the session, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Whether the peer sent `close_notify` (a clean TLS shutdown).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether [`handle_eof`](Self::handle_eof) was called.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Queue a `close_notify` alert (then flush with [`take_ciphertext`](Self::take_ciphertext)).
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// `true` for a server session.
    pub fn is_server(&self) -> bool {
        matches!(self.conn, Connection::Server(_))
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The SNI name the client sent (server sessions only).
    pub fn sni_hostname(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(s) => s.server_name(),
            Connection::Client(_) => None,
        }
    }

    /// Negotiated protocol version, e.g. `"TLSv1_3"`, once known.
    pub fn protocol_version(&self) -> Option<String> {
        self.conn.protocol_version().map(|v| format!("{v:?}"))
    }

    /// Negotiated cipher suite, e.g. `"TLS13_AES_128_GCM_SHA256"`, once known.
    pub fn cipher_suite(&self) -> Option<String> {
        self.conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))
    }

    /// The peer's end-entity certificate (DER), once the handshake got it.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        self.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn data(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)).unwrap()
    }

    fn pem<'a>(bytes: &'a [u8], label: &'a str) -> Pem<'a> {
        Pem { bytes, label }
    }

    /// The test server certificate (for `localhost`, 127.0.0.1 and ::1, signed by the test CA).
    pub(crate) fn test_server_config() -> Arc<ServerConfig> {
        let (cert, key) = (data("server.pem"), data("server.key"));
        server_config(pem(&cert, "cert"), pem(&key, "key"), &[]).unwrap()
    }

    /// A client trusting only the test CA.
    pub(crate) fn test_client_config() -> Arc<ClientConfig> {
        let ca = data("ca.pem");
        client_config(Some(root_store(Vec::new(), Some(pem(&ca, "ca"))).unwrap()), &[b"http/1.1"])
    }

    /// Runs the handshake between two pumps, `step` ciphertext bytes at a time; the first error.
    pub(crate) fn pump(a: &mut Tls, b: &mut Tls, step: usize) -> Result<(), Error> {
        for _ in 0..100 {
            let (mut ab, mut ba) = (Vec::new(), Vec::new());
            a.take_ciphertext(&mut ab);
            b.take_ciphertext(&mut ba);
            if ab.is_empty() && ba.is_empty() {
                return Ok(());
            }
            for p in ab.chunks(step) {
                b.handle_ciphertext(p)?;
            }
            for p in ba.chunks(step) {
                a.handle_ciphertext(p)?;
            }
        }
        panic!("TLS pump did not settle");
    }

    #[test]
    fn handshake_and_data_one_byte_at_a_time() {
        for host in ["localhost", "127.0.0.1", "::1", "[::1]"] {
            let mut ct = Tls::client(test_client_config(), host).unwrap();
            let mut st = Tls::server(test_server_config()).unwrap();
            ct.write_plaintext(b"queued before the handshake").unwrap();
            pump(&mut ct, &mut st, 1).unwrap();
            assert!(ct.is_handshake_complete() && st.is_handshake_complete());
            assert_eq!(st.sni_hostname(), (host == "localhost").then_some("localhost"));
            assert!(st.protocol_version().unwrap().contains("TLS"));
            assert!(ct.cipher_suite().is_some());
            assert!(ct.peer_certificate().is_some_and(|der| der.len() > 100));
            let mut plain = Vec::new();
            st.read_plaintext(&mut plain);
            assert_eq!(plain, b"queued before the handshake");

            let big = vec![5u8; 200_000];
            st.write_plaintext(&big).unwrap();
            st.send_close_notify();
            pump(&mut ct, &mut st, 7000).unwrap();
            let mut plain = Vec::new();
            ct.read_plaintext(&mut plain);
            assert_eq!(plain, big);
            assert!(ct.peer_closed());
        }
    }

    #[test]
    fn alpn_is_the_callers_choice() {
        let (cert, key) = (data("server.pem"), data("server.key"));
        let server = server_config(pem(&cert, "c"), pem(&key, "k"), &[b"h2", b"http/1.1"]).unwrap();
        let mut ct = Tls::client(test_client_config(), "localhost").unwrap();
        let mut st = Tls::server(server).unwrap();
        pump(&mut ct, &mut st, 1000).unwrap();
        assert_eq!(ct.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(st.alpn_protocol(), Some(&b"http/1.1"[..]));
    }

    #[test]
    fn unknown_issuer_is_readable() {
        let client = client_config(Some(root_store(Vec::new(), None).unwrap()), &[]);
        let mut ct = Tls::client(client, "localhost").unwrap();
        let mut st = Tls::server(test_server_config()).unwrap();
        let err = pump(&mut ct, &mut st, 16).unwrap_err();
        assert_eq!(err, Error::Session("certificate verify failed: UnknownIssuer".into()));
        assert_eq!(ct.error(), Some(&err));
        // The client's alert reaches the server as a readable error too.
        let mut alert = Vec::new();
        ct.take_ciphertext(&mut alert);
        let server_err = st.handle_ciphertext(&alert).unwrap_err();
        assert!(server_err.to_string().contains("alert"), "{server_err}");
        assert!(ct.write_plaintext(b"x").is_err());
    }

    #[test]
    fn wrong_name_and_insecure_opt_out() {
        let mut ct = Tls::client(test_client_config(), "example.com").unwrap();
        let mut st = Tls::server(test_server_config()).unwrap();
        let err = pump(&mut ct, &mut st, 100).unwrap_err().to_string();
        assert!(err.contains("certificate verify failed") && err.contains("example.com"), "{err}");

        let mut ct = Tls::client(client_config(None, &[]), "example.com").unwrap();
        let mut st = Tls::server(test_server_config()).unwrap();
        pump(&mut ct, &mut st, 100).unwrap();
        assert!(ct.is_handshake_complete());
        assert_eq!(
            Tls::client(client_config(None, &[]), "bad host!").unwrap_err(),
            Error::ServerName("bad host!".into())
        );
    }

    #[test]
    fn config_errors_name_the_input() {
        let (cert, key, other) = (data("server.pem"), data("server.key"), data("other.key"));
        let err = |c: &[u8], k: &[u8]| {
            server_config(pem(c, "cert file 'c.pem'"), pem(k, "file 'k.pem'"), &[]).unwrap_err().to_string()
        };
        let e = err(&key, &key);
        assert!(e.contains("no certificate found in cert file 'c.pem'"), "{e}");
        let e = err(&cert, &cert);
        assert!(e.contains("no private key found in file 'k.pem'"), "{e}");
        let e = err(&cert, &other);
        assert!(e.contains("does not match the certificate"), "{e}");
        let enc = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(err(&cert, enc).contains("encrypted"));
        let junk = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(err(&cert, junk).contains("unsupported private key"));
        let e = root_store(Vec::new(), Some(pem(b"nothing", "CA file 'x'"))).unwrap_err().to_string();
        assert!(e.contains("no certificate found in CA file 'x'"), "{e}");
    }
}
