//! TLS credential objects (QEMU's `tls-creds-x509`): a directory of PEM files with
//! QEMU's names, loaded once when the object is added into a rustls configuration for
//! its endpoint. The NBD server (`tls-creds` of nbd-server-start) takes the server
//! ones, the `nbd` driver the client ones; [`crate::nbd_stream::Stream::start_tls`]
//! runs the handshake.
//!
//! - `ca-cert.pem` (always required, as in QEMU): the CAs the peer's certificate must
//!   chain to when `verify-peer=on`; `ca-crl.pem` (optional): revoked certificates
//! - server: `server-cert.pem` (the chain, leaf first) and `server-key.pem`; with
//!   `verify-peer=on` (the default) clients must present a certificate of the CA
//! - client: `client-cert.pem` and `client-key.pem` (optional, presented when both
//!   exist); with `verify-peer=on` the server's certificate is checked against the CA
//!   and its name against the host name (`tls-hostname`, or an inet server's host;
//!   without one the connection is refused, as in QEMU)
//!
//! TLS 1.3 and 1.2 with rustls's default cipher suites (ring's primitives).

use crate::options;
use crate::options::coerce::Fields;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why credentials cannot be loaded or used; QEMU's texts where it has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("Missing 'dir' property value")]
    NoDir,
    #[error("Unable to access credentials {path}: {reason}")]
    Access { path: String, reason: String },
    #[error("Unable to import {what} {path}: {reason}")]
    Import {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("Cannot load certificate '{cert}' & key '{key}': {reason}")]
    CertKey {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("No TLS credentials with id '{0}'")]
    NotFound(String),
    #[error("Expected TLS credentials for a {0} endpoint")]
    Endpoint(&'static str),
    #[error("Invalid TLS host name '{0}'")]
    HostName(String),
    #[error("Cannot set up TLS: {0}")]
    Config(String),
    #[error("No hostname for certificate validation")]
    NoHostName,
}

pub type Result<T> = std::result::Result<T, TlsError>;

/// `endpoint`: which side of a connection the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    #[default]
    Client,
    Server,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// The options of `--object tls-creds-x509,...` / `object-add qom-type=tls-creds-x509`
/// (`qom-type` and `id` taken by the object layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredsOptions {
    pub id: String,
    pub dir: Option<PathBuf>,
    pub endpoint: Endpoint,
    /// `verify-peer` (default on)
    pub verify_peer: bool,
    /// `priority` (GnuTLS priority strings): kept for qom-get; rustls's defaults apply.
    pub priority: Option<String>,
    /// `sanity-check` (default on): kept for qom-get; webpki checks the certificates
    /// it uses either way.
    pub sanity_check: bool,
}

impl TlsCredsOptions {
    /// Takes the object's own options from `f`; `id` was taken already.
    pub fn take_from(f: &mut Fields, id: String) -> options::Result<Self> {
        let endpoint = f
            .enumeration(
                "endpoint",
                &[("client", Endpoint::Client), ("server", Endpoint::Server)],
            )?
            .unwrap_or_default();
        let dir = f.string("dir")?.map(PathBuf::from);
        let verify_peer = f.bool("verify-peer")?.unwrap_or(true);
        let priority = f.string("priority")?;
        let sanity_check = f.bool("sanity-check")?.unwrap_or(true);
        if let Some(p) = f.string("passwordid")? {
            return Err(options::OptionsError::BadValue {
                name: "passwordid".into(),
                reason: format!("encrypted keys are not supported (secret '{p}')"),
            });
        }
        Ok(TlsCredsOptions {
            id,
            dir,
            endpoint,
            verify_peer,
            priority,
            sanity_check,
        })
    }
}

/// Loaded credentials.
#[derive(Debug)]
pub struct TlsCreds {
    pub opts: TlsCredsOptions,
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
}

