//! `raftmap`: the daemon (`raftmap agent`), the operator CLI and the local demo.

mod agent;
mod certs;
mod cli;
mod commands;
mod demo;
mod table;

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use raftmap_node::proto as pb;
use serde_json::json;

// The daemon allocates a key and a value per replicated change on every hop; mimalloc's
// thread-local free lists make that markedly cheaper than glibc malloc under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::cli::{Cli, ClusterCmd, Cmd};
use crate::commands::{from_status, map, print, print_members, status};

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    // A plaintext client talking to a TLS port sees only a broken HTTP/2 connection.
    let plaintext = cli
        .cmd
        .conn()
        .filter(|c| c.tls_dir.is_none())
        .map(|c| c.endpoints.clone());
    let res = rt.block_on(run(cli));
    if let Err(e) = &res {
        let hint = plaintext
            .and_then(|eps| eps.into_iter().find(|ep| cli::speaks_tls(ep)))
            .map(|ep| format!(" ({ep} requires TLS: pass --tls-dir with a client certificate)"))
            .unwrap_or_default();
        eprintln!("error: {e:#}{hint}");
    }
    // Tasks still running hold the database: stop them (which closes it) before the process
    // exits, or RocksDB closes during exit, after its static state is gone, and aborts.
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = res {
        // A configuration refused before anything started is a usage error.
        std::process::exit(if e.is::<agent::Refused>() { 2 } else { 1 });
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal: not in files, journals or container logs.
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(a) => {
            init_tracing();
            agent::agent(*a).await
        }
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Certs { cmd } => certs::run(cmd),
        Cmd::Cluster {
            cmd: ClusterCmd::Init,
            conn,
        } => {
            let c = conn.client().await?;
            let r = c
                .admin()
                .init(pb::InitRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            print(
                conn.output,
                json!({"cluster_id": r.cluster_id, "node_id": r.node_id}),
                || {
                    format!(
                        "initialised cluster {} with node {} as its first voter",
                        r.cluster_id, r.node_id
                    )
                },
            );
            Ok(())
        }
        Cmd::AddLearner {
            node_id,
            raft_addr,
            api_addr,
            conn,
        } => {
            let c = conn.client().await?;
            let r = c
                .admin()
                .add_learner(pb::AddLearnerRequest {
                    node_id,
                    raft_addr,
                    api_addr,
                    cluster_id: String::new(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Promote {
            node_id,
            max_lag,
            conn,
        } => {
            let c = conn.client().await?;
            let r = c
                .admin()
                .promote(pb::PromoteRequest { node_id, max_lag })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Remove {
            node_id,
            force,
            conn,
        } => {
            let c = conn.client().await?;
            let r = c
                .admin()
                .remove(pb::RemoveRequest { node_id, force })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Members { conn } => {
            let c = conn.client().await?;
            print_members(conn.output, &c.members().await?);
            Ok(())
        }
        Cmd::Status { conn } => status(&conn).await,
        Cmd::Map { cmd, conn } => map(cmd, &conn).await,
    }
}
