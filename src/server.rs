//! Starting and stopping a Convo server: opens the store, builds the services, binds
//! the client listener and serves until shut down. Used by `main` and by the tests.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{config::Config, http, service::Services, storage::Store};

/// A server that is up: its address, and how to stop it.
pub struct RunningServer {
    pub client_addr: SocketAddr,
    pub services: Arc<Services>,
    /// A registration token made at first start (token mode, none existed).
    pub first_registration_token: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Opens the database named in `config` and builds the services (also for `convo admin`).
pub async fn open_services(config: Arc<Config>, client_addr: SocketAddr) -> Result<Arc<Services>, String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("data_dir: cannot create {}: {e}", config.data_dir.display()))?;
    let store = Store::open(&config.database.url, config.database.pool_size).await?;
    let baseurl = config.public_baseurl(client_addr);
    Services::new(config, store, baseurl)
}

/// Starts serving; returns once the listener is bound.
pub async fn start(config: Config) -> Result<RunningServer, String> {
    let config = Arc::new(config);
    let listener = TcpListener::bind(config.listeners.client)
        .await
        .map_err(|e| format!("listeners.client: cannot listen on {}: {e}", config.listeners.client))?;
    let client_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let services = open_services(config.clone(), client_addr).await?;
    let first_registration_token = services.ensure_first_registration_token().await.map_err(|e| e.to_string())?;
    if !config.listeners.federation_tls_certificate.as_os_str().is_empty() {
        tracing::warn!("federation is not implemented yet: the federation listener is not started");
    }

    let app = http::router(services.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%client_addr, server_name = %config.server_name, "Convo is listening");
    Ok(RunningServer { client_addr, services, first_registration_token, shutdown: Some(tx), task })
}

impl RunningServer {
    /// Stops accepting, finishes the requests under way, closes the database.
    pub async fn stop(mut self) {
        self.services.begin_shutdown();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
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
