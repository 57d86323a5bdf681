//! The cheapest relay there is, to measure what any proxy in the path must cost.
//!
//! One blocking thread per direction and connection: `recv` from one side, `send` to the
//! other, nothing else (no event loop, no parsing, no buffers beyond one per thread). A
//! relayed round trip costs it two system calls per direction and two wake-ups, the least
//! a user-space relay can do on loopback TCP; what a real proxy adds to a `NOOP` round trip
//! beyond this relay's figure is its own, the rest is the kernel's and the machine's.
//! Not a proxy for anything but this measurement: a thread per direction does not scale.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use clap::Parser;

#[derive(Parser)]
#[command(about = "A two-thread blocking TCP relay: the floor of a relayed round trip")]
struct Args {
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// Where to relay each connection.
    #[arg(long)]
    to: SocketAddr,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn relay(client: TcpStream, to: SocketAddr) -> std::io::Result<()> {
    let backend = TcpStream::connect(to)?;
    client.set_nodelay(true)?;
    backend.set_nodelay(true)?;
    let (c2, b2) = (client.try_clone()?, backend.try_clone()?);
    std::thread::spawn(move || pipe(c2, b2));
    std::thread::spawn(move || pipe(backend, client));
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)?;
    for client in listener.incoming() {
        match client {
            Ok(c) => {
                if let Err(e) = relay(c, args.to) {
                    eprintln!("floor relay: {e}");
                }
            }
            Err(e) => eprintln!("floor relay: accept: {e}"),
        }
    }
    Ok(())
}
