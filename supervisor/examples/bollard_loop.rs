//! The cold-start benchmark's minimal engine loop (`bench/run.py`): creates and starts the
//! given containers through bollard, as the supervisor does, at most `--parallelism` at a time,
//! and does nothing else (no planning, no labels of its own, no status). It is the engine's own
//! limit the supervisor is compared with.
//!
//! `bollard_loop --jobs FILE [--parallelism N] [--upload TAR]`
//!
//! - `FILE`: a JSON array of `{"name": "...", "body": {...}}`, each body an Engine API create
//!   request (`ContainerCreateBody`, as `docker inspect` spells its keys).
//! - `--upload TAR`: also `PUT` this tar archive to `/` between create and start, as the
//!   supervisor does for a SUT with `files`.
//!
//! Exits 0 when every container was created and started; else prints the first error and
//! exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, UploadToContainerOptionsBuilder};
use bollard::Docker;
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;

#[derive(serde::Deserialize)]
struct Job {
    name: String,
    body: ContainerCreateBody,
}

/// Creates and starts containers through bollard, and nothing else.
#[derive(Parser)]
struct Args {
    /// A JSON array of `{"name": "...", "body": {...}}`.
    #[arg(long)]
    jobs: PathBuf,
    /// Containers created and started at once.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(1..))]
    parallelism: u16,
    /// A tar archive put to `/` between create and start.
    #[arg(long)]
    upload: Option<PathBuf>,
}

async fn one(docker: &Docker, job: Job, tar: Option<Bytes>) -> anyhow::Result<()> {
    let opts = CreateContainerOptionsBuilder::default()
        .name(&job.name)
        .build();
    let id = docker
        .create_container(Some(opts), job.body)
        .await
        .with_context(|| format!("create {}", job.name))?
        .id;
    if let Some(tar) = tar {
        let opts = UploadToContainerOptionsBuilder::default().path("/").build();
        docker
            .upload_to_container(
                &id,
                Some(opts),
                bollard::body_stream(futures_util::stream::iter([tar])),
            )
            .await
            .with_context(|| format!("upload {}", job.name))?;
    }
    docker
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .with_context(|| format!("start {}", job.name))
}

async fn run(a: Args) -> anyhow::Result<()> {
    let file = a.jobs.display();
    let text = std::fs::read_to_string(&a.jobs).with_context(|| file.to_string())?;
    let jobs: Vec<Job> = serde_json::from_str(&text).with_context(|| file.to_string())?;
    let tar = match &a.upload {
        Some(p) => Some(Bytes::from(
            std::fs::read(p).with_context(|| p.display().to_string())?,
        )),
        None => None,
    };
    let docker = Docker::connect_with_defaults()?.negotiate_version().await?;
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(jobs)
        .map(|job| one(&docker, job, tar.clone()))
        .buffer_unordered(a.parallelism.into())
        .collect()
        .await;
    results.into_iter().collect()
}

fn main() -> ExitCode {
    // Usage errors exit 2 (clap).
    let a = Args::parse();
    // The supervisor's runtime: two worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bollard_loop: {e:#}");
            ExitCode::from(1)
        }
    }
}