/// What a client connection needs: the configuration and the name to verify.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsCreds {
    /// The server configuration (`Expected TLS credentials for a server endpoint` for
    /// client credentials).
    pub fn server(&self) -> Result<Arc<ServerConfig>> {
        self.server.clone().ok_or(TlsError::Endpoint("server"))
    }

    /// A client's configuration for a server of this host name (none: only
    /// without `verify-peer`, which would check it).
    pub fn client(&self, hostname: Option<&str>) -> Result<ClientTls> {
        let config = self.client.clone().ok_or(TlsError::Endpoint("client"))?;
        let name = match hostname {
            Some(h) => ServerName::try_from(h.to_string())
                .map_err(|_| TlsError::HostName(h.to_string()))?,
            None if self.opts.verify_peer => return Err(TlsError::NoHostName),
            // Not checked, and not sent (an address is never sent as SNI).
            None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        };
        Ok(ClientTls { config, name })
    }

    fn load(opts: &TlsCredsOptions) -> Result<TlsCreds> {
        let dir = opts.dir.as_deref().ok_or(TlsError::NoDir)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_path = required(dir, "ca-cert.pem")?;
        let roots = Arc::new(load_roots(&ca_path)?);
        let crls = match optional(dir, "ca-crl.pem") {
            Some(p) => CertificateRevocationListDer::pem_file_iter(&p)
                .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| import("CRL", &p, e))?,
            None => Vec::new(),
        };
        let mut creds = TlsCreds {
            opts: opts.clone(),
            server: None,
            client: None,
        };
        let versions = rustls::DEFAULT_VERSIONS;
        match opts.endpoint {
            Endpoint::Server => {
                let cert = required(dir, "server-cert.pem")?;
                let key = required(dir, "server-key.pem")?;
                let (chain, key_der) = load_pair(&cert, &key)?;
                let builder = ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(versions)
                    .map_err(config_error)?;
                let builder = if opts.verify_peer {
                    let v = WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .with_crls(crls)
                        .build()
                        .map_err(|e| import("CA certificate list", &ca_path, e))?;
                    builder.with_client_cert_verifier(v)
                } else {
                    builder.with_no_client_auth()
                };
                let config = builder
                    .with_single_cert(chain, key_der)
                    .map_err(|e| cert_key(&cert, &key, e))?;
                creds.server = Some(Arc::new(config));
            }
            Endpoint::Client => {
                let pair = match (
                    optional(dir, "client-cert.pem"),
                    optional(dir, "client-key.pem"),
                ) {
                    (Some(c), Some(k)) => Some((load_pair(&c, &k)?, c, k)),
                    _ => None,
                };
                let webpki = if opts.verify_peer {
                    Some(
                        WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                            .with_crls(crls)
                            .build()
                            .map_err(|e| import("CA certificate list", &ca_path, e))?,
                    )
                } else {
                    None
                };
                let verifier = Arc::new(PeerVerifier {
                    webpki,
                    algs: provider.signature_verification_algorithms,
                });
                let builder = ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(versions)
                    .map_err(config_error)?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier);
                let config = match pair {
                    Some(((chain, key), c, k)) => builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| cert_key(&c, &k, e))?,
                    None => builder.with_no_client_auth(),
                };
                creds.client = Some(Arc::new(config));
            }
        }
        Ok(creds)
    }
}

/// `dir/name`, which must be there (QEMU's error if it cannot be accessed).
fn required(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    match std::fs::metadata(&p) {
        Ok(_) => Ok(p),
        Err(e) => Err(TlsError::Access {
            path: p.display().to_string(),
            reason: crate::error::io_error_text(&e),
        }),
    }
}

/// `dir/name` if it is there.
fn optional(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    std::fs::metadata(&p).is_ok().then_some(p)
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

fn import(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Import {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn cert_key(cert: &Path, key: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::CertKey {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason: e.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| import("CA certificate list", path, e))?;
    if certs.is_empty() {
        return Err(import("CA certificate list", path, "no certificate found"));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| import("CA certificate list", path, e))?;
    }
    Ok(roots)
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_pair(cert: &Path, key: &Path) -> Result<Pair> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| cert_key(cert, key, e))?;
    if chain.is_empty() {
        return Err(cert_key(cert, key, "no certificate found"));
    }
    let k = PrivateKeyDer::from_pem_file(key).map_err(|e| cert_key(cert, key, e))?;
    Ok((chain, k))
}

/// The client's check of the server: webpki against the CA and the name with
/// `verify-peer=on`, nothing without; handshake signatures always.
#[derive(Debug)]
struct PeerVerifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match &self.webpki {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The loaded credentials, by id. Cheap to clone (all clones share the table); the
/// object layer adds and removes, the NBD server and driver look up.
#[derive(Clone, Default, Debug)]
pub struct TlsCredsTable {
    map: Arc<Mutex<BTreeMap<String, Arc<TlsCreds>>>>,
}

impl TlsCredsTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<TlsCreds>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the credentials and adds them (the caller has checked the id is free).
    pub fn add(&self, opts: &TlsCredsOptions) -> Result<()> {
        let creds = Arc::new(TlsCreds::load(opts)?);
        self.lock().insert(opts.id.clone(), creds);
        Ok(())
    }

    /// Removes credentials; whether they existed. Servers and connections that took
    /// them keep them, as in QEMU.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn get(&self, id: &str) -> Result<Arc<TlsCreds>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| TlsError::NotFound(id.to_string()))
    }

    /// Every credentials object, by id.
    pub fn all(&self) -> Vec<Arc<TlsCreds>> {
        self.lock().values().cloned().collect()
    }
}
