//! `[build]`: the build args, the context directory (inside the sut directory, not the sut
//! directory itself) and the Dockerfile (a regular file inside the context), then the context
//! read and hashed.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::super::raw::RawBuild;
use super::super::{context_hash, read_context, Build, MAX_CONTEXT_SIZE};
use super::checker::{kk, Checker};
use super::paths::{canonical_sut_dir, lexical, resolve_inside};

/// `[build]`; `None` when anything is wrong (the problems are reported).
pub(super) fn build(c: &mut Checker<'_>, raw: &RawBuild, sut_dir: &Path) -> Option<Build> {
    args(c, &raw.args);
    let Some(context) = raw.context.as_deref() else {
        c.add(
            &kk("build", "context"),
            "missing: give the build context, a directory next to the SUT file, e.g. context = \"images/rpi4\"",
        );
        return None;
    };
    let (name, context_dir) = context_dir(c, context, sut_dir)?;
    let dockerfile = dockerfile(
        c,
        raw.dockerfile.as_deref(),
        &context_dir,
        &sut_dir.join(&name),
    )?;
    let entries = match read_context(&context_dir, MAX_CONTEXT_SIZE) {
        Ok(e) => e,
        Err(e) => {
            c.add(
                &kk("build", "context"),
                format!("the build context {context:?} {e}"),
            );
            return None;
        }
    };
    Some(Build {
        context: name,
        dockerfile,
        args: raw.args.clone(),
        context_hash: context_hash(&entries),
        context_dir,
    })
}

/// `build.args`: names non-empty and without `=`, no NUL anywhere.
fn args(c: &mut Checker<'_>, args: &BTreeMap<String, String>) {
    for (name, v) in args {
        let path = kk("build", "args").key(name);
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            c.add(
                &path,
                format!("{name:?} is not a build arg name (non-empty, no `=`)"),
            );
        }
        if v.contains('\0') {
            c.add(&path, "the value must not contain a NUL character");
        }
    }
}

/// `build.context`: its normalised name and the resolved directory.
fn context_dir(c: &mut Checker<'_>, context: &str, sut_dir: &Path) -> Option<(String, PathBuf)> {
    let key = kk("build", "context");
    let sut_dir_itself = format!("{context:?} is the sut directory itself; use a subdirectory, or every SUT file would be part of the build");
    if !context.is_empty()
        && Path::new(context)
            .components()
            .all(|p| p == Component::CurDir)
    {
        c.add(&key, sut_dir_itself);
        return None;
    }
    let name = match lexical(context, "the build context", "the sut directory") {
        Ok(n) => n,
        Err(e) => {
            c.add(&key, e.to_string());
            return None;
        }
    };
    let canon_dir = canonical_sut_dir(c, &key, sut_dir)?;
    let dir = match resolve_inside(context, &name, &canon_dir, sut_dir, "the sut directory") {
        Ok(p) => p,
        Err(e) => {
            c.add(&key, e.to_string());
            return None;
        }
    };
    if dir == canon_dir {
        c.add(&key, sut_dir_itself);
        return None;
    }
    if !dir.is_dir() {
        c.add(&key, format!("{context:?} is not a directory"));
        return None;
    }
    Some((name, dir))
}

/// `build.dockerfile` (default `Dockerfile`): its normalised path in the context, which is
/// `context_dir`, shown as `shown`.
fn dockerfile(
    c: &mut Checker<'_>,
    raw: Option<&str>,
    context_dir: &Path,
    shown: &Path,
) -> Option<String> {
    let key = kk("build", "dockerfile");
    let raw = raw.unwrap_or("Dockerfile");
    let dockerfile = match lexical(raw, "the Dockerfile", "the build context") {
        Ok(n) => n,
        Err(e) => {
            c.add(&key, e.to_string());
            return None;
        }
    };
    match resolve_inside(raw, &dockerfile, context_dir, shown, "the build context") {
        Ok(p) if !p.is_file() => {
            c.add(&key, format!("{raw:?} is not a regular file"));
            None
        }
        Ok(_) => Some(dockerfile),
        Err(e) => {
            c.add(&key, e.to_string());
            None
        }
    }
}
