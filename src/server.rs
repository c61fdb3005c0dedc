//! Starting and stopping a Convo server: locks the data dir, opens the store (checking
//! that it belongs to this server name), builds the services, binds the client listener
//! (and the federation listener, over TLS, when its certificate and key are set) and
//! serves until shut down. Used by `main` and by the tests.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    config::Config,
    http::{
        self,
        transport::{self, Connections, TransportLimits},
    },
    service::Services,
    storage::Store,
};

/// A server that is up: its address, and how to stop it.
pub struct RunningServer {
    pub client_addr: SocketAddr,
    /// The federation listener's address, when federation is on.
    pub federation_addr: Option<SocketAddr>,
    pub services: Arc<Services>,
    /// A registration token made at first start (token mode, none existed).
    pub first_registration_token: Option<String>,
    /// The client connections open now.
    pub connections: Connections,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    federation_shutdown: Option<oneshot::Sender<()>>,
    federation_task: Option<JoinHandle<std::io::Result<()>>>,
    /// The exclusive lock on the data dir, released when the server is dropped.
    _data_dir_lock: File,
}

/// Opens the database named in `config` and builds the services (also for `convo admin`).
/// Refuses a database that belongs to another server name.
pub async fn open_services(config: Arc<Config>, client_addr: SocketAddr) -> Result<Arc<Services>, String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("data_dir: cannot create {}: {e}", config.data_dir.display()))?;
    let acquire_timeout = Duration::from_millis(config.database.acquire_timeout_ms);
    let store = Store::open_with(&config.database.url, config.database.pool_size, acquire_timeout).await?;
    let recorded = store.record_server_name(config.server_name.as_str()).await.map_err(|e| e.to_string())?;
    if recorded != config.server_name.as_str() {
        store.close().await;
        return Err(format!(
            "server_name is `{}`, but this database (database.url) belongs to server name `{recorded}`. \
             A server name cannot change once the server has data: every user id ends in it. \
             Set server_name back to `{recorded}`, or give `{}` a new database and data_dir.",
            config.server_name, config.server_name
        ));
    }
    let baseurl = config.public_baseurl(client_addr);
    Services::new(config, store, baseurl)
}

/// Takes the exclusive lock on `data_dir` (`convo.lock`, which then holds this process
/// id), so that a second server on the same data refuses to start. The lock is an
/// `flock` on an open file: it conflicts with any other open of the file, in this
/// process as in others, and the system releases it when the process ends, however it
/// ends. `convo admin` commands do not take it.
fn lock_data_dir(dir: &Path) -> Result<File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("data_dir: cannot create {}: {e}", dir.display()))?;
    let path = dir.join("convo.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("data_dir: cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| write!(file, "{}", std::process::id()));
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (process {pid})"),
            };
            Err(format!(
                "data_dir {} is in use by another Convo server{holder}: two servers on one data dir would \
                 corrupt each other's rooms. Stop the other server first, or give this one another data_dir.",
                dir.display()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("data_dir: cannot lock {}: {e}", path.display())),
    }
}

/// Lets the process open as many files as the system allows it (the soft limit is
/// often 1,024, the hard one far higher): every connection is one. Warns when even
/// that is below `limits.max_connections`.
fn raise_open_files_limit(max_connections: u32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit only read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // Room for the database, the log and the listener.
        if limit.rlim_cur < u64::from(max_connections) + 64 {
            tracing::warn!(
                open_files = limit.rlim_cur,
                max_connections,
                "the process may open fewer files than limits.max_connections needs: raise its open-files \
                 limit (ulimit -n, systemd LimitNOFILE) or lower limits.max_connections"
            );
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = max_connections;
}

/// The federation listener's TLS setup: the PEM certificate chain and private key of
/// `listeners.federation_tls_certificate` and `federation_tls_key`, HTTP/1.1 only.
fn tls_acceptor(certificate: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("listeners.federation_tls_certificate: cannot read {}: {e}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "listeners.federation_tls_certificate: {} holds no PEM certificate",
            certificate.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!("listeners.federation_tls_key: cannot read a PEM private key from {}: {e}", key.display())
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| format!("listeners.federation_tls_certificate / federation_tls_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Starts serving; returns once the listener is bound.
pub async fn start(config: Config) -> Result<RunningServer, String> {
    let config = Arc::new(config);
    let data_dir_lock = lock_data_dir(&config.data_dir)?;
    raise_open_files_limit(config.limits.max_connections);
    let listener = TcpListener::bind(config.listeners.client)
        .await
        .map_err(|e| format!("listeners.client: cannot listen on {}: {e}", config.listeners.client))?;
    let client_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let services = open_services(config.clone(), client_addr).await?;
    let first_registration_token = services.ensure_first_registration_token().await.map_err(|e| e.to_string())?;
    services.start_federation_sender().await.map_err(|e| format!("federation queues: {e}"))?;
    services.start_push_sender().await.map_err(|e| format!("push queues: {e}"))?;
    let federation_listener = if config.listeners.federation_tls_certificate.as_os_str().is_empty() {
        None
    } else {
        let tls = tls_acceptor(&config.listeners.federation_tls_certificate, &config.listeners.federation_tls_key)?;
        let listener = TcpListener::bind(config.listeners.federation)
            .await
            .map_err(|e| format!("listeners.federation: cannot listen on {}: {e}", config.listeners.federation))?;
        Some((listener, tls))
    };

    let app = http::router(services.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let (connections, serving) = transport::serve(listener, app, TransportLimits::from(&config.limits), async {
        let _ = rx.await;
    });
    let task = tokio::spawn(serving);
    tracing::info!(%client_addr, server_name = %config.server_name, "Convo is listening");
    let (mut federation_addr, mut federation_shutdown, mut federation_task) = (None, None, None);
    if let Some((listener, tls)) = federation_listener {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel::<()>();
        let (_, serving) = transport::serve_tls(
            listener,
            tls,
            http::federation_router(services.clone()),
            TransportLimits::from(&config.limits),
            async {
                let _ = rx.await;
            },
        );
        federation_task = Some(tokio::spawn(serving));
        federation_shutdown = Some(tx);
        federation_addr = Some(addr);
        tracing::info!(%addr, "federation is listening (TLS)");
    }
    Ok(RunningServer {
        client_addr,
        federation_addr,
        federation_shutdown,
        federation_task,
        services,
        first_registration_token,
        connections,
        shutdown: Some(tx),
        task,
        _data_dir_lock: data_dir_lock,
    })
}

impl RunningServer {
    /// Stops accepting, finishes the requests under way, closes the database.
    pub async fn stop(mut self) {
        self.services.begin_shutdown();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.federation_shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(task) = self.federation_task.take() {
            let _ = task.await;
        }
        self.services.store.close().await;
    }

    /// Serves until the task ends (Ctrl-C handling is the caller's).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
