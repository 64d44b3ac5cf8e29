//! A two-user chat on the pabal relay: run it twice, as two users, in the same room.
//!
//! ```text
//! relay &                                                   # loopback, auth = "none"
//! cargo run -p pabal-client --example chat -- 127.0.0.1:7700 ann room:demo
//! cargo run -p pabal-client --example chat -- 127.0.0.1:7700 bob room:demo
//! ```
//!
//! Lines typed are published; messages from the other user are printed. Over TLS, add the
//! CA certificate (PEM) that signed the relay's certificate and the name it carries:
//! `... ann room:demo ca.pem localhost`. Cut the network and restore it: the client
//! reconnects (0-RTT over TLS) and prints what it missed, nothing twice.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use pabal_client::{Client, ClientConfig, ClientEvent, TlsOptions};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, user, room, rest @ ..] = args.as_slice() else {
        eprintln!("usage: chat ADDR USER ROOM [CA_PEM SERVER_NAME]");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse()?;
    let mut config = ClientConfig::new(addr, user.clone());
    if let [ca, name] = rest {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        config.tls = Some(TlsOptions::new(roots, name)?);
    }
    let mut client = Client::new(config);
    client.connect()?;
    client.join(room)?;
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        while let Ok(line) = lines.try_recv() {
            if let Err(e) = client.publish(room, line) {
                eprintln!("! not sent: {e}");
            }
        }
        match client.next_event(Duration::from_millis(100))? {
            Some(ClientEvent::Message {
                sender,
                payload,
                seq: Some(seq),
                ..
            }) => println!("[{seq}] {sender}: {}", String::from_utf8_lossy(&payload)),
            Some(ClientEvent::Connected { early_data, .. }) => {
                eprintln!("* connected{}", if early_data { " (0-RTT)" } else { "" });
            }
            Some(ClientEvent::Bound { name, .. }) => {
                eprintln!("* in {}", name.as_deref().unwrap_or("?"));
            }
            Some(ClientEvent::Disconnected { reason, retry_in }) => {
                eprintln!("* disconnected ({reason}); retrying in {retry_in:?}");
            }
            Some(ClientEvent::Gap { from, to, .. }) => {
                eprintln!("* messages {from}..={to} expired")
            }
            Some(ClientEvent::Refused { message, .. }) => eprintln!("! refused: {message}"),
            Some(_) | None => {}
        }
    }
}
