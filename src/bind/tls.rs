//! TLS configs from what Lua code names: PEM files and the system trust store are read here
//! (`proto::tls` builds configs from bytes). Client configs are cached by (CA file, verify,
//! ALPN): loading the system store takes milliseconds, so it happens once per state.

use std::collections::HashMap;
use std::sync::Arc;

use mlua::{Result, Table, Value};
use rustls::pki_types::CertificateDer;

use super::error::misuse;
use super::options::Options;
use crate::proto::tls::{self, Pem};

/// What a client config is built from: the CA file, whether to verify, the ALPN protocols.
type ClientKey = (Option<String>, bool, Vec<Vec<u8>>);

#[derive(Default)]
pub(crate) struct TlsCache {
    system: Option<Vec<CertificateDer<'static>>>,
    clients: HashMap<ClientKey, Arc<rustls::ClientConfig>>,
}

fn read(call: &str, path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| misuse(call, format!("cannot read {what} file '{path}': {e}")))
}

/// A server config from PEM files (`ssl = {cert, key}`), offering `alpn`.
pub(crate) fn server_config(
    call: &str,
    cert: &str,
    key: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>> {
    let (cert_pem, key_pem) = (read(call, cert, "certificate")?, read(call, key, "private key")?);
    let (cert_label, key_label) = (format!("certificate file '{cert}'"), format!("file '{key}'"));
    tls::server_config(
        Pem { bytes: &cert_pem, label: &cert_label },
        Pem { bytes: &key_pem, label: &key_label },
        alpn,
    )
    .map_err(|e| misuse(call, e))
}

/// `tls = {cert = PATH, key = PATH}` of a server.
pub(crate) fn server_options(
    call: &'static str,
    table: Table,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>> {
    let opts = Options::new(call, Value::Table(table), &["cert", "key"])?;
    let (Some(cert), Some(key)) = (opts.string("cert")?, opts.string("key")?) else {
        return Err(misuse(call, "TLS needs both 'cert' and 'key' (PEM file paths)"));
    };
    server_config(call, &cert, &key, alpn)
}

impl TlsCache {
    /// A client config: servers verified against the system store plus `ca` (a PEM file), or
    /// with `verify = false` not at all.
    pub fn client(
        &mut self,
        call: &str,
        ca: Option<&str>,
        verify: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>> {
        let key = (ca.map(str::to_owned), verify, alpn.iter().map(|p| p.to_vec()).collect());
        if let Some(config) = self.clients.get(&key) {
            return Ok(config.clone());
        }
        let roots = if verify {
            let system =
                self.system.get_or_insert_with(|| rustls_native_certs::load_native_certs().certs).clone();
            let extra = ca.map(|path| {
                Ok::<_, mlua::Error>((read(call, path, "CA certificate")?, format!("CA file '{path}'")))
            });
            let extra = extra.transpose()?;
            let pem = extra.as_ref().map(|(bytes, label)| Pem { bytes, label });
            Some(tls::root_store(system, pem).map_err(|e| misuse(call, e))?)
        } else {
            None
        };
        let config = tls::client_config(roots, alpn);
        self.clients.insert(key, config.clone());
        Ok(config)
    }
}
