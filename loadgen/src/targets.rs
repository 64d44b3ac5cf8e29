//! Where phones connect: one relay, or several nodes of a cluster behind what a load balancer
//! would be, and which of them a phone's next connection goes to.
//!
//! Owns: the addresses and the choice (phone `i` starts on target `i mod n`; a connection
//! that fails moves the phone to the next target, as a load balancer takes a dead node out;
//! under [`TargetPolicy::Rotate`] every reconnect moves it). Must not touch: sockets, the
//! ledger: the verification does not know or care which node a delivery came through.

use std::net::SocketAddr;

use anyhow::bail;

/// When a phone leaves its target for the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetPolicy {
    /// Only when a connection to it fails (refused, reset before WELCOME, handshake
    /// timeout): a sticky load balancer that takes a dead node out.
    #[default]
    Sticky,
    /// At every reconnect, whatever ended the last connection: a load balancer without
    /// affinity, so every resume crosses nodes.
    Rotate,
}

/// The relay addresses a run spreads its phones over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    addrs: Vec<SocketAddr>,
    /// When a phone moves to the next address.
    pub policy: TargetPolicy,
}

impl Targets {
    /// Several addresses (at least one), phones spread round robin.
    pub fn new(addrs: Vec<SocketAddr>, policy: TargetPolicy) -> anyhow::Result<Targets> {
        if addrs.is_empty() {
            bail!("--target: at least one address");
        }
        Ok(Targets { addrs, policy })
    }

    /// One relay.
    pub fn one(addr: SocketAddr) -> Targets {
        Targets {
            addrs: vec![addr],
            policy: TargetPolicy::Sticky,
        }
    }

    /// Every address, in order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The first address (where a single-relay check connects).
    pub fn first(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The address of phone `phone` after it moved `moves` times.
    pub fn pick(&self, phone: u32, moves: u32) -> SocketAddr {
        let n = self.addrs.len();
        self.addrs[(phone as usize % n + moves as usize % n) % n]
    }

    /// Whether a connection that ended this way moves the phone on: always after a failed
    /// connection, and after any end under [`TargetPolicy::Rotate`].
    pub fn moves_after(&self, failed: bool) -> bool {
        self.addrs.len() > 1 && (failed || self.policy == TargetPolicy::Rotate)
    }

    /// Every address is on loopback.
    pub fn all_loopback(&self) -> bool {
        self.addrs.iter().all(|a| a.ip().is_loopback())
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, a) in self.addrs.iter().enumerate() {
            if k > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn three(policy: TargetPolicy) -> Targets {
        let addrs = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 7000 + p)))
            .collect();
        Targets::new(addrs, policy).unwrap()
    }

    #[test]
    fn phones_start_round_robin_and_a_move_goes_to_the_next_target() {
        let t = three(TargetPolicy::Sticky);
        let ports: Vec<u16> = (0..6).map(|i| t.pick(i, 0).port()).collect();
        assert_eq!(ports, [7001, 7002, 7003, 7001, 7002, 7003]);
        let moved: Vec<u16> = (0..4).map(|m| t.pick(2, m).port()).collect();
        assert_eq!(moved, [7003, 7001, 7002, 7003]);
        assert_eq!(
            t.pick(u32::MAX, u32::MAX),
            t.pick(u32::MAX % 3, u32::MAX % 3)
        );
    }

    #[test]
    fn sticky_moves_only_after_a_failure_rotate_after_every_end() {
        let sticky = three(TargetPolicy::Sticky);
        assert!(sticky.moves_after(true));
        assert!(!sticky.moves_after(false));
        let rotate = three(TargetPolicy::Rotate);
        assert!(rotate.moves_after(true) && rotate.moves_after(false));
        let one = Targets::one(SocketAddr::from(([127, 0, 0, 1], 7001)));
        assert!(!one.moves_after(true));
        assert!(Targets::new(Vec::new(), TargetPolicy::Sticky).is_err());
        assert_eq!(
            sticky.to_string(),
            "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
        );
    }
}
