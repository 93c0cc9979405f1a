//! A TCP proxy in front of a test server, for client tests that need the
//! network to misbehave: it can cut every connection through it (a network
//! break), refuse new ones for a while (the registry out of reach), and
//! stall the server-to-client direction (a client that stops reading).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy's connections obey.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    /// Connections opened before the last cut end.
    cuts: u64,
    /// New connections are closed at once.
    down: bool,
    /// No byte moves from the server to clients.
    stalled: bool,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections open, by the number of cuts they were opened after.
    open: Open,
    task: JoinHandle<()>,
}

type Open = Arc<Mutex<HashMap<u64, usize>>>;

/// Counts a connection as open until dropped.
struct Opened {
    open: Open,
    cuts: u64,
}

impl Opened {
    fn new(open: &Open, cuts: u64) -> Self {
        *open.lock().unwrap().entry(cuts).or_default() += 1;
        Self {
            open: open.clone(),
            cuts,
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            *open.entry(self.cuts).or_default() -= 1;
        }
    }
}

impl Proxy {
    /// A proxy on a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, rx) = watch::channel(Mode::default());
        let open = Open::default();
        let counted = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = *rx.borrow();
                if mode.down {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let opened = Opened::new(&counted, mode.cuts);
                let rx = rx.clone();
                tokio::spawn(async move {
                    relay(client, server, rx, mode.cuts).await;
                    drop(opened);
                });
            }
        });
        Self {
            addr,
            mode,
            open,
            task,
        }
    }

    /// `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every open connection, and returns once they are closed;
    /// new ones go through.
    pub async fn cut(&self) {
        self.mode.send_modify(|m| m.cuts += 1);
        self.closed().await;
    }

    /// Closes every open connection and refuses new ones until
    /// [`up`](Self::up); returns once they are closed.
    pub async fn down(&self) {
        self.mode.send_modify(|m| {
            m.cuts += 1;
            m.down = true;
        });
        self.closed().await;
    }

    /// Waits until no connection opened before the last cut is open.
    async fn closed(&self) {
        let cuts = self.mode.borrow().cuts;
        for _ in 0..500 {
            let open: usize = {
                let open = self.open.lock().unwrap();
                open.iter()
                    .filter(|(c, _)| **c < cuts)
                    .map(|(_, n)| n)
                    .sum()
            };
            if open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("connections through the proxy still open 5 s after a cut");
    }

    /// Lets connections through again.
    pub fn up(&self) {
        self.mode.send_modify(|m| m.down = false);
    }

    /// Stops moving bytes from the server to clients (the clients' windows
    /// then stop the server) until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.mode.send_modify(|m| m.stalled = true);
    }

    /// Moves bytes again.
    pub fn resume(&self) {
        self.mode.send_modify(|m| m.stalled = false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_modify(|m| m.cuts += 1);
    }
}

/// Relays one connection until either side closes, or a cut after the
/// `cuts` it was opened under.
async fn relay(client: TcpStream, server: TcpStream, mode: watch::Receiver<Mode>, cuts: u64) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async move {
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            server_tx.write_all(&buf[..n]).await?;
        }
    };
    let mut down_mode = mode.clone();
    let down = async move {
        let mut buf = vec![0; 64 << 10];
        loop {
            while down_mode.borrow_and_update().stalled {
                if down_mode.changed().await.is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                n = server_rx.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    client_tx.write_all(&buf[..n]).await?;
                }
                changed = down_mode.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    };
    let mut cut_mode = mode;
    let cut = async move {
        loop {
            if cut_mode.borrow_and_update().cuts != cuts {
                return;
            }
            if cut_mode.changed().await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first drops both halves of both sockets: closed.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        () = cut => {}
    }
}
