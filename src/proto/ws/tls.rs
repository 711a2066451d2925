//! TLS glue over rustls 0.23 (ring provider), sans-IO.
//!
//! Configs: [`TlsServerConfig::from_pem_files`] and [`client_config`]; build them once and
//! share the `Arc` between connections (loading the system trust store takes milliseconds).
//!
//! The pump, [`Tls`], wraps a rustls client or server connection: the driver feeds bytes read
//! from the socket to [`Tls::handle_ciphertext`], passes [`Tls::read_plaintext`] output up to
//! the WebSocket layer, hands plaintext to send to [`Tls::write_plaintext`] (it is buffered
//! while the handshake is still running) and writes whatever [`Tls::take_ciphertext`] yields
//! (poll for writability while [`Tls::wants_write`]). Nothing ever blocks.

use super::Error;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, RootCertStore};
use rustls::{ServerConfig, ServerConnection, SignatureScheme};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::TlsConfig(format!("cannot read {what} file '{}': {e}", path.display())))
}

fn parse_certs(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::TlsConfig(format!("{what} file '{}' is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::TlsConfig(format!(
            "no certificate found in {what} file '{}' (expected a PEM 'BEGIN CERTIFICATE' block)",
            path.display()
        )));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => {
            let text = String::from_utf8_lossy(pem);
            Err(Error::TlsConfig(if text.contains("ENCRYPTED PRIVATE KEY") {
                format!(
                    "private key file '{}' is encrypted; encrypted keys are not supported \
                     (decrypt it with `openssl pkey -in KEY -out KEY.plain`)",
                    path.display()
                )
            } else {
                format!(
                    "no private key found in '{}' (expected a PEM 'PRIVATE KEY', \
                     'RSA PRIVATE KEY' or 'EC PRIVATE KEY' block)",
                    path.display()
                )
            }))
        }
        Err(e) => {
            Err(Error::TlsConfig(format!("private key file '{}' is not valid PEM: {e}", path.display())))
        }
    }
}

/// Server-side TLS configuration loading.
#[derive(Debug, Clone, Copy)]
pub struct TlsServerConfig;

impl TlsServerConfig {
    /// Load a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1; RSA, ECDSA or Ed25519) into a rustls server config using the ring provider.
    /// Errors name the file and the problem (missing file, no certificate, no or unsupported
    /// key, key not matching the certificate).
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Arc<ServerConfig>, Error> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read_file(cert, "certificate")?;
        let key_pem = read_file(key, "private key")?;
        Self::from_pem(&cert_pem, &key_pem, cert, key)
    }

    /// Like [`from_pem_files`](Self::from_pem_files) with the PEM text in memory; the paths
    /// only appear in error messages.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_name: &Path,
        key_name: &Path,
    ) -> Result<Arc<ServerConfig>, Error> {
        let certs = parse_certs(cert_pem, cert_name, "certificate")?;
        let key = parse_key(key_pem, key_name)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TlsConfig(e.to_string()))?
            .with_no_client_auth();
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            Error::TlsConfig(match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "private key '{}' does not match the certificate in '{}'",
                    key_name.display(),
                    cert_name.display()
                ),
                other => format!("unsupported private key in '{}': {other}", key_name.display()),
            })
        })?;
        Ok(Arc::new(config))
    }
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

/// Client-side TLS configuration.
///
/// With `verify = true` the server certificate is checked against the system trust store
/// (rustls-native-certs) plus, if given, the PEM CA certificate(s) in `extra_ca` (for
/// self-signed test setups). With `verify = false` **any** certificate is accepted
/// ([`AcceptAnyServerCert`]): an explicit, insecure opt-out for development; `extra_ca` is
/// then ignored. ALPN offers `http/1.1`.
pub fn client_config(extra_ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, Error> {
    client_config_inner(extra_ca, verify, true)
}

/// Like [`client_config`] but trusting *only* `extra_ca` (no system store), e.g. for tests
/// and private deployments.
pub fn client_config_only_ca(extra_ca: &Path) -> Result<Arc<ClientConfig>, Error> {
    client_config_inner(Some(extra_ca), true, false)
}

fn client_config_inner(
    extra_ca: Option<&Path>,
    verify: bool,
    system_roots: bool,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig(e.to_string()))?;
    let mut config = if verify {
        let mut roots = RootCertStore::empty();
        if system_roots {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
        if let Some(ca) = extra_ca {
            let pem = read_file(ca, "CA certificate")?;
            for cert in parse_certs(&pem, ca, "CA certificate")? {
                roots.add(cert).map_err(|e| {
                    Error::TlsConfig(format!("CA file '{}' holds an unusable certificate: {e}", ca.display()))
                })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
        let c = ServerConnection::new(config).map_err(|e| Error::Tls(describe_tls_error(&e)))?;
        Ok(Self::wrap(c.into()))
    }

    /// A client session for `host`: a DNS name (sent as SNI and verified) or an IP literal
    /// without brackets (no SNI; verified against the certificate's IP addresses).
    pub fn client(config: Arc<ClientConfig>, host: &str) -> Result<Self, Error> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| Error::InvalidUrl(format!("'{host}' is not a valid TLS server name")))?;
        let c = ClientConnection::new(config, name).map_err(|e| Error::Tls(describe_tls_error(&e)))?;
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
                Err(e) => return Err(self.fail(Error::Tls(e.to_string()))),
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
                let e = Error::Tls(describe_tls_error(&e));
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
                return Err(self.fail(Error::Tls(e.to_string())));
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
        if self.plain_in.capacity() > super::pipe::SHRINK_THRESHOLD {
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
        self.conn.writer().write_all(data).map_err(|e| Error::Tls(e.to_string()))
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
}
