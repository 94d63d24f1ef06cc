//! BPF programs shipped with raftmap, built from `bpf/` by `build.rs`.

use std::os::fd::AsFd;
use std::path::Path;

use aya::programs::Xdp;
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};

use crate::{sys, HookError, Result};

static CONNTRACK: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack.bpf.o"));

/// Key of the conntrack example's map: an IPv4 5-tuple, 16 bytes.
pub const CT_KEY_SIZE: u32 = 16;
/// Value of the conntrack example's map: packets and bytes seen, 16 bytes.
pub const CT_VALUE_SIZE: u32 = 16;

/// The example connection tracker (`bpf/conntrack.bpf.c`): an XDP program that records every
/// IPv4 TCP/UDP flow in an LRU hash map `ct`, inserting new flows with `bpf_map_update_elem`,
/// counting packets of known flows in place, and removing a flow on a TCP FIN or RST with
/// `bpf_map_delete_elem`. Each load has its own map.
#[derive(Debug)]
pub struct Conntrack {
    ebpf: Ebpf,
}

fn load_err(e: impl std::fmt::Display) -> HookError {
    HookError::Syscall {
        call: "BPF_PROG_LOAD",
        map: "ct".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Conntrack {
    /// Loads the program and pins its map (65536 entries) at `pin`.
    pub fn load(pin: &Path) -> Result<Self> {
        Self::load_sized(pin, 65536)
    }

    /// Loads the program with a map of `max_entries` (a small one fills up: LRU evictions),
    /// pinned at `pin`.
    pub fn load_sized(pin: &Path, max_entries: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("ct", max_entries)
            .load(CONNTRACK)
            .map_err(load_err)?;
        let prog: &mut Xdp = ebpf
            .program_mut("ct_track")
            .ok_or_else(|| load_err("program ct_track missing from conntrack.bpf.o"))?
            .try_into()
            .map_err(load_err)?;
        prog.load().map_err(load_err)?;
        ebpf.map("ct")
            .ok_or_else(|| load_err("map ct missing from conntrack.bpf.o"))?
            .pin(pin)
            .map_err(|e| HookError::Syscall {
                call: "BPF_OBJ_PIN",
                map: pin.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(Self { ebpf })
    }

    /// Runs the program on one Ethernet frame (BPF_PROG_TEST_RUN), as if it had arrived.
    pub fn run(&mut self, frame: &[u8]) -> Result<u32> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("ct_track")
            .ok_or_else(|| load_err("program ct_track gone"))?
            .try_into()
            .map_err(load_err)?;
        let fd = prog.fd().map_err(load_err)?;
        sys::prog_test_run(fd.as_fd(), frame).map_err(|source| HookError::Syscall {
            call: "BPF_PROG_TEST_RUN",
            map: "ct".into(),
            source,
        })
    }

    /// A TCP FIN for a flow: the program removes the flow from its map.
    pub fn fin_frame(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = Self::frame(saddr, daddr, sport, dport, true);
        f[14 + 20 + 13] = 0x11; // FIN | ACK
        f
    }

    /// An Ethernet + IPv4 + TCP (or UDP) frame for a flow.
    pub fn frame(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, tcp: bool) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = if tcp { 6 } else { 17 };
        ip[12..16].copy_from_slice(&saddr);
        ip[16..20].copy_from_slice(&daddr);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[46] = 0x50; // TCP data offset: 5 words
        f[47] = 0x10; // ACK
        f
    }

    /// The map key the program uses for that flow.
    pub fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, tcp: bool) -> Vec<u8> {
        let mut k = Vec::with_capacity(16);
        k.extend_from_slice(&saddr);
        k.extend_from_slice(&daddr);
        k.extend_from_slice(&sport.to_be_bytes());
        k.extend_from_slice(&dport.to_be_bytes());
        k.push(if tcp { 6 } else { 17 });
        k.extend_from_slice(&[0, 0, 0]);
        k
    }
}
