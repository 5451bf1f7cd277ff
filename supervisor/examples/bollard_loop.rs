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

use std::process::ExitCode;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, UploadToContainerOptionsBuilder};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;

#[derive(serde::Deserialize)]
struct Job {
    name: String,
    body: ContainerCreateBody,
}

struct Args {
    jobs: String,
    parallelism: usize,
    upload: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        jobs: String::new(),
        parallelism: 6,
        upload: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--jobs" => a.jobs = v()?,
            "--parallelism" => a.parallelism = v()?.parse().map_err(|e| format!("{e}"))?,
            "--upload" => a.upload = Some(v()?),
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    if a.jobs.is_empty() || a.parallelism == 0 {
        return Err("usage: bollard_loop --jobs FILE [--parallelism N] [--upload TAR]".into());
    }
    Ok(a)
}

async fn one(docker: &Docker, job: Job, tar: Option<Bytes>) -> Result<(), String> {
    let opts = CreateContainerOptionsBuilder::default()
        .name(&job.name)
        .build();
    let id = docker
        .create_container(Some(opts), job.body)
        .await
        .map_err(|e| format!("create {}: {e}", job.name))?
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
            .map_err(|e| format!("upload {}: {e}", job.name))?;
    }
    docker
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| format!("start {}: {e}", job.name))
}

async fn run(a: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.jobs).map_err(|e| format!("{}: {e}", a.jobs))?;
    let jobs: Vec<Job> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", a.jobs))?;
    let tar = match &a.upload {
        Some(p) => Some(Bytes::from(
            std::fs::read(p).map_err(|e| format!("{p}: {e}"))?,
        )),
        None => None,
    };
    let docker = Docker::connect_with_defaults()
        .map_err(|e| e.to_string())?
        .negotiate_version()
        .await
        .map_err(|e| e.to_string())?;
    let results: Vec<Result<(), String>> = futures_util::stream::iter(jobs)
        .map(|job| one(&docker, job, tar.clone()))
        .buffer_unordered(a.parallelism)
        .collect()
        .await;
    results.into_iter().collect()
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bollard_loop: {e}");
            return ExitCode::from(2);
        }
    };
    // The supervisor's runtime: two worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bollard_loop: {e}");
            ExitCode::from(1)
        }
    }
}
