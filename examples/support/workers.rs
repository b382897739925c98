//! What the bench's floor proxies share: the command line
//! `LISTEN UPSTREAM [WORKERS]`, and anteroom's threading, `WORKERS`
//! single-threaded runtimes, each with its own `SO_REUSEPORT` listener.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};

/// Run the proxy `name`. On each worker thread `worker(upstream)` makes the
/// worker's state and returns what serves one accepted connection.
pub fn run<W, C, F>(name: &str, worker: W)
where
    W: Fn(&'static str) -> C + Send + Copy + 'static,
    C: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {name} LISTEN UPSTREAM [WORKERS]");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN is host:port");
    let upstream: &'static str = Box::leak(args[2].clone().into_boxed_str());
    let workers: usize = args.get(3).and_then(|w| w.parse().ok()).unwrap_or(2);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let socket = TcpSocket::new_v4().expect("socket");
                    socket.set_reuseaddr(true).expect("reuseaddr");
                    socket.set_reuseport(true).expect("reuseport");
                    socket.bind(listen).expect("bind");
                    let listener = socket.listen(1024).expect("listen");
                    let serve = worker(upstream);
                    loop {
                        let Ok((stream, peer)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve(stream, peer));
                    }
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
