//! Wiring: bind listeners, build the store, spawn the servers and background tasks, and
//! drain on shutdown.
//!
//! [`start`] takes already-bound listeners so tests bind `127.0.0.1:0`; [`run`] is what
//! `rollgate run` does: bind from the config, serve until SIGTERM/SIGINT, drain, return.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::control::admin::{self, Admin};
use crate::control::alerts::Alerts;
use crate::control::audit::Audit;
use crate::control::reload::{self, Reloader};
use crate::control::state;
use crate::evaluator::{self, Controller};
use crate::proxy::server::{self, CertStore};
use crate::proxy::service::{self, ConnInfo, Shared};
use crate::routing::store::Store;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::prom::Metrics;
use crate::telemetry::Telemetry;

/// Listeners bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
    /// `health_listen`: probes and metrics only.
    pub health: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let data = TcpListener::bind(config.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("listen {}: {e}", config.listen)))?;
        let admin = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("admin.listen {}: {e}", config.admin.listen),
            )
        })?;
        let health = match config.health_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("health_listen {a}: {e}")))?,
            ),
            None => None,
        };
        Ok(Listeners {
            data,
            admin,
            health,
        })
    }
}

/// How long the admin and health listeners' clients may stop reading.
const CONTROL_WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the data plane's connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlane {
    /// On the runtime that calls [`start`] (tests, the demo).
    Inline,
    /// On this many threads, each with its own single-threaded runtime accepting from a
    /// duplicate of the data socket: a connection, its requests and its upstream
    /// connections stay on one thread, with no work stealing or cross-thread wake-ups
    /// (the thread-per-core model of nginx, HAProxy and Pingora). The control plane
    /// (admin, evaluator, health checks, reload) keeps the caller's runtime.
    Workers(usize),
}

/// How long shutdown waits for alerts and follow-up records after the drain: one webhook's
/// attempts with their back-off ([`crate::control::alerts`]) fit.
pub const FINISH: Duration = Duration::from_secs(8);

/// How long shutdown waits for the access log's last lines to be written.
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(2);

/// A started rollgate.
#[derive(Debug)]
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub controller: Arc<Controller>,
    pub reloader: Arc<Reloader>,
    admin: Arc<Admin>,
    /// Stops the data plane (first, so it drains while probes still answer).
    stop_data: watch::Sender<bool>,
    /// Stops the control listeners and background tasks, once the data plane drained.
    stop: watch::Sender<bool>,
    data_task: JoinHandle<()>,
    control_tasks: Vec<JoinHandle<()>>,
}

/// Starts serving on `listeners` with `config`, the data plane on the caller's runtime.
pub async fn start(config: Config, listeners: Listeners) -> io::Result<Running> {
    start_on(config, listeners, DataPlane::Inline).await
}

