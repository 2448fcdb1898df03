//! The identity listener: one port that a `Refuse` fault closes and its end reopens.
//!
//! Closing must take effect before `inject_fault` returns, so the gate keeps a second handle on
//! the listening socket and shuts it down directly (on Linux new connections are then refused at
//! once and any not yet accepted are reset); the serve task is told to stop and drain its
//! connections. Reopening binds the same port again (SO_REUSEADDR) synchronously, so clients
//! can connect as soon as `clear_faults` returns. The gate never owns the handler: the caller
//! passes it to [`Gate::open`].

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Mutex;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{lock, SHUTDOWN_GRACE};
use crate::server::{serve, ConnLimits, Shutdown};

pub(crate) struct Gate {
    addr: SocketAddr,
    runtime: Handle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bound by [`Gate::bind`], not served yet.
    fresh: Option<StdListener>,
    /// While serving: a second handle on the listening socket, and the serve loop's stop signal.
    serving: Option<(StdListener, Shutdown)>,
    stopped: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Gate {
    /// Binds the port (so that `addr()` is known) without serving it yet.
    pub(crate) fn bind(listen: SocketAddr, runtime: Handle) -> io::Result<Gate> {
        let listener = StdListener::bind(listen)?;
        Ok(Gate {
            addr: listener.local_addr()?,
            runtime,
            state: Mutex::new(State {
                fresh: Some(listener),
                ..State::default()
            }),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `handler` on the port unless it is already served or the gate was stopped.
    pub(crate) fn open<H, F, B>(&self, handler: H) -> io::Result<()>
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut state = lock(&self.state);
        if state.stopped || state.serving.is_some() {
            return Ok(());
        }
        let listener = match state.fresh.take() {
            Some(l) => l,
            // std binds with SO_REUSEADDR on unix, so the port is free again at once.
            None => StdListener::bind(self.addr)?,
        };
        listener.set_nonblocking(true)?;
        let handle = listener.try_clone()?;
        let listener = {
            let _runtime = self.runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let epoch = Shutdown::new();
        let task = self.runtime.spawn(serve(
            listener,
            None,
            handler,
            ConnLimits::default(),
            epoch.clone(),
            SHUTDOWN_GRACE,
        ));
        state.tasks.retain(|t| !t.is_finished());
        state.tasks.push(task);
        state.serving = Some((handle, epoch));
        tracing::debug!(addr = %self.addr, "identity listener open");
        Ok(())
    }

    /// Stops accepting: new connections are refused, open ones drain and close.
    pub(crate) fn close(&self) {
        let serving = lock(&self.state).serving.take();
        if let Some((socket, epoch)) = serving {
            // Stop signal first: the serve loop, woken by the shut socket's failing accept, then
            // sees it and ends instead of reporting the accept error.
            epoch.trigger();
            Self::shut(&socket);
            tracing::debug!(addr = %self.addr, "identity listener closed");
        }
    }

    /// Closes for good and hands back the serve tasks, to be awaited.
    pub(crate) fn stop(&self) -> Vec<JoinHandle<()>> {
        self.close();
        let mut state = lock(&self.state);
        state.stopped = true;
        state.fresh = None;
        std::mem::take(&mut state.tasks)
    }

    fn shut(socket: &StdListener) {
        // Not supported on every platform; the serve loop's stop signal then closes the socket.
        let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
    }
}
