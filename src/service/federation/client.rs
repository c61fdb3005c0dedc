//! The outbound federation client: one reqwest client over rustls (ring) that sends
//! typed ruma requests to other servers, each signed with `X-Matrix` when its endpoint
//! says so. Where to connect comes from `discovery::Resolver`; the addresses actually
//! connected to are pinned per request (a custom DNS resolver), so the private-address
//! rule holds for them. Response bodies are read up to `federation.max_response_body`.
//! It knows nothing of keys or events: callers choose what to send.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    ServerName,
    api::{
        IncomingResponseExt, OutgoingRequest, OutgoingRequestExt,
        auth_scheme::{AuthScheme, NoAuthentication},
        error::{ErrorBody, ErrorKind, FromHttpResponseError},
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
    },
    signatures::Ed25519KeyPair,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, ServerName as TlsServerName, UnixTime, pem::PemObject};

use super::discovery::{Destination, Resolver, Settings, is_public};
use crate::{
    config::Federation as FederationConfig,
    error::{Error, RemoteError, Result},
};

/// How an endpoint's authentication scheme is filled in for an outbound request.
pub trait OutboundAuth: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a>;
}

impl OutboundAuth for ServerSignatures {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a> {
        XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key)
    }
}

impl OutboundAuth for NoAuthentication {
    fn input<'a>(_: &ServerName, _: &ServerName, _: &'a Ed25519KeyPair) -> Self::Input<'a> {}
}

/// The most hosts whose addresses are pinned at once.
const MAX_PINNED_HOSTS: usize = 10_000;

/// Sends requests to other homeservers.
pub struct FederationClient {
    http: reqwest::Client,
    resolver: Resolver,
    pinned: PinnedAddrs,
    max_response_body: u64,
}

/// Host name -> the addresses discovery chose for it (already checked against the
/// private-address rule). reqwest asks `PinnedAddrs` for the addresses of each URL
/// host; a host discovery has not pinned is looked up and filtered by the same rule.
#[derive(Clone)]
struct PinnedAddrs {
    map: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>,
    allow_private: bool,
}