/// Starts serving on `listeners` with `config`, the data plane where `plane` says.
pub async fn start_on(
    config: Config,
    listeners: Listeners,
    plane: DataPlane,
) -> io::Result<Running> {
    let data_addr = listeners.data.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let health_addr = match &listeners.health {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let certs = match &config.tls {
        Some(files) => Some(CertStore::load(&files.cert, &files.key)?),
        None => None,
    };
    let tls = certs.as_ref().map(CertStore::acceptor);
    let drain = config.drain_timeout;
    let interval = config.evaluator.interval;
    let telemetry = Arc::new(Telemetry::new(config.evaluator.window));
    let metrics = Metrics::new(telemetry.clone());
    let metrics = Arc::new(match config.fleet {
        Some(_) => metrics.with_fleet(),
        None => metrics,
    });
    let fleet_config = config.fleet.clone();
    // Started before anything serves, so a file that cannot be opened fails the start.
    let access_log = match &config.access_log {
        Some(c) => Some(Arc::new(AccessLog::new(
            c,
            metrics.access_log_dropped.clone(),
        )?)),
        None => None,
    };
    if let DataPlane::Workers(n) = plane {
        crate::proxy::client::set_data_workers(n);
    }
    let state_dir = config.state_dir.clone();
    // Quarantines and rollout progress survive restarts; a quarantine whose version changed
    // fingerprint since is lifted by `compile`.
    let mut runtime = state::load(&state_dir)?;
    let _ = crate::decision::prune(&mut runtime, &config);
    let audit = Arc::new(Audit::open(&state_dir)?);
    // The last passed drill survives restarts in the audit log; so does its metric.
    let last_drill = crate::control::check::last_drills(&state_dir)
        .into_iter()
        .filter_map(|(_, at)| at.duration_since(std::time::UNIX_EPOCH).ok())
        .max();
    if let Some(at) = last_drill {
        metrics.rollback_drill_timestamp.set(at.as_secs_f64());
    }
    let store = Arc::new(Store::new(config, runtime, telemetry.clone(), metrics)?);
    let controller = Arc::new(Controller::new(
        store.clone(),
        audit,
        Alerts::new()?,
        state_dir,
    ));
    controller.reconcile().await;
    let reloader = Arc::new(Reloader::new(controller.clone(), certs)?);
    // The request path finds it through `access_log::current()`; a reload may replace it.
    reloader.set_access_log(access_log);
    let (stop, stop_rx) = watch::channel(false);
    // A replica in a fleet takes the fleet's state before it serves, when the store
    // answers within JOIN_TIMEOUT; it never waits longer (SPEC section 10).
    let fleet = match fleet_config {
        Some(fc) => {
            let last = controller
                .store
                .runtime_state()
                .last_command
                .and_then(|l| l.fleet);
            let fleet = Arc::new(crate::fleet::Fleet::new(
                fc,
                &controller.state_dir,
                interval,
                last,
            )?);
            controller.set_fleet(fleet.clone());
            fleet.join(&controller).await;
            Some(fleet)
        }
        None => None,
    };
    let (stop_data, stop_data_rx) = watch::channel(false);

    let shared = Arc::new(Shared::new(store.clone(), usize::MAX));
    let handler =
        move |peer, tls, req| service::handle(shared.clone(), ConnInfo { peer, tls }, req);
    // A client that stops reading is cut off after the longest route idle timeout.
    let write_stall: server::WriteStall = {
        let store = store.clone();
        Arc::new(move || {
            let table = store.load();
            table
                .routes
                .iter()
                .map(|r| r.config.timeouts.idle)
                .max()
                .unwrap_or(CONTROL_WRITE_STALL)
        })
    };
    let data_task = match plane {
        DataPlane::Inline => tokio::spawn(server::serve(
            listeners.data,
            tls,
            handler,
            write_stall,
            stop_data_rx,
            drain,
            server::Plane::Data,
        )),
        DataPlane::Workers(n) => spawn_workers(
            n,
            listeners.data,
            tls,
            handler,
            write_stall,
            stop_data_rx,
            drain,
        )?,
    };

    let admin = Arc::new(Admin::new(controller.clone(), reloader.clone()));
    let mut control_tasks = Vec::new();
    let a = admin.clone();
    control_tasks.push(tokio::spawn(server::serve(
        listeners.admin,
        None,
        move |peer, _tls, req| {
            let admin = a.clone();
            async move { admin::handle(&admin, peer, req).await }
        },
        Arc::new(|| CONTROL_WRITE_STALL),
        stop_rx.clone(),
        drain,
        server::Plane::Control,
    )));
    if let Some(health) = listeners.health {
        let a = admin.clone();
        control_tasks.push(tokio::spawn(server::serve(
            health,
            None,
            move |_peer, _tls, req| {
                let admin = a.clone();
                async move { admin::handle_health(&admin, req).await }
            },
            Arc::new(|| CONTROL_WRITE_STALL),
            stop_rx.clone(),
            drain,
            server::Plane::Control,
        )));
    }

    // Rotates the telemetry windows so status and the evaluator see recent traffic only.
    let flush = {
        let telemetry = telemetry.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => break,
                    now = tick.tick() => telemetry.flush(now),
                }
            }
        })
    };

    let evaluator = tokio::spawn(evaluator::run(controller.clone(), stop_rx.clone()));
    let health = tokio::spawn(evaluator::health::run(controller.clone(), stop_rx.clone()));
    let watch = reload::spawn(reloader.clone(), stop_rx.clone());
    control_tasks.extend([flush, evaluator, health, watch]);
    if let Some(f) = fleet {
        control_tasks.push(tokio::spawn(f.run(controller.clone(), stop_rx.clone())));
    }

    tracing::info!(%data_addr, %admin_addr, generation = store.load().generation, "rollgate serving");
    Ok(Running {
        data_addr,
        admin_addr,
        health_addr,
        store,
        controller,
        reloader,
        admin,
        stop_data,
        stop,
        data_task,
        control_tasks,
    })
}