impl reqwest::dns::Resolve for PinnedAddrs {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let pinned = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(name.as_str()).cloned();
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match pinned {
                Some(addrs) => addrs,
                None => tokio::net::lookup_host((host.as_str(), 0))
                    .await?
                    .filter(|a| allow_private || is_public(a.ip()))
                    .collect(),
            };
            if addrs.is_empty() {
                return Err(format!("{host} has no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl FederationClient {
    /// Builds the client from `[federation]`: the system's roots (or Mozilla's when the
    /// system has none) plus `extra_ca_file`, or no verification with `skip_tls_verify`.
    pub fn new(config: &FederationConfig) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("federation TLS: {e}"))?;
        let mut tls = if config.skip_tls_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        } else {
            let extra = if config.extra_ca_file.as_os_str().is_empty() {
                Vec::new()
            } else {
                let path = &config.extra_ca_file;
                CertificateDer::pem_file_iter(path).and_then(|certs| certs.collect::<Result<Vec<_>, _>>()).map_err(
                    |e| format!("config key `federation.extra_ca_file`: cannot read {}: {e}", path.display()),
                )?
            };
            let mut roots = system_roots();
            for cert in extra {
                roots.add(cert).map_err(|e| format!("config key `federation.extra_ca_file`: {e}"))?;
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("federation TLS: {e}"))?;
            builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // `.well-known` lookups trust what federation trusts; the resolver adds its own
        // DNS (with the private-address rule), redirects and timeouts.
        let resolver = Resolver::new(
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls.clone())
                .user_agent(concat!("Convo/", env!("CARGO_PKG_VERSION"))),
            Settings { resolve_names: config.resolve_names, ..Settings::new(config.allow_private_destinations) },
        )
        .map_err(|e| format!("server discovery: {e}"))?;
        let pinned = PinnedAddrs { map: Default::default(), allow_private: config.allow_private_destinations };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(pinned.clone())
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .read_timeout(Duration::from_millis(config.read_timeout_ms))
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Convo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("federation client: {e}"))?;
        Ok(Self { http, resolver, pinned, max_response_body: config.max_response_body })
    }

    /// Whether `server` may be contacted at all (see `Resolver::may_contact`).
    pub fn may_contact(&self, server: &ServerName) -> bool {
        self.resolver.may_contact(server)
    }

    /// Where requests for `server` go (the spec's server discovery).
    pub async fn resolve(&self, server: &ServerName) -> Result<Destination> {
        self.resolver.resolve(server).await
    }

    /// Sends `request` to `destination`, signed as `origin` with `key` when the endpoint
    /// requires it, and parses the answer. An error answer from the other server becomes
    /// `Error::Remote` with its status and errcode (shown to clients as `Error::relayed`
    /// says); failing to reach it or a bad answer is `502 M_UNKNOWN`.
    pub async fn send<T>(
        &self,
        origin: &ServerName,
        key: &Ed25519KeyPair,
        destination: &ServerName,
        request: T,
    ) -> Result<T::IncomingResponse>
    where
        T: OutgoingRequest<EndpointError = ruma::api::error::Error, PathBuilder = ruma::api::path_builder::SinglePath>
            + Send,
        T::Authentication: OutboundAuth,
    {
        self.send_with_limit(origin, key, destination, request, None).await
    }

    /// `send`, with the response body cut at `limit` bytes (media) instead of
    /// `federation.max_response_body`: past it the answer is `502 M_TOO_LARGE`, and the
    /// rest of the body is not read.
    #[tracing::instrument(skip_all, fields(%destination))]
    pub async fn send_with_limit<T>(
        &self,
        origin: &ServerName,
        key: &Ed25519KeyPair,
        destination: &ServerName,
        request: T,
        limit: Option<u64>,
    ) -> Result<T::IncomingResponse>
    where
        T: OutgoingRequest<EndpointError = ruma::api::error::Error, PathBuilder = ruma::api::path_builder::SinglePath>
            + Send,
        T::Authentication: OutboundAuth,
    {
        let target = self.resolve(destination).await?;
        let host =
            if target.tls_name.contains(':') { format!("[{}]", target.tls_name) } else { target.tls_name.clone() };
        if !target.addrs.is_empty() {
            let mut pinned = self.pinned.map.lock().unwrap_or_else(|e| e.into_inner());
            // Any server name can be made up: the map must not grow without end (a
            // host dropped here is pinned again by its next request).
            if pinned.len() >= MAX_PINNED_HOSTS && !pinned.contains_key(&target.tls_name) {
                pinned.clear();
            }
            pinned.insert(target.tls_name.clone(), target.addrs.clone());
        }
        let base = format!("https://{host}:{}", target.port);
        let auth = <T::Authentication as OutboundAuth>::input(origin, destination, key);
        let http_request: http::Request<Vec<u8>> = request
            .try_into_http_request(&base, auth, ())
            .map_err(|e| Error::internal(format!("cannot build a request to {destination}: {e}")))?;
        let (parts, body) = http_request.into_parts();
        let url = parts.uri.to_string();
        let mut outbound = self.http.request(parts.method, url).headers(parts.headers).body(body);
        if target.host_header != format!("{host}:{}", target.port) {
            outbound = outbound.header(http::header::HOST, &target.host_header);
        }
        let response =
            outbound.send().await.map_err(|e| Error::federation(format!("{destination}: {}", describe(&e))))?;
        let status = response.status();
        // The headers too: a media answer's `Content-Type` names its multipart boundary.
        let headers = response.headers().clone();
        let body = self.read_body(destination, response, limit).await?;
        let mut http_response = http::Response::builder()
            .status(status)
            .body(body.as_slice())
            .map_err(|e| Error::federation(format!("{destination}: bad response: {e}")))?;
        *http_response.headers_mut() = headers;
        T::IncomingResponse::try_from_http_response(http_response).map_err(|e| match e {
            FromHttpResponseError::Server(error) => remote_error(destination, error),
            other => Error::federation(format!(
                "{destination} answered something that is not the expected response: {other}"
            )),
        })
    }

    /// Reads a response body up to `limit` bytes (else `max_response_body`).
    async fn read_body(
        &self,
        destination: &ServerName,
        mut response: reqwest::Response,
        limit: Option<u64>,
    ) -> Result<Vec<u8>> {
        let media = limit.is_some();
        let limit = limit.unwrap_or(self.max_response_body);
        let too_large = |limit: u64| {
            let message = format!("{destination} sent a response over {limit} bytes");
            if media {
                Error::matrix(http::StatusCode::BAD_GATEWAY, ErrorKind::TooLarge, message)
            } else {
                Error::federation(message)
            }
        };
        if response.content_length().is_some_and(|length| length > limit) {
            return Err(too_large(limit));
        }
        let mut body = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|e| Error::federation(format!("{destination}: {}", describe(&e))))?
        {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Another server's error answer, kept whole (`Error::Remote`): callers can tell a
/// refusal from a failure, and clients see it relayed (`404 M_NOT_FOUND`) or as `502`.
fn remote_error(destination: &ServerName, error: ruma::api::error::Error) -> Error {
    let (kind, errcode, message) = match error.body {
        ErrorBody::Standard(body) => {
            let errcode = body.kind.errcode().to_string();
            (body.kind, errcode, body.message)
        }
        _ => (ErrorKind::Unknown, "(no Matrix error)".to_owned(), String::new()),
    };
    Error::Remote(Box::new(RemoteError {
        server: destination.to_string(),
        status: error.status_code,
        kind,
        errcode,
        message,
    }))
}

/// The system's trusted CA certificates, or Mozilla's (`webpki-roots`) when the
/// system has none (a container without `ca-certificates`).
pub(crate) fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::info!("no CA certificates found on the system: trusting the Mozilla roots built into Convo");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// A reqwest error with its causes (TLS failures hide in the chain).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `federation.skip_tls_verify`: accepts any certificate (the handshake's signatures
/// are still checked, so the connection is encrypted, just not authenticated).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &TlsServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