impl Running {
    /// Fails readiness, stops accepting, lets in-flight requests finish (up to
    /// `drain_timeout`; HTTP/1.1 gets `Connection: close`, HTTP/2 a GOAWAY), then stops
    /// the admin and health listeners (which answer 503 on `/readyz` meanwhile).
    pub async fn shutdown(self) {
        self.admin.accepting.store(false, Ordering::Relaxed);
        let _ = self.stop_data.send(true);
        let _ = self.data_task.await;
        // Everything after the drain shares one budget, ACCESS_LOG_FLUSH + FINISH (the 10 s
        // margin of the deploy manifests' grace period), whatever is stuck: a reload or a
        // command blocked on a hung disk, or a control task waiting behind one.
        let deadline = tokio::time::Instant::now() + ACCESS_LOG_FLUSH + FINISH;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        // A reload under way finishes and no other starts.
        self.reloader.close(left()).await;
        // Every request has ended: the access log's last lines are written before the exit.
        if let Some(log) = self.reloader.take_access_log() {
            let _ = tokio::time::timeout(ACCESS_LOG_FLUSH.min(left()), log.flush()).await;
        }
        // The evaluator keeps deciding while the data plane drains; once it has stopped, the
        // alerts and follow-up records of the last decisions go out before the exit.
        let _ = self.stop.send(true);
        for mut t in self.control_tasks {
            if tokio::time::timeout(left(), &mut t).await.is_err() {
                tracing::error!("shutdown: a control task did not stop in time; abandoning it");
                t.abort();
            }
        }
        self.controller.finish(left()).await;
    }
}

/// Runs the data plane on `n` threads (see [`DataPlane::Workers`]); the returned task ends
/// when every worker has drained.
fn spawn_workers<H, F>(
    n: usize,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    write_stall: server::WriteStall,
    stop: watch::Receiver<bool>,
    drain: std::time::Duration,
) -> io::Result<JoinHandle<()>>
where
    H: Fn(SocketAddr, bool, hyper::Request<hyper::body::Incoming>) -> F
        + Clone
        + Send
        + Sync
        + 'static,
    F: std::future::Future<Output = hyper::Response<crate::proxy::body::RespBody>> + Send + 'static,
{
    let listener = listener.into_std()?;
    let mut threads = Vec::with_capacity(n);
    for index in 0..n.max(1) {
        // Each worker registers its own descriptor for the same socket with its own
        // reactor; the kernel hands each new connection to one of them.
        let socket = listener.try_clone()?;
        let (tls, handler, stop) = (tls.clone(), handler.clone(), stop.clone());
        let write_stall = write_stall.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("rollgate-data-{index}"))
            .spawn(move || {
                crate::proxy::client::enter_worker(index);
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(l) => {
                            let data = server::Plane::Data;
                            server::serve(l, tls, handler, write_stall, stop, drain, data).await
                        }
                        Err(e) => tracing::error!(error = %e, "data worker cannot listen"),
                    }
                });
            })?;
        threads.push(thread);
    }
    Ok(tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    }))
}

/// `rollgate run`: binds from the config, serves until SIGTERM or SIGINT, then drains.
/// The data plane runs on `workers` threads (see [`DataPlane::Workers`]).
pub async fn run(config: Config, workers: usize) -> io::Result<()> {
    // Handlers first: a SIGTERM during start-up drains instead of killing.
    let signal = shutdown_signal()?;
    let listeners = Listeners::bind(&config).await?;
    let running = start_on(config, listeners, DataPlane::Workers(workers)).await?;
    signal.await;
    tracing::info!("shutdown signal received; draining");
    running.shutdown().await;
    tracing::info!("drained; exiting");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, before
/// the future is first polled, so a signal right after start stops cleanly instead of
/// killing the process. Shared by `rollgate run` and `rollgate mock-model`.
pub fn shutdown_signal() -> io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
